# The llama-factory devShells: LLaMA-Factory's `llamafactory-cli` in a Python set of its own
# (./python.nix), with NVIDIA's DGX Spark commands runnable as written. Called with callPackage
# from a nixpkgs instance that has overlays.default; CUDA or CPU follows its `config.cudaSupport`.
#
#   nix develop .#llama-factory        CUDA (default capabilities, binary cache)
#   nix develop .#llama-factory-cpu    the same without CUDA
{
  lib,
  mkShell,
  callPackage,
  config,
  cudaPackages,
  cudaSupport ? config.cudaSupport or false,
  llama-factory ? callPackage ./python.nix { },
}:
let
  inherit (llama-factory) python source version;

  init = callPackage ./init.nix { inherit source version; };

  # Triton's bundled ptxas predates sm_121a (DGX Spark); use the CUDA toolkit's own.
  ptxas = lib.getExe' cudaPackages.cuda_nvcc "ptxas";

  flavour = if cudaSupport then "CUDA ${cudaPackages.cudaMajorMinorVersion}" else "CPU only";

  help = ''
    llama-factory: LLaMA-Factory ${version} (${flavour})

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
mkShell (
  {
    name = if cudaSupport then "llama-factory" else "llama-factory-cpu";

    packages = [
      python
      init
    ];

    LLAMA_FACTORY_DATA = "${source}/data";
    LLAMA_FACTORY_EXAMPLES = "${source}/examples";

    shellHook =
      lib.optionalString cudaSupport (builtins.readFile ../pytorch-fine-tune/host-driver.sh)
      + ''
        # LLaMA-Factory's web UI listens on every interface unless told otherwise.
        export GRADIO_SERVER_NAME="''${GRADIO_SERVER_NAME:-127.0.0.1}"
        if [ -z "''${LLM_FINETUNE_QUIET:-}" ]; then
          cat <<'LLM_FINETUNE_HELP'
        ${help}
        LLM_FINETUNE_HELP
        fi
      '';

    passthru = {
      inherit python source init;
    };
  }
  // lib.optionalAttrs cudaSupport {
    TRITON_PTXAS_PATH = ptxas;
    # Triton >= 3.5 uses a separate ptxas for Blackwell (sm_100 and up) when this is set.
    TRITON_PTXAS_BLACKWELL_PATH = ptxas;
  }
)
