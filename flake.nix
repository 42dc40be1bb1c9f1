{
  description = "Reproducible LLM fine-tuning on NVIDIA GPUs (DGX Spark, H100, RTX): a pinned PyTorch stack and playbook scripts";

  # The default CUDA shell takes torch and the CUDA libraries from PyPI's wheels (fixed-output
  # downloads, no cache needed). The nix-community CUDA cache holds nixpkgs' CUDA builds (torch,
  # triton, ...) for x86_64-linux only, for the `-cuda12` and preset shells. Accept it with
  # `--accept-flake-config` or in your nix.conf; without it, and on aarch64-linux always, those
  # shells build torch from source, for hours. What each shell downloads and builds, per system:
  # playbooks/pytorch-fine-tune/README.md.
  nixConfig = {
    extra-substituters = [ "https://cache.nixos-cuda.org" ];
    extra-trusted-public-keys = [
      "cache.nixos-cuda.org:74DUi4Ye579gUqzH4ziL9IyiJBlDpMRn9MBN8oNan9M="
    ];
  };

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = lib.genAttrs systems;

      cuda = import ./overlays/cuda.nix;

      # nixpkgs with this flake's overlay. `variant` is passed to cuda.nixpkgsConfig:
      # { wheels = true; } = CUDA from PyPI's wheels (overlays.cuda-wheels) on CPU nixpkgs,
      # { } = nixpkgs' CUDA with the cache-friendly default capabilities, { preset = "spark"; } etc.,
      # { cudaSupport = false; } = CPU only.
      pkgsFor =
        system: variant:
        let
          wheels = variant.wheels or false;
        in
        import nixpkgs {
          inherit system;
          overlays = [ self.overlays.default ] ++ lib.optional wheels self.overlays.cuda-wheels;
          config = cuda.nixpkgsConfig variant;
        };

      perSystem = forAllSystems (
        system:
        let
          cpu = pkgsFor system { cudaSupport = false; };
          # The CUDA Python every CUDA app and the default shell use: nothing CUDA is compiled.
          gpu = pkgsFor system { wheels = true; };

          # One scripts package for every shell, app and check, so the checks run the very files the
          # devShells export.
          scripts = cpu.llm-finetune-scripts;
          inherit (scripts) playbooks;

          tinyModel = cpu.llm-finetune-tiny-model;

          shellFor =
            pkgs:
            pkgs.callPackage ./playbooks/pytorch-fine-tune {
              llm-finetune-scripts = scripts;
            };

          # LLaMA-Factory, with a Python set of its own (playbooks/llama-factory/python.nix).
          llamaFactoryShellFor = pkgs: pkgs.callPackage ./playbooks/llama-factory { };
          # NeMo AutoModel, with a Python set of its own (playbooks/nemo-fine-tune/python.nix).
          nemoShell = gpu.callPackage ./playbooks/nemo-fine-tune { };
          # The same wheels over nixpkgs' CPU torch, for the CPU check.
          nemoCpu = cpu.callPackage ./playbooks/nemo-fine-tune/python.nix { cpuOnly = true; };

          # `nix run .#<name> -- --help`: the script with the CUDA Python, the host driver linked in
          # on non-NixOS systems like in the devShell; or with the CPU Python where it asks for it.
          appFor =
            playbook:
            let
              cpuOnly = playbook.cpuOnly or false;
              pkgs = if cpuOnly then cpu else gpu;
              program = pkgs.writeShellApplication {
                inherit (playbook) name;
                runtimeInputs = [
                  pkgs.llm-finetune-python
                  pkgs.coreutils
                  pkgs.findutils
                ];
                text = ''
                  ${lib.optionalString (!cpuOnly) (builtins.readFile ./playbooks/pytorch-fine-tune/host-driver.sh)}
                  exec python ${playbook.path} "$@"
                '';
              };
            in
            {
              type = "app";
              program = lib.getExe program;
              # Nix >= 2.26's `flake check` warns about apps without it.
              meta.description = playbook.summary;
            };

          # Runs a script's smoke commands (scripts.nix) on the tiny model and the shipped data, on the
          # CPU, offline, in an empty directory; fails unless each exits 0 and the expected files exist.
          smokeFor =
            playbook:
            let
              substitute =
                builtins.replaceStrings
                  [
                    "@scripts@"
                    "@script@"
                    "@model@"
                    "@data@"
                  ]
                  [
                    "${scripts}/scripts"
                    playbook.path
                    "${tinyModel}"
                    "${scripts}/tests/data"
                  ];
              commandLine = args: "python ${lib.escapeShellArgs (map substitute args)}";
            in
            cpu.runCommand "smoke-${playbook.name}"
              {
                nativeBuildInputs = [ cpu.llm-finetune-python ];
              }
              ''
                export HOME="$TMPDIR" PYTHONDONTWRITEBYTECODE=1
                export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
                export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
                mkdir "$TMPDIR/smoke"
                cd "$TMPDIR/smoke"

                ${lib.concatMapStringsSep "\n" commandLine playbook.smoke}

                for expected in ${lib.escapeShellArgs playbook.expects}; do
                  if [ ! -s "$expected" ]; then
                    echo "smoke-${playbook.name}: missing $expected; the run left:" >&2
                    find . >&2
                    exit 1
                  fi
                done
                mkdir -p "$out"
                find . -maxdepth 2 -name '*.json' -exec cp --parents {} "$out/" \;
              '';

          # The repository's Python side, for the test and lint checks (tests/test_flake.py also
          # reads flake.lock and the playbook's host-driver.sh; tests/test_cuda_wheels.py the
          # wheel manifests; tests/test_lint.py lints dev.py and bench/ too).
          pythonSource = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./pyproject.toml
              ./scripts
              ./tests
              ./flake.lock
              ./playbooks
              ./README.md
              ./constraints.txt
              ./constraints-latest.txt
              ./dev.py
              ./bench
              ./overlays/cuda-wheels
            ];
          };

          nixSource = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./flake.nix
              ./overlays
              ./playbooks
              ./tests/nix
            ];
          };
        in
        {
          packages = {
            inherit scripts;
            tiny-model = tinyModel;
            llm-finetune = gpu.python3.pkgs.llm-finetune;
            llm-finetune-cpu = cpu.python3.pkgs.llm-finetune;
            default = scripts;
          };

          # The default CUDA shell is the wheels' on both systems; why, and what each shell downloads
          # and builds: playbooks/pytorch-fine-tune/README.md.
          devShells =
            rec {
              pytorch-fine-tune = shellFor gpu;
              pytorch-fine-tune-cpu = shellFor cpu;
              # nixpkgs' CUDA, narrowed to one GPU: smaller, but built locally (see the README).
              pytorch-fine-tune-h100 = shellFor (pkgsFor system { preset = "h100"; });
              llama-factory = llamaFactoryShellFor gpu;
              llama-factory-cpu = llamaFactoryShellFor cpu;
              nemo-fine-tune = nemoShell;
              default = pytorch-fine-tune;
            }
            // lib.optionalAttrs (system == "x86_64-linux") {
              # nixpkgs' CUDA 12.9 (cache.nixos-cuda.org), for drivers older than CUDA 13's 580.
              pytorch-fine-tune-cuda12 = shellFor (pkgsFor system { });
            }
            // lib.optionalAttrs (system == "aarch64-linux") {
              pytorch-fine-tune-spark = shellFor (pkgsFor system { preset = "spark"; });
            };

          apps = lib.mapAttrs (_: appFor) playbooks;

          checks =
            lib.mapAttrs' (
              name: playbook: lib.nameValuePair "smoke-${name}" (smokeFor playbook)
            ) playbooks
            // cpu.callPackage ./playbooks/llama-factory/checks.nix { }
            // {
              pytest =
                cpu.runCommand "llm-finetune-pytest"
                  {
                    nativeBuildInputs = [ cpu.llm-finetune-python ];
                  }
                  ''
                    export HOME="$TMPDIR" PYTHONDONTWRITEBYTECODE=1
                    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
                    cp -r ${pythonSource} "$TMPDIR/source"
                    chmod -R u+w "$TMPDIR/source"
                    cd "$TMPDIR/source"
                    # LLaMA-Factory runs in checks.smoke-llama-factory-*, NeMo AutoModel in
                    # checks.nemo-fine-tune: each in its own Python.
                    python -m pytest tests -p no:cacheprovider -m "not llama_factory and not nemo"
                    touch "$out"
                  '';

              # NeMo AutoModel's parts on the CPU (tests/test_nemo_automodel.py): the shell's wheels over
              # nixpkgs' CPU torch (no CUDA wheel in a check), the pinned Automodel examples.
              nemo-fine-tune =
                cpu.runCommand "nemo-fine-tune-cpu-check"
                  {
                    nativeBuildInputs = [ (nemoCpu.withPackages (ps: [ ps.pytest ])) ];
                    AUTOMODEL_EXAMPLES = nemoShell.examples;
                    LLM_FINETUNE_TINY_MODEL = tinyModel;
                  }
                  ''
                    export HOME="$TMPDIR" PYTHONDONTWRITEBYTECODE=1
                    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
                    export NEMO_PYTHON="$(command -v python)"
                    cp -r ${pythonSource} "$TMPDIR/source"
                    chmod -R u+w "$TMPDIR/source"
                    cd "$TMPDIR/source"
                    python -m pytest tests/test_nemo_automodel.py -p no:cacheprovider -m nemo  # addopts deselects it
                    touch "$out"
                  '';

              lint =
                cpu.runCommand "llm-finetune-lint"
                  {
                    nativeBuildInputs = [
                      cpu.ruff
                      cpu.nixfmt
                    ];
                  }
                  ''
                    cd ${pythonSource}
                    ruff check --no-cache scripts tests
                    ruff format --no-cache --check scripts tests
                    cd ${nixSource}
                    find . -name '*.nix' -print0 | xargs -0 nixfmt --check
                    touch "$out"
                  '';
            };

          formatter = cpu.nixfmt-tree;
        }
      );
    in
    {
      overlays.default = import ./overlays/default.nix;
      # After overlays.default, with cuda.nixpkgsConfig { wheels = true; }: see the file.
      overlays.cuda-wheels = import ./overlays/cuda-wheels.nix;

      packages = lib.mapAttrs (_: s: s.packages) perSystem;
      devShells = lib.mapAttrs (_: s: s.devShells) perSystem;
      apps = lib.mapAttrs (_: s: s.apps) perSystem;
      checks = lib.mapAttrs (_: s: s.checks) perSystem;
      formatter = lib.mapAttrs (_: s: s.formatter) perSystem;
    };
}
