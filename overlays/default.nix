# overlays.default: everything this flake adds to nixpkgs, for use in other flakes too:
#
#   pkgs = import nixpkgs {
#     inherit system;
#     overlays = [ llm-finetune.overlays.default ];
#     config = (import "${llm-finetune}/overlays/cuda.nix").nixpkgsConfig { };  # or { cudaSupport = false; }
#   };
#
# Adds:
#   python3.pkgs.llm-finetune and the package fixes     (./python.nix)
#   a CUDA version check and llm-finetune-cuda          (./cuda.nix)
#   llm-finetune-python     python3 with llm-finetune, its dependencies and its test extra
#   llm-finetune-scripts    the playbook scripts and shipped data, as store paths;
#                           passthru.playbooks = ../playbooks/pytorch-fine-tune/scripts.nix with
#                           `name` and `path` (the script's store path) added
#   llm-finetune-tiny-model a tiny Llama model and tokenizer, made offline by finetune.tiny
#
# CUDA from PyPI's wheels (torch, triton, bitsandbytes, NVIDIA's libraries) is a second overlay,
# overlays.cuda-wheels (./cuda-wheels.nix), applied after this one.
final: prev:
let
  # prev.lib: the composition below decides which attributes this overlay defines, so it must
  # not depend on `final`.
  inherit (prev) lib;

  own = final: prev: {
    llm-finetune-python = final.python3.withPackages (
      ps: [ ps.llm-finetune ] ++ ps.llm-finetune.testDependencies
    );

    llm-finetune-scripts =
      final.runCommand "llm-finetune-scripts"
        {
          src = lib.fileset.toSource {
            root = ../.;
            fileset = lib.fileset.unions [
              ../scripts
              ../tests/data
            ];
          };
          passthru.playbooks = lib.mapAttrs (
            name: playbook:
            playbook
            // {
              inherit name;
              path = "${final.llm-finetune-scripts}/scripts/${playbook.file}";
            }
          ) (import ../playbooks/pytorch-fine-tune/scripts.nix);
        }
        ''
          # scripts/<name>.py import `finetune` from their own directory; scripts/demo.py reads
          # ../tests/data, so keep the repository's layout.
          mkdir -p "$out/tests"
          cp -r "$src/scripts" "$out/scripts"
          cp -r "$src/tests/data" "$out/tests/data"
        '';

    llm-finetune-tiny-model =
      final.runCommand "llm-finetune-tiny-model"
        {
          nativeBuildInputs = [ final.llm-finetune-python ];
        }
        ''
          export HOME="$TMPDIR" PYTHONDONTWRITEBYTECODE=1
          export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
          # The scripts' own module, from the same store path the devShell exports.
          cd ${final.llm-finetune-scripts}/scripts
          python -m finetune.tiny "$out"
          test -f "$out/config.json"
        '';
  };
in
lib.composeManyExtensions [
  (import ./cuda.nix).overlay
  (import ./python.nix)
  own
] final prev
