# The pytorch-fine-tune devShell. Called with callPackage from a nixpkgs instance that has
# overlays.default (and, for CUDA from PyPI's wheels, overlays.cuda-wheels); CUDA or CPU follows
# that instance's `llm-finetune-cuda` (null: CPU).
#
#   nix develop .#pytorch-fine-tune           CUDA 13 from PyPI's wheels (nothing compiled)
#   nix develop .#pytorch-fine-tune-cuda12    x86_64-linux: nixpkgs' CUDA 12.9 (binary cache)
#   nix develop .#pytorch-fine-tune-cpu       same scripts and Python packages, no CUDA
{
  lib,
  mkShell,
  llm-finetune-python,
  llm-finetune-scripts,
  llm-finetune-cuda ? null,
}:
let
  inherit (llm-finetune-scripts) playbooks;

  scriptVariables = lib.mapAttrs' (
    _: playbook: lib.nameValuePair playbook.envVar playbook.path
  ) playbooks;

  commands = lib.concatMapStringsSep "\n" (
    playbook: "    python \$${playbook.envVar}   # ${playbook.summary}"
  ) (lib.attrValues playbooks);

  cuda = llm-finetune-cuda;
  cudaSupport = cuda != null;

  flavour = if cudaSupport then cuda.description else "CPU only";

  driver = lib.optionalString cudaSupport ''
    Needs an NVIDIA driver ${cuda.driver}; `nvidia-smi` shows yours.
  '';

  help = ''
    pytorch-fine-tune (${flavour})
    ${driver}
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

    shellHook = import ../shell-hook.nix { inherit lib cudaSupport help; };

    passthru = {
      inherit playbooks cuda;
      python = llm-finetune-python;
    };
  }
  # No TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH. nixpkgs' triton (cuda12, h100, spark) is
  # built from source, bundles no ptxas, and is patched (0004-nvidia-allow-static-ptxas-path.patch)
  # to add its CUDA toolkit's ptxas (`nixpkgsExtraBinaryPaths`: cuda_nvcc 12.9, which knows sm_121a)
  # to every binary it looks up, the Blackwell ptxas included. The wheel triton (the default shell)
  # bundles the ptxas PyTorch pairs it with. Setting them could only point Triton at a different
  # CUDA than its own.
  // scriptVariables
)
