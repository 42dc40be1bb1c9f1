{
  description = "Reproducible LLM fine-tuning on NVIDIA GPUs (DGX Spark, H100, RTX): a pinned PyTorch stack and playbook scripts";

  # The CUDA packages (torch, triton, bitsandbytes with CUDA) are built by the nixos-cuda binary
  # cache. Accept this with `--accept-flake-config` or by adding the cache to your nix.conf (see
  # playbooks/pytorch-fine-tune/README.md); without it torch builds from source, for hours.
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
      # { } = CUDA with the cache-friendly default capabilities, { preset = "spark"; } etc.,
      # { cudaSupport = false; } = CPU only.
      pkgsFor =
        system: variant:
        import nixpkgs {
          inherit system;
          overlays = [ self.overlays.default ];
          config = cuda.nixpkgsConfig variant;
        };

      perSystem = forAllSystems (
        system:
        let
          cpu = pkgsFor system { cudaSupport = false; };
          gpu = pkgsFor system { };

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

          # `nix run .#<name> -- --help`: the script with the CUDA Python, the host driver linked in
          # on non-NixOS systems like in the devShell.
          appFor =
            playbook:
            let
              program = gpu.writeShellApplication {
                inherit (playbook) name;
                runtimeInputs = [
                  gpu.llm-finetune-python
                  gpu.coreutils
                  gpu.findutils
                ];
                text = ''
                  ${builtins.readFile ./playbooks/pytorch-fine-tune/host-driver.sh}
                  exec python ${playbook.path} "$@"
                '';
              };
            in
            {
              type = "app";
              program = lib.getExe program;
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
          # reads flake.lock and the playbook's host-driver.sh).
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

          devShells =
            rec {
              pytorch-fine-tune = shellFor gpu;
              pytorch-fine-tune-cpu = shellFor cpu;
              # Narrow builds for one GPU: smaller, but built locally (see the README).
              pytorch-fine-tune-h100 = shellFor (pkgsFor system { preset = "h100"; });
              llama-factory = llamaFactoryShellFor gpu;
              llama-factory-cpu = llamaFactoryShellFor cpu;
              default = pytorch-fine-tune;
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
                    # LLaMA-Factory runs in checks.smoke-llama-factory-*; its pytest venv needs PyPI.
                    python -m pytest tests -p no:cacheprovider -m "not llama_factory"
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

      packages = lib.mapAttrs (_: s: s.packages) perSystem;
      devShells = lib.mapAttrs (_: s: s.devShells) perSystem;
      apps = lib.mapAttrs (_: s: s.apps) perSystem;
      checks = lib.mapAttrs (_: s: s.checks) perSystem;
      formatter = lib.mapAttrs (_: s: s.formatter) perSystem;
    };
}
