# The shellHook every playbook's devShell shares: on CUDA, the host driver's libraries linked in where
# the host is not NixOS (./pytorch-fine-tune/host-driver.sh); the playbook's own `setup`; then its
# help, unless LLM_FINETUNE_QUIET is set.
{
  lib,
  cudaSupport,
  help,
  setup ? "",
}:
lib.optionalString cudaSupport (builtins.readFile ./pytorch-fine-tune/host-driver.sh)
+ setup
+ ''
  if [ -z "''${LLM_FINETUNE_QUIET:-}" ]; then
    cat <<'LLM_FINETUNE_HELP'
  ${help}
  LLM_FINETUNE_HELP
  fi
''
