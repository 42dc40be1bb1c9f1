# The pytorch-fine-tune devShell. Called with callPackage from a nixpkgs instance that has
# overlays.default; CUDA or CPU follows that instance's `config.cudaSupport`.
#
#   nix develop .#pytorch-fine-tune        CUDA (default capabilities, binary cache)
#   nix develop .#pytorch-fine-tune-cpu    same scripts and Python packages, no CUDA
{
  lib,
  mkShell,
  config,
  cudaPackages,
  llm-finetune-python,
  llm-finetune-scripts,
  cudaSupport ? config.cudaSupport or false,
}:
let
  inherit (llm-finetune-scripts) playbooks;

  # Triton's bundled ptxas predates sm_121a (DGX Spark); use the CUDA toolkit's own.
  ptxas = lib.getExe' cudaPackages.cuda_nvcc "ptxas";

  scriptVariables = lib.mapAttrs' (
    _: playbook: lib.nameValuePair playbook.envVar playbook.path
  ) playbooks;

  commands = lib.concatMapStringsSep "\n" (
    playbook: "    python \$${playbook.envVar}   # ${playbook.summary}"
  ) (lib.attrValues playbooks);

  flavour = if cudaSupport then "CUDA ${cudaPackages.cudaMajorMinorVersion}" else "CPU only";

  help = ''
    pytorch-fine-tune (${flavour})

    Run a playbook (add --help for the options):
    ${commands}
      e.g. python $LLAMA3_8B_LORA_SCRIPT --dataset data.jsonl --output_dir runs/8b-lora

    Models and datasets are cached in $HF_HOME (default ~/.cache/huggingface).
    Gated models (Llama) need a token: hf auth login
    Offline: export HF_HUB_OFFLINE=1 and pass local paths (--model_name /path/to/model).
    Set LLM_FINETUNE_QUIET=1 to hide this message.
  '';
in
mkShell (
  {
    name = if cudaSupport then "pytorch-fine-tune" else "pytorch-fine-tune-cpu";

    packages = [ llm-finetune-python ];

    shellHook =
      lib.optionalString cudaSupport (builtins.readFile ./host-driver.sh)
      + ''
        if [ -z "''${LLM_FINETUNE_QUIET:-}" ]; then
          cat <<'LLM_FINETUNE_HELP'
        ${help}
        LLM_FINETUNE_HELP
        fi
      '';

    passthru = {
      inherit playbooks;
      python = llm-finetune-python;
    };
  }
  // scriptVariables
  // lib.optionalAttrs cudaSupport {
    TRITON_PTXAS_PATH = ptxas;
    # Triton >= 3.5 uses a separate ptxas for Blackwell (sm_100 and up) when this is set.
    TRITON_PTXAS_BLACKWELL_PATH = ptxas;
  }
)
