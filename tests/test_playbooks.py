"""End to end: each playbook script trains the tiny model offline, saves what it trained, and reports it."""

from __future__ import annotations

import pytest
import torch
from conftest import DATA, FAST, PLAYBOOKS, read_metrics
from transformers import AutoModelForCausalLM, AutoTokenizer

# Learning rates high enough to move a randomly initialised model in a few dozen steps.
LEARNING_RATE = {"llama3_8b_lora.py": "2e-2", "llama3_3b_full.py": "2e-3", "llama3_70b_qlora.py": "2e-2"}


def _load_trained(script: str, final, base_dir):
    if PLAYBOOKS[script] == "model.safetensors":
        return AutoModelForCausalLM.from_pretrained(final)
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final)


@pytest.mark.smoke
@pytest.mark.parametrize("script", list(PLAYBOOKS))
def test_playbook_trains_saves_and_reports(script, tiny_model, run_script, tmp_path):
    out = tmp_path / "run"
    result = run_script(
        script,
        "--model_name", tiny_model, "--dataset", DATA / "alpaca.jsonl", "--output_dir", out,
        "--max_steps", "24", "--eval_split", "0.2", "--learning_rate", LEARNING_RATE[script], *FAST,
        check=True,
    )  # fmt: skip

    metrics = read_metrics(out)
    assert metrics["train_loss"] < metrics["initial_train_loss"] - 0.05, metrics
    assert metrics["eval_loss"] > 0 and metrics["eval_perplexity"] > 1
    assert metrics["tokens_per_second"] > 0 and metrics["samples_per_second"] > 0
    assert metrics["peak_memory_bytes"] > 0 and metrics["global_step"] == 24
    assert metrics["versions"]["torch"] and metrics["versions"]["transformers"]
    assert metrics["config"]["model_name"] == str(tiny_model)
    # The summary table names the outputs.
    assert "tokens/s" in result.stdout and str(out / "final") in result.stdout

    final = out / "final"
    assert (final / PLAYBOOKS[script]).is_file() and (final / "tokenizer.json").is_file()
    assert not list(out.glob(".final*")), "temporary directories left behind"

    # What was saved reloads, differs from the base model, and generates.
    tokenizer = AutoTokenizer.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    trained = _load_trained(script, final, tiny_model)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a primary colour."}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    input_ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    with torch.no_grad():
        assert not torch.allclose(base(input_ids).logits, trained(input_ids).logits, atol=1e-4)
        generated = trained.generate(input_ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > input_ids.shape[1]


def test_qlora_loads_the_base_in_4bit(tiny_model):
    import bitsandbytes as bnb
    from finetune.config import TrainConfig
    from finetune.model import load_model, load_model_config, placement

    cfg = TrainConfig(
        method="qlora", model_name=str(tiny_model), output_dir="unused", gradient_checkpointing=True
    )
    model = load_model(cfg, load_model_config(cfg.model_name), placement(cfg))
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7, "every attention and MLP projection of both layers is 4-bit"
    assert all(m.weight.quant_state.quant_type == "nf4" for m in four_bit)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_prequantized_model_is_used_as_is(tiny_model, run_script, tmp_path, capsys):
    """A model saved in 4-bit (like the -bnb-4bit hub repos) trains without being quantized again."""
    from transformers import BitsAndBytesConfig

    quantized = tmp_path / "tiny-bnb-4bit"
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=config, device_map="cpu")
    model.save_pretrained(quantized)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(quantized)

    out = tmp_path / "run"
    run_script(
        "llama3_70b_qlora.py", "--model_name", quantized, "--dataset", DATA / "alpaca.jsonl",
        "--output_dir", out, "--max_steps", "2", "--eval_split", "0", *FAST, check=True,
    )  # fmt: skip
    assert (out / "final" / "adapter_model.safetensors").is_file()

    # Full fine-tuning cannot train 4-bit weights: refused before any data or weights are loaded.
    import llama3_3b_full
    from finetune.playbook import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            ["--model_name", str(quantized), "--output_dir", str(tmp_path / "full")],
            prog="t",
            description="t",
            defaults=llama3_3b_full.DEFAULTS,
        )
    assert exit_info.value.code == 2 and "use the QLoRA playbook" in capsys.readouterr().err


@pytest.mark.smoke
def test_qlora_trains_and_evaluates_a_model_whose_shapes_the_packed_cpu_kernel_refuses(
    odd_width_model, run_script, tmp_path
):
    """bitsandbytes' packed CPU kernel (>= 0.49) needs out_features % 32 == 0 and in_features % 64 == 0 when a
    4-bit layer first runs in inference mode; a model with a 176-wide MLP trains, evaluates and saves all the same.
    """
    out = tmp_path / "run"
    run_script(
        "llama3_70b_qlora.py",
        "--model_name", odd_width_model, "--dataset", DATA / "alpaca.jsonl", "--output_dir", out,
        "--max_steps", "4", "--eval_split", "0.2", *FAST,
        check=True,
    )  # fmt: skip
    assert read_metrics(out)["eval_loss"] > 0
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_layers_the_packed_cpu_kernel_refuses_run_on_the_generic_one(odd_width_model):
    from finetune.config import TrainConfig
    from finetune.model import load_base, placement

    cfg = TrainConfig(model_name=str(odd_width_model), output_dir="unused", method="qlora")
    model = load_base(cfg, AutoModelForCausalLM.from_pretrained(odd_width_model).config, placement(cfg))
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "support_avx512bf16_for_cpu")}
    if not layers:
        pytest.skip("this bitsandbytes has no packed 4-bit CPU kernel")
    from bitsandbytes.functional import has_avx512bf16

    assert layers["model.layers.0.mlp.up_proj"].support_avx512bf16_for_cpu is False  # 176 outputs
    assert layers["model.layers.0.mlp.down_proj"].support_avx512bf16_for_cpu is False  # 176 inputs
    assert layers["model.layers.0.self_attn.q_proj"].support_avx512bf16_for_cpu == has_avx512bf16()  # 128
    model.eval()
    with torch.no_grad():  # inference mode: where the packed kernel would assert
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
