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
  # No TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH: nixpkgs' triton is built from source,
  # bundles no ptxas, and is patched (0004-nvidia-allow-static-ptxas-path.patch) to add its CUDA
  # toolkit's ptxas (`nixpkgsExtraBinaryPaths`: cuda_nvcc 12.9, which knows sm_121a) to every
  # binary it looks up, the Blackwell ptxas included. Setting them could only point Triton at a
  # different CUDA than its own. (A triton from PyPI bundles an older ptxas and needs them.)
  // scriptVariables
)
