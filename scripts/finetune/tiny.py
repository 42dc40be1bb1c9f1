"""Build a tiny, randomly initialised Llama-style causal LM and tokenizer, offline and reproducibly.

The result is a stand-in for a real Llama 3.x Instruct checkpoint in tests and demos: same architecture
family, Llama 3 special tokens and chat layout, no pad token, every projection a multiple of 64 as in real
models, but only about half a million parameters and a 1024-entry byte-level BPE vocabulary trained on a
small bundled corpus.

    python -m finetune.tiny OUT_DIR

Building twice in the same environment yields byte-identical files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError, run_cli
from .outputs import replace_dir

BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
SPECIAL_TOKENS = (BOS, END_OF_TEXT, START_HEADER, END_HEADER, EOT)

VOCAB_SIZE = 1024
MAX_POSITIONS = 2048
SEED = 0

# Simplified Llama 3 template. Rendering messages[:i] with add_generation_prompt=True is a prefix of
# rendering messages[:i + 1] when message i is the assistant's, which is how assistant spans are located.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Llama 3's pre-tokenizer split. Unlike the GPT-2 default it keeps a run of newlines as one piece whatever
# follows, so the "\n\n" closing a generation prompt tokenizes the same as inside the full conversation.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS_PATH = Path(__file__).resolve().parent / "assets" / "tiny_corpus.txt"
MARKER_NAME = ".finetune-tiny.json"
_MARKER_BUILDER = "finetune.tiny"


@contextlib.contextmanager
def _scoped_env(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


# torch, tokenizers and transformers are imported inside the functions that need them, so that importing
# this module stays cheap and the CLI rejects a bad OUT_DIR without loading them.


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()


def _build_tokenizer():
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    corpus = CORPUS_PATH.read_text(encoding="utf-8").replace("\r\n", "\n")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        # All 256 byte symbols up front, so any text stays encodable and the base alphabet does not
        # depend on which characters happen to occur in the corpus.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Single-threaded, so no part of training can depend on thread scheduling.
    with _scoped_env(TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1"):
        tok.train_from_iterator([corpus], trainer=trainer)

    # Appended after training so they sit at the end of the vocabulary, as in Llama 3.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )

    # No pad token on purpose: real Llama 3 tokenizers have none, and the training code must cope.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        model_max_length=MAX_POSITIONS,
        # Byte-level BPE is lossless; the legacy clean-up would change spacing around punctuation.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build_model(tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        # Every projection a multiple of 64, as in real models (bitsandbytes' CPU kernels and GGUF's q8_0
        # blocks rely on it); grouped-query attention as in Llama 3: 4 query heads of 32 over 2 key/value heads.
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eot_id,
        pad_token_id=None,
        dtype="float32",
    )
    # fork_rng keeps the caller's global RNG state untouched when this runs inside a test or demo.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eot_id, do_sample=False)
    return model


def _is_own_output(path: Path) -> bool:
    try:
        marker = json.loads((path / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("builder") == _MARKER_BUILDER


def _check_target(out: Path) -> None:
    if out.is_symlink():
        raise UserError(f"{out} is a symbolic link; pass the real directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not _is_own_output(out):
        raise UserError(
            f"{out} is a non-empty directory not created by finetune.tiny; refusing to overwrite it"
        )


def _build_into(target: Path) -> int:
    with _quiet_transformers():
        tokenizer = _build_tokenizer()
        model = _build_model(tokenizer)
        tokenizer.save_pretrained(target)
        model.save_pretrained(target)
    num_parameters = sum(p.numel() for p in model.parameters())
    marker = {"builder": _MARKER_BUILDER, "format": 1, "num_parameters": num_parameters}
    (target / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return num_parameters


def _build(out_dir: str | os.PathLike[str]) -> tuple[Path, int]:
    out = Path(out_dir).expanduser().absolute()
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target so the final rename stays on one filesystem.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        num_parameters = _build_into(staging)
        staging.chmod(0o755)  # mkdtemp creates it 0700
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out, num_parameters


def build_tiny_model(out_dir: str | os.PathLike[str]) -> Path:
    """Build the tiny model and tokenizer into ``out_dir`` and return its absolute path.

    ``out_dir`` may be missing, empty, or a previous output of this function (replaced as a whole);
    anything else raises :class:`UserError`.
    """
    return _build(out_dir)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.tiny",
        description="Build a tiny random Llama-style model and tokenizer for tests and demos.",
    )
    parser.add_argument("out_dir", type=Path, help="directory to create (or a previous output to replace)")
    args = parser.parse_args(argv)

    def build() -> None:
        try:
            path, num_parameters = _build(args.out_dir)
        except OSError as exc:
            raise UserError(f"cannot write {args.out_dir}: {exc}", exit_code=1) from None
        print(f"{path} ({num_parameters:,} parameters)")

    run_cli(build)


if __name__ == "__main__":
    main()
