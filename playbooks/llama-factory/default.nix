# The llama-factory devShells: LLaMA-Factory's `llamafactory-cli` in a Python set of its own
# (./python.nix), with NVIDIA's DGX Spark commands runnable as written. Called with callPackage
# from a nixpkgs instance that has overlays.default (and, for CUDA from PyPI's wheels,
# overlays.cuda-wheels), like the pytorch-fine-tune shell; CUDA or CPU follows that instance's
# `llm-finetune-cuda` (null: CPU).
#
#   nix develop .#llama-factory        CUDA 13 from PyPI's wheels, pytorch-fine-tune's torch
#   nix develop .#llama-factory-cpu    the same without CUDA
{
  lib,
  mkShell,
  callPackage,
  llm-finetune-cuda ? null,
  llama-factory ? callPackage ./python.nix { },
}:
let
  inherit (llama-factory)
    python
    source
    version
    llamafactory
    ;

  init = callPackage ./init.nix { inherit source version; };

  cuda = llm-finetune-cuda;
  cudaSupport = cuda != null;

  flavour = if cudaSupport then cuda.description else "CPU only";

  driver = lib.optionalString cudaSupport ''
    Needs an NVIDIA driver ${cuda.driver}; `nvidia-smi` shows yours.
  '';

  # What ./python.nix leaves out with a CUDA torch.
  missing = lib.concatStringsSep " and " llamafactory.withoutPackages;
  leftOut = lib.optionalString (missing != "") ''
    Without ${missing}: text models are unaffected; audio inputs need torchaudio.
  '';

  help = ''
    llama-factory: LLaMA-Factory ${version} (${flavour})
    ${driver}${leftOut}
    NVIDIA's DGX Spark playbook, as written:
      llamafactory-init              copy LLaMA-Factory's data/ and examples/ here (writable)
      llamafactory-cli train examples/train_lora/qwen3_lora_sft.yaml
      llamafactory-cli chat examples/inference/qwen3_lora_sft.yaml
      llamafactory-cli export examples/merge_lora/qwen3_lora_sft.yaml
      llamafactory-cli webui         the web UI (LlamaBoard): http://127.0.0.1:7860
    Also: llamafactory-cli api | webchat | env | version | help (lmf is a short name).
    Any YAML key can be overridden after the file: ... learning_rate=5e-5 max_samples=100
    The web UI listens on $GRADIO_SERVER_NAME (127.0.0.1 here; 0.0.0.0 exposes it to the network).
    Read-only originals: $LLAMA_FACTORY_DATA, $LLAMA_FACTORY_EXAMPLES.

    Models and datasets are cached in $HF_HOME (default ~/.cache/huggingface); gated models need
    `hf auth login`. Offline: export HF_HUB_OFFLINE=1 and use local paths (model_name_or_path=/path).
    Set LLM_FINETUNE_QUIET=1 to hide this message.
  '';
in
mkShell {
  name = if cudaSupport then "llama-factory" else "llama-factory-cpu";

  packages = [
    python
    init
  ];

  LLAMA_FACTORY_DATA = "${source}/data";
  LLAMA_FACTORY_EXAMPLES = "${source}/examples";

  shellHook = import ../shell-hook.nix {
    inherit lib cudaSupport help;
    setup = ''
      # LLaMA-Factory's web UI listens on every interface unless told otherwise.
      export GRADIO_SERVER_NAME="''${GRADIO_SERVER_NAME:-127.0.0.1}"
    '';
  };

  passthru = {
    inherit python source init cuda;
  };
  # No TRITON_PTXAS_*: the wheel triton bundles the ptxas PyTorch pairs it with (see
  # ../pytorch-fine-tune/default.nix).
}
