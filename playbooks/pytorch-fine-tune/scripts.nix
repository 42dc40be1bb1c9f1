# The playbook scripts. This is the one list the devShell variables, the `nix run` apps and the
# smoke checks are generated from: add a script here and it gets all three.
#
#   <app name> = {
#     file        the script, relative to scripts/
#     envVar      the devShell variable holding its store path
#     summary     one line for the shell's help
#     smoke       the smoke check's command lines (arguments to python), run in order in an empty
#                 directory, on the CPU, offline. @script@ is this script, @scripts@ the scripts
#                 directory, @model@ the tiny model, @data@ the shipped sample data (tests/data)
#     expects     files (relative to that directory) a successful smoke check leaves behind
#     cpuOnly     (optional) its `nix run` app uses the CPU Python: no GPU, nothing CUDA to fetch
#   };
let
  # A few steps of a training script on `model`, into the directory `out`.
  train = script: model: dataset: out: [
    script
    "--model_name"
    model
    "--dataset"
    "@data@/${dataset}"
    "--output_dir"
    out
    "--max_steps"
    "2"
    "--batch_size"
    "2"
    "--seq_length"
    "128"
    "--eval_split"
    "0.2"
  ];
  # The same on the tiny model, into ./run.
  onTinyModel = script: dataset: train script "@model@" dataset "run";
  # An SFT run (./sft) for the scripts that go on from one.
  sft = train "@scripts@/llama3_8b_lora.py" "@model@" "alpaca.jsonl" "sft";
in
{
  demo = {
    file = "demo.py";
    envVar = "DEMO_SCRIPT";
    summary = "a one-minute offline proof: the tiny model trained by each playbook script";
    cpuOnly = true;
    smoke = [
      [
        "@script@"
        "--workdir"
        "demo"
        "--steps"
        "2"
      ]
    ];
    expects = [
      "demo/llama3_8b_lora/final/adapter_model.safetensors"
      "demo/llama3_3b_full/final/model.safetensors"
      "demo/llama3_70b_qlora/final/adapter_model.safetensors"
    ];
  };
  llama3-8b-lora = {
    file = "llama3_8b_lora.py";
    envVar = "LLAMA3_8B_LORA_SCRIPT";
    summary = "LoRA on Llama 3.1 8B (bf16 base, adapter only)";
    smoke = [ (onTinyModel "@script@" "alpaca.jsonl") ];
    expects = [
      "run/final/adapter_model.safetensors"
      "run/metrics.json"
    ];
  };
  llama3-3b-full = {
    file = "llama3_3b_full.py";
    envVar = "LLAMA3_3B_FULL_SCRIPT";
    summary = "full fine-tuning of Llama 3.2 3B";
    smoke = [ (onTinyModel "@script@" "alpaca.jsonl") ];
    expects = [
      "run/final/model.safetensors"
      "run/metrics.json"
    ];
  };
  llama3-70b-qlora = {
    file = "llama3_70b_qlora.py";
    envVar = "LLAMA3_70B_QLORA_SCRIPT";
    summary = "QLoRA on Llama 3.1 70B (4-bit NF4 base, adapter only)";
    smoke = [ (onTinyModel "@script@" "alpaca.jsonl") ];
    expects = [
      "run/final/adapter_model.safetensors"
      "run/metrics.json"
    ];
  };
  llama3-8b-dpo = {
    file = "llama3_8b_dpo.py";
    envVar = "LLAMA3_8B_DPO_SCRIPT";
    summary = "DPO with LoRA on preference pairs, from an instruct model or an SFT run";
    # From an SFT run's output directory: the adapter goes on training.
    smoke = [
      sft
      (train "@script@" "sft" "preference.jsonl" "run")
    ];
    expects = [
      "run/final/adapter_model.safetensors"
      "run/metrics.json"
    ];
  };
  export = {
    file = "export.py";
    envVar = "EXPORT_SCRIPT";
    summary = "merge an adapter into its base, convert to GGUF, write an Ollama Modelfile";
    smoke = [
      sft
      [
        "@script@"
        "merge"
        "--adapter"
        "sft"
        "--output_dir"
        "merged"
      ]
      [
        "@script@"
        "gguf"
        "--model"
        "merged"
        "--outfile"
        "model.gguf"
        "--outtype"
        "q8_0"
      ]
      [
        "@script@"
        "ollama"
        "--gguf"
        "model.gguf"
        "--model"
        "merged"
        "--outfile"
        "Modelfile"
      ]
    ];
    expects = [
      "merged/model.safetensors"
      "model.gguf"
      "Modelfile"
    ];
  };
  evaluate = {
    file = "evaluate.py";
    envVar = "EVALUATE_SCRIPT";
    summary = "answers of base and fine-tuned model side by side; loss and perplexity on data";
    smoke = [
      sft
      [
        "@script@"
        "generate"
        "--model"
        "sft"
        "--prompt"
        "Name a primary colour."
        "--max_new_tokens"
        "8"
      ]
      [
        "@script@"
        "eval"
        "--model"
        "sft"
        "--dataset"
        "@data@/alpaca.jsonl"
        "--output"
        "eval.json"
      ]
    ];
    expects = [ "eval.json" ];
  };
}
