# The playbook scripts. This is the one list the devShell variables, the `nix run` apps and the
# smoke checks are generated from: add a script here and it gets all three.
#
#   <app name> = {
#     file        the script, relative to scripts/
#     envVar      the devShell variable holding its store path
#     summary     one line for the shell's help
#     expects     files (relative to --output_dir) a successful run must leave behind;
#                 every run also writes metrics.json
#   };
{
  llama3-8b-lora = {
    file = "llama3_8b_lora.py";
    envVar = "LLAMA3_8B_LORA_SCRIPT";
    summary = "LoRA on Llama 3.1 8B (bf16 base, adapter only)";
    expects = [ "final/adapter_model.safetensors" ];
  };
  llama3-3b-full = {
    file = "llama3_3b_full.py";
    envVar = "LLAMA3_3B_FULL_SCRIPT";
    summary = "full fine-tuning of Llama 3.2 3B";
    expects = [ "final/model.safetensors" ];
  };
  llama3-70b-qlora = {
    file = "llama3_70b_qlora.py";
    envVar = "LLAMA3_70B_QLORA_SCRIPT";
    summary = "QLoRA on Llama 3.1 70B (4-bit NF4 base, adapter only)";
    expects = [ "final/adapter_model.safetensors" ];
  };
}
