# The nemo-fine-tune devShell: NeMo AutoModel 0.7.0 (NVIDIA's "Fine-tune with NeMo" playbook, which
# runs it in the nvcr.io/nvidia/nemo-automodel container), pinned, without Docker. Called with
# callPackage from the CUDA nixpkgs (overlays.default + overlays.cuda-wheels):
#
#   nix develop .#nemo-fine-tune
#
# Python: ./python.nix (the CUDA set's torch 2.13.0 + AutoModel's own wheels). Automodel's examples/
# (the recipes' YAMLs and finetune.py): $AUTOMODEL_EXAMPLES, from the pinned source below. NVIDIA's
# commands name them relative to /opt/Automodel: run them, as written, in a directory where
# `examples` links there (the help says how); checkpoints go to ./checkpoints/.
{
  lib,
  mkShell,
  callPackage,
  fetchFromGitHub,
  llm-finetune-cuda,
}:
let
  nemo = callPackage ./python.nix { };

  # NVIDIA-NeMo/Automodel has no v0.7.0 tag in the source we can pin here; this is the r0.6.0
  # release branch's head (2026-08-21), the newest release line with NVIDIA's three YAMLs
  # (identical to v0.5.0's for the LoRA and QLoRA ones). The recipes themselves are the installed
  # nemo-automodel 0.7.0; tests/test_nemo_automodel.py checks these YAMLs parse and run with it.
  # Hash: `git archive <rev> | tar x -C src && nix hash path src` (the method gives nixpkgs'
  # pyyaml 6.0.1 hash for yaml/pyyaml 6.0.1).
  automodel-source = fetchFromGitHub {
    owner = "NVIDIA-NeMo";
    repo = "Automodel";
    rev = "94387e4318bfd04cb21ff57782061864e0c7bcec";
    hash = "sha256-LGbebeefNrpDMfTyAw6Jm8rkvOChnHiGmNSlt+XJ7dM=";
  };
  examples = "${automodel-source}/examples";

  cuda = llm-finetune-cuda;
  recipe = name: "examples/llm_finetune/${name}.yaml";

  help = ''
    nemo-fine-tune (NeMo AutoModel 0.7.0, ${cuda.description})
    Needs an NVIDIA driver ${cuda.driver}; `nvidia-smi` shows yours.

    NVIDIA's commands run as written from a directory with Automodel's examples:
      mkdir -p ~/automodel && cd ~/automodel && ln -sfn "$AUTOMODEL_EXAMPLES" examples
      python3 examples/llm_finetune/finetune.py -c ${recipe "llama3_2/llama3_2_1b_squad_peft"} \
        --model.pretrained_model_name_or_path meta-llama/Llama-3.1-8B \
        --packed_sequence.packed_sequence_size 1024 --step_scheduler.max_steps 20      # LoRA
      python3 examples/llm_finetune/finetune.py -c ${recipe "llama3_1/llama3_1_8b_squad_qlora"}  # QLoRA
      python3 examples/llm_finetune/finetune.py -c ${recipe "qwen/qwen3_8b_squad_spark"}         # full SFT
    (or `automodel <config.yaml>`, the non-deprecated entry point). Checkpoints: ./checkpoints/LATEST/.
    Offline SQuAD and the mapping to our scripts: playbooks/nemo-fine-tune/README.md.
    Set LLM_FINETUNE_QUIET=1 to hide this message.
  '';
in
mkShell {
  name = "nemo-fine-tune";

  packages = [ nemo.python ];

  AUTOMODEL_EXAMPLES = examples;

  shellHook = import ../shell-hook.nix {
    inherit lib help;
    cudaSupport = true; # a CUDA-only shell
  };

  passthru = {
    inherit (nemo) python withPackages downloadBytes;
    # The wheel packages by name (`packages` is mkShell's list).
    wheels = nemo.packages;
    inherit automodel-source examples cuda;
  };
}
