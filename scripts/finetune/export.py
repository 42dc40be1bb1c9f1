"""From a trained adapter to a model other tools serve: merge, GGUF, Ollama Modelfile. Each step checks its output.

merge   adapter + base → full weights (safetensors, a chosen dtype). The merged model's logits must match the
        base with the adapter attached, on a fixed prompt, or nothing is written.
gguf    Llama-architecture model → GGUF (f16, bf16, q8_0) for llama.cpp and Ollama: with llama.cpp's
        convert_hf_to_gguf.py when it is on PATH, else written here with the `gguf` package the way that
        converter writes Llama models (Q/K rows permuted for GGML's RoPE, norms in F32, Llama 3 RoPE factors,
        byte-level BPE vocabulary, merges, special tokens and chat template). The file is read back (tensors,
        metadata) and, where transformers can load GGUF, its logits are compared with the source model's.
ollama  GGUF + tokenizer → Modelfile: FROM, the chat template as a Go template, stop tokens, system prompt.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import render
from .errors import UserError
from .model import is_prequantized, load_model_config
from .outputs import replace_dir
from .sources import (
    base_config,
    check_adapter_fits,
    inference_placement,
    load_causal_lm,
    load_tokenizer_for,
    refuse_prequantized,
    resolve,
    with_flag,
)

MERGE_DTYPES = ("bfloat16", "float16", "float32")
GGUF_TYPES = ("f16", "bf16", "q8_0")
CHECK_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France, and what is 12 plus 7?"},
    {"role": "assistant", "content": "The capital of France is Paris, and 12 plus 7 is 19."},
]
# Largest |Δlogit| allowed, relative to the largest |logit| of the reference: rounding of one matmul's
# weights to the format, accumulated over the layers, stays well inside these; a merge or conversion that
# went wrong (a missing adapter, an unpermuted head) does not.
MERGE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
GGUF_TOLERANCE = {"f16": 2e-2, "bf16": 5e-2, "q8_0": 1e-1}
# Largest |Δweight| of any tensor relative to that tensor's largest |weight|: the format's rounding step
# (2^-11 for f16, 2^-8 for bf16, 1/254 of a 32-value block's maximum for q8_0).
WEIGHT_TOLERANCE = {"f16": 1e-3, "bf16": 8e-3, "q8_0": 1e-2}


@dataclass
class LogitCheck:
    max_diff: float
    tolerance: float
    scale: float  # largest |logit| of the reference

    @property
    def ok(self) -> bool:
        return math.isfinite(self.max_diff) and self.max_diff <= self.tolerance


def check_ids(tokenizer) -> torch.Tensor:
    """A fixed prompt (a short chat through the tokenizer's template) as one batch of token ids."""
    text, _ = render(tokenizer, CHECK_CONVERSATION)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def compare_logits(reference: torch.Tensor, other: torch.Tensor, relative: float) -> LogitCheck:
    reference, other = reference.float(), other.float()
    scale = float(reference.abs().max())
    return LogitCheck(float((reference - other).abs().max()), relative * max(scale, 1.0), scale)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits.float().cpu()


def _check_output_dir(out: Path, overwrite: bool, flag: str = "--output_dir") -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{flag} {out}: is not empty; choose another directory or pass --overwrite")


def _check_output_file(path: Path, overwrite: bool, flag: str) -> None:
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file name")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path}: exists; choose another name or pass --overwrite")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: the directory {path.parent} does not exist")


# ---------------------------------------------------------------------------------------------------- merge


def merge(
    adapter: str, output_dir: str, *, base_model: str = "", dtype: str = "bfloat16", overwrite=False
) -> dict:
    """Fold a LoRA adapter into its base and save the full model; fail unless the logits match."""
    from peft import PeftModel

    if not Path(adapter).expanduser().is_dir():
        raise UserError(f"--adapter {adapter}: no such directory")
    source = resolve(adapter, flag="--adapter", base_model=base_model)
    if source.adapter is None:
        raise UserError(
            f"--adapter {adapter}: holds full weights, not a LoRA adapter (no adapter_config.json); "
            "there is nothing to merge: convert or serve it as it is"
        )
    out = Path(output_dir).expanduser()
    _check_output_dir(out, overwrite)
    if out.resolve() == source.adapter.resolve():
        raise UserError(f"--output_dir {out}: is the adapter's own directory; choose another one")
    config = base_config(source, "--adapter")
    refuse_prequantized(source, config, "merging into 4-bit weights would round the fine-tune away")
    check_adapter_fits(source, config, "--adapter")
    tokenizer = load_tokenizer_for(source, "--adapter")

    device, torch_dtype = inference_placement(dtype)
    if source.run_method == "qlora":
        print(f"QLoRA adapter: merging onto the unquantized base in {dtype}", flush=True)
    print(f"loading {source.base} ({dtype}, {device}) and the adapter {source.adapter}", flush=True)
    model = load_causal_lm(source.base, "--base_model", dtype=torch_dtype).to(device)
    model = PeftModel.from_pretrained(model, str(source.adapter))
    model.eval()

    ids = check_ids(tokenizer)
    with_adapter = _logits(model, ids)
    with model.disable_adapter():
        base_only = _logits(model, ids)
    merged = model.merge_and_unload()
    check = compare_logits(with_adapter, _logits(merged, ids), MERGE_TOLERANCE[dtype])
    effect = float((with_adapter - base_only).abs().max())
    print(
        f"logit check on a {ids.shape[1]}-token prompt: max |merged - base+adapter| = {check.max_diff:.3g} "
        f"(allowed {check.tolerance:.3g}); the adapter moves logits by up to {effect:.3g}",
        flush=True,
    )
    if not check.ok:
        raise UserError(
            f"merge check failed: the merged model's logits differ from base+adapter by {check.max_diff:.3g} "
            f"(allowed {check.tolerance:.3g} in {dtype}); nothing was written",
            exit_code=1,
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        merged.config.use_cache = True
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged model ({dtype}) written to {out}", flush=True)
    return {
        "output_dir": str(out),
        "base": source.base,
        "adapter": str(source.adapter),
        "dtype": dtype,
        "max_logit_diff": check.max_diff,
        "tolerance": check.tolerance,
        "adapter_effect": effect,
    }


# ---------------------------------------------------------------------------------------------------- gguf


def _local_model(spec: str, flag: str) -> tuple[Path, object]:
    source = resolve(spec, flag=flag)
    if source.adapter is not None:
        raise UserError(
            f"{flag} {spec}: is a LoRA adapter; merge it into its base first: "
            f"export.py merge --adapter {spec} --output_dir MERGED_DIR"
        )
    path = Path(source.base).expanduser()
    if not path.is_dir():
        raise UserError(
            f"{flag} {spec}: pass a local model directory (download it with `hf download {spec}`)"
        )
    try:
        config = load_model_config(str(path))
    except UserError as exc:
        raise with_flag(exc, flag) from None
    if is_prequantized(config):
        raise UserError(f"{flag} {spec}: holds 4-bit (bitsandbytes) weights; convert the unquantized model")
    return path, config


def _rope(config) -> tuple[float, dict | None]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    return theta, (params if kind not in (None, "default") else None)


def llama3_rope_factors(config, theta: float, scaling: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's RoPE scaling, as llama.cpp stores them (rope_freqs.weight)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half RoPE layout → GGML's interleaved one (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"--model {path}: no model.safetensors (or index); save the model with safetensors")


def _tokenizer_metadata(path: Path, config):
    """gguf tokens, token types and pre-tokenizer name for a byte-level BPE (Llama 3 style) tokenizer."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UserError(f"--model {path}: no tokenizer.json (a fast tokenizer is needed)")
    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    if spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise UserError(
            f"--model {path}: the built-in converter writes byte-level BPE vocabularies (Llama 3) only; "
            "put llama.cpp's convert_hf_to_gguf.py on PATH for this model"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(config.vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    # llama.cpp picks its pre-tokenizer regex by name; Llama 3's split is "llama-bpe".
    pre = "llama-bpe" if r"\p{N}{1,3}" in json.dumps(spec.get("pre_tokenizer")) else "default"
    return tokens, types, pre, tokenizer.chat_template


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    source: str | None  # the HF tensor, or None for a computed one
    permute_heads: int | None = None


def _plan_tensors(path: Path, config, outtype: str, extra: dict[str, np.ndarray]) -> list[_Planned]:
    import gguf
    from safetensors import safe_open

    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    wide = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16}
    planned = []
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise UserError(f"--model {path}: cannot map tensor {key} to a llama.cpp name")
                shape = tuple(handle.get_slice(key).get_shape())
                if len(shape) == 1:
                    qtype = gguf.GGMLQuantizationType.F32
                elif outtype == "q8_0" and shape[-1] % 32 == 0:
                    qtype = gguf.GGMLQuantizationType.Q8_0
                else:  # q8_0 falls back to F16 for rows that are not whole 32-value blocks, as llama.cpp does
                    qtype = wide.get(outtype, gguf.GGMLQuantizationType.F16)
                permute = None
                if name.endswith("attn_q.weight"):
                    permute = heads
                elif name.endswith("attn_k.weight"):
                    permute = kv_heads or heads
                planned.append(_Planned(name, shape, qtype, key, permute))
    for name, array in extra.items():
        planned.append(_Planned(name, tuple(array.shape), gguf.GGMLQuantizationType.F32, None))

    def order(t: _Planned):
        parts = t.name.split(".")
        if parts[0] == "blk":
            return (1, int(parts[1]), t.name)
        return (0 if parts[0] == "token_embd" else 2, 0, t.name)

    return sorted(planned, key=order)


def _encode_tensor(array: np.ndarray, qtype) -> np.ndarray:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


def write_gguf(path: Path, config, outfile: Path, outtype: str) -> int:
    """Write the GGUF file with the `gguf` package, one tensor at a time; return the number of tensors."""
    import gguf
    from safetensors import safe_open

    if config.model_type != "llama":
        raise UserError(
            f"--model {path}: the built-in converter handles the Llama architecture only (this is "
            f"{config.model_type}); put llama.cpp's convert_hf_to_gguf.py on PATH"
        )
    theta, scaling = _rope(config)
    extra = {}
    if scaling is not None:
        if scaling.get("rope_type") != "llama3":
            raise UserError(
                f"--model {path}: RoPE scaling {scaling.get('rope_type')!r} is not supported by the built-in "
                "converter; put llama.cpp's convert_hf_to_gguf.py on PATH"
            )
        extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = llama3_rope_factors(
            config, theta, scaling
        )
    tokens, token_types, pre, chat_template = _tokenizer_metadata(path, config)
    planned = _plan_tensors(path, config, outtype, extra)
    file_type = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(path.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    special = gguf.SpecialVocab(path, load_merges=True, n_vocab=config.vocab_size)
    if special.chat_template is None:  # gguf < 0.18 does not read chat_template.jinja
        special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)
    for special, method in (("<|eot_id|>", writer.add_eot_token_id), ("<|eom_id|>", writer.add_eom_token_id)):
        if special in tokens:
            method(tokens.index(special))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    for tensor in planned:
        if tensor.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if tensor.qtype == gguf.GGMLQuantizationType.F32 else np.float16
            nbytes = int(np.prod(tensor.shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(dtype), nbytes)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(tensor.shape, tensor.qtype)
            writer.add_tensor_info(
                tensor.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=tensor.qtype
            )

    handles = {}
    try:
        for file in _weight_files(path):
            handles[file] = safe_open(str(file), framework="pt")
        where = {key: h for h in handles.values() for key in h.keys()}  # noqa: SIM118
        writer.write_header_to_file(outfile)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in planned:
            if tensor.source is None:
                array = extra[tensor.name]
            else:
                array = where[tensor.source].get_tensor(tensor.source).float().numpy()
            if tensor.permute_heads:
                array = _permute_rows(array, tensor.permute_heads)
            writer.write_tensor_data(_encode_tensor(array, tensor.qtype))
    finally:
        writer.close()
        handles.clear()
    return len(planned)


def _llama_cpp_converter() -> str | None:
    return shutil.which("convert_hf_to_gguf.py") or shutil.which("convert_hf_to_gguf")


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_back(outfile: Path, config, tokenizer) -> dict:
    """Open the GGUF file and check its tensors and metadata against the source model."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(outfile))
    except Exception as exc:  # the reader raises several types for a damaged file
        raise UserError(f"the GGUF file cannot be read back ({exc})", exit_code=1) from None
    names = {t.name for t in reader.tensors}
    layer_tensors = (
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    )
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{t}.weight" for i in range(config.num_hidden_layers) for t in layer_tensors
    }
    if not getattr(config, "tie_word_embeddings", False):
        expected.add("output.weight")
    missing = sorted(expected - names)
    checks = {
        "general.architecture": (_field(reader, "general.architecture"), "llama"),
        "llama.block_count": (_field(reader, "llama.block_count"), config.num_hidden_layers),
        "llama.embedding_length": (_field(reader, "llama.embedding_length"), config.hidden_size),
        "llama.attention.head_count": (
            _field(reader, "llama.attention.head_count"),
            config.num_attention_heads,
        ),
        "tokenizer.ggml.model": (_field(reader, "tokenizer.ggml.model"), "gpt2"),
    }
    wrong = [f"{k} is {got!r}, expected {want!r}" for k, (got, want) in checks.items() if got != want]
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None or len(tokens) != config.vocab_size:
        wrong.append(
            f"tokenizer.ggml.tokens has {0 if tokens is None else len(tokens)} entries, expected {config.vocab_size}"
        )
    if tokenizer.chat_template and _field(reader, "tokenizer.chat_template") != tokenizer.chat_template:
        wrong.append("tokenizer.chat_template differs from the tokenizer's")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    if tokenizer.eos_token_id is not None and eos != tokenizer.eos_token_id:
        wrong.append(f"tokenizer.ggml.eos_token_id is {eos}, expected {tokenizer.eos_token_id}")
    if missing or wrong:
        problems = (
            [f"missing tensors {', '.join(missing[:5])}" + (" …" if len(missing) > 5 else "")]
            if missing
            else []
        ) + wrong
        raise UserError(f"the GGUF file failed its read-back check: {'; '.join(problems)}", exit_code=1)
    return {"tensors": len(reader.tensors), "metadata_keys": len(reader.fields)}


def compare_with_source(
    outfile: Path, path: Path, config, tokenizer, outtype: str
) -> tuple[LogitCheck, LogitCheck] | str:
    """Load the GGUF file with transformers (its own reader, which undoes llama.cpp's Q/K permutation) and
    compare it with the source model: every weight, and the logits on a fixed prompt. Or say why not."""
    from transformers import AutoModelForCausalLM

    _, scaling = _rope(config)
    # transformers' GGUF reader ignores rope_freqs.weight: give it the source config when RoPE is scaled.
    kwargs = {"config": config} if scaling is not None else {}
    try:
        from_gguf = AutoModelForCausalLM.from_pretrained(
            str(outfile.parent), gguf_file=outfile.name, dtype=torch.float32, **kwargs
        )
    except Exception as exc:  # no gguf support, an unsupported tensor type, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"transformers cannot load it ({reason})"
    source = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    converted = from_gguf.state_dict()
    worst = LogitCheck(0.0, WEIGHT_TOLERANCE[outtype], 0.0)
    for name, weight in source.state_dict().items():
        if name not in converted:
            continue
        scale = float(weight.abs().max()) or 1.0
        diff = float((converted[name].float() - weight).abs().max()) / scale
        if not diff <= worst.max_diff:
            worst = LogitCheck(diff, WEIGHT_TOLERANCE[outtype], scale)
    ids = check_ids(tokenizer)
    logits = compare_logits(_logits(source, ids), _logits(from_gguf, ids), GGUF_TOLERANCE[outtype])
    return worst, logits


def to_gguf(
    model: str, outfile: str, *, outtype: str = "f16", converter="auto", check_logits=True, overwrite=False
) -> dict:
    path, config = _local_model(model, "--model")
    target = Path(outfile).expanduser()
    _check_output_file(target, overwrite, "--outfile")
    tokenizer = load_tokenizer_for(resolve(str(path), flag="--model"), "--model")
    tmp = target.with_name(f".{target.name}.partial")
    tmp.unlink(missing_ok=True)
    external = _llama_cpp_converter() if converter in ("auto", "llama.cpp") else None
    if converter == "llama.cpp" and external is None:
        raise UserError("--converter llama.cpp: convert_hf_to_gguf.py is not on PATH")
    try:
        if external:
            print(f"converting with {external}", flush=True)
            done = subprocess.run([external, str(path), "--outfile", str(tmp), "--outtype", outtype])
            if done.returncode != 0:
                raise UserError(f"{external} failed with exit code {done.returncode}", exit_code=1)
        else:
            print(f"converting {path} to GGUF ({outtype}) with the gguf package", flush=True)
            write_gguf(path, config, tmp, outtype)
        report = read_back(tmp, config, tokenizer)
        compared = (
            compare_with_source(tmp, path, config, tokenizer, outtype) if check_logits else "turned off"
        )
        logits = None
        if isinstance(compared, tuple):
            weights, logits = compared
            print(
                f"check against the source: weights within {weights.max_diff:.3g} of their largest value "
                f"(allowed {weights.tolerance:.3g}); logits within {logits.max_diff:.3g} "
                f"(allowed {logits.tolerance:.3g}, largest logit {logits.scale:.3g})",
                flush=True,
            )
            for what, check in (("weights", weights), ("logits", logits)):
                if not check.ok:
                    raise UserError(
                        f"GGUF check failed: its {what} differ from the source model's by {check.max_diff:.3g} "
                        f"(allowed {check.tolerance:.3g} for {outtype}); nothing was written",
                        exit_code=1,
                    )
        else:
            print(f"weight and logit check skipped: {compared}", flush=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    size = target.stat().st_size
    print(f"{target}: {size / 2**20:,.1f} MiB, {report['tensors']} tensors, {outtype}", flush=True)
    return {
        "outfile": str(target),
        "bytes": size,
        "outtype": outtype,
        "converter": external or "gguf package",
        **report,
        "max_logit_diff": logits.max_diff if logits else None,
    }


# ---------------------------------------------------------------------------------------------------- ollama

LLAMA3_TEMPLATE = """\
{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""

# data.py's Alpaca prompt, which the SFT scripts use for models without a chat template.
ALPACA_TEMPLATE = """\
{{ if .System }}{{ .System }}{{ else }}Below is an instruction that describes a task. Write a response that \
appropriately completes the request.{{ end }}

### Instruction:
{{ .Prompt }}

### Response:
"""

GENERIC_TEMPLATE = """\
{{- if .System }}{{ .System }}

{{ end }}
{{- range .Messages }}
{{- if ne .Role "system" }}{{ .Role }}: {{ .Content }}
{{ end }}
{{- end }}assistant: """


def template_for(chat_template: str | None) -> tuple[str, str, list[str]]:
    """(kind, Go template, stop strings it implies) for a tokenizer's Jinja chat template."""
    if not chat_template:
        return "alpaca", ALPACA_TEMPLATE, ["### Instruction:"]
    if all(marker in chat_template for marker in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")):
        return "llama3", LLAMA3_TEMPLATE, ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    return "generic", GENERIC_TEMPLATE, []


def _stop_tokens(path: Path, tokenizer) -> list[str]:
    ids = []
    generation = path / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    stops += [tokenizer.convert_ids_to_tokens(i) for i in ids if isinstance(i, int)]
    return stops


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise UserError(f'{what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def write_modelfile(gguf_file: str, model: str, outfile: str, *, system: str = "", overwrite=False) -> dict:
    gguf_path = Path(gguf_file).expanduser()
    if not gguf_path.is_file():
        raise UserError(f"--gguf {gguf_file}: no such file")
    with gguf_path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise UserError(f"--gguf {gguf_file}: not a GGUF file")
    source = resolve(model, flag="--model")
    tokenizer = load_tokenizer_for(source, "--model")
    target = Path(outfile).expanduser()
    _check_output_file(target, overwrite, "--outfile")

    kind, template, implied = template_for(tokenizer.chat_template)
    if kind == "generic":
        print(
            "note: the chat template is not a Llama 3 one; the Modelfile gets a generic TEMPLATE. "
            "Check it against the model's prompt format before serving.",
            file=sys.stderr,
        )
    stops = list(dict.fromkeys(_stop_tokens(Path(source.base), tokenizer) + implied))
    relative = os.path.relpath(gguf_path.resolve(), target.parent.resolve())
    location = str(gguf_path.resolve()) if relative.startswith("..") else f"./{relative}"
    lines = [f"FROM {location}", "", f"TEMPLATE {_quoted(template, 'the template')}", ""]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops if s]
    if system:
        lines += ["", f"SYSTEM {_quoted(system, '--system')}"]
    text = "\n".join(lines) + "\n"
    tmp = target.with_name(f".{target.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    print(
        f"{target} written ({kind} template); create the model with: ollama create NAME -f {target}",
        flush=True,
    )
    return {"outfile": str(target), "template": kind, "stop": stops, "from": location}
