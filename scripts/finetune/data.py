"""Data: load rows (hub or local files), detect their format, render them as text, mask, split, collate.

Every row becomes a conversation (a list of role/content messages) or plain text. Conversations are rendered
with the tokenizer's chat template when it has one, else with the Alpaca prompt. Loss is on assistant tokens
only (unless --train_on_prompt): the character spans of assistant turns are mapped onto tokens via offsets,
so any chat template works without special markers.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import DEFAULT_DATASET, DEFAULT_DATASET_ROWS, TrainConfig
from .errors import UserError

IGNORE_INDEX = -100
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

ALPACA_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

# Columns that identify each format, in detection order.
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class Row:
    values: dict
    where: str  # "file:line" or "dataset[index]", for error messages


# ---------------------------------------------------------------------------------------------------- loading


def _looks_local(spec: str) -> bool:
    return (
        Path(spec).expanduser().exists() or spec.endswith(LOCAL_SUFFIXES) or spec.startswith(("/", ".", "~"))
    )


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(value, dict):
                raise UserError(
                    f"{path}:{number}: expected a JSON object per line, got {type(value).__name__}"
                )
            rows.append(Row(value, f"{path}:{number}"))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(value, dict):  # {"train": [...]} or {"data": [...]}
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a list of rows, or an object holding one list of rows")
        value = lists[0]
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UserError(f"{path}: expected a list of JSON objects")
    return [Row(v, f"{path}[{i}]") for i, v in enumerate(value)]


def _read_csv(path: Path) -> list[Row]:
    with path.open(encoding="utf-8", newline="") as handle:
        # Line 1 is the header, so data row i sits on line i + 2 (for files without multi-line cells).
        return [Row(dict(r), f"{path}:{i + 2}") for i, r in enumerate(csv.DictReader(handle))]


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    return [Row(v, f"{path}[{i}]") for i, v in enumerate(table.to_pylist())]


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _load_local(spec: str, flag: str) -> list[Row]:
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{flag} {spec}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in READERS)
        if not files:
            raise UserError(f"{flag} {spec}: the directory holds no {'/'.join(LOCAL_SUFFIXES)} files")
    elif path.suffix in READERS:
        files = [path]
    else:
        raise UserError(f"{flag} {spec}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
    return [row for file in files for row in READERS[file.suffix](file)]


def _load_hub(spec: str, flag: str, limit: int | None) -> list[Row]:
    import datasets

    split = f"train[:{limit}]" if limit else "train"
    try:
        dataset = datasets.load_dataset(spec, split=split)
    except Exception as exc:  # datasets raises many types (offline, not found, gated, network)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{flag} {spec}: could not load it from the Hugging Face hub ({reason}). To work offline, pass a local "
            f"file (--dataset data.jsonl) or download the dataset once and set HF_HUB_OFFLINE=1"
        ) from None
    return [Row(dict(v), f"{spec}[{i}]") for i, v in enumerate(dataset)]


def load_rows(spec: str, *, flag: str = "--dataset", limit: int | None = None) -> list[Row]:
    rows = _load_local(spec, flag) if _looks_local(spec) else _load_hub(spec, flag, limit)
    return rows[:limit] if limit else rows


# ---------------------------------------------------------------------------------------------------- formats


def detect_format(
    rows: list[Row], requested: str, source: str, formats: dict = FORMAT_COLUMNS, unknown: str = ""
) -> str:
    """The format whose columns the first row has (`formats` maps a name to its columns, in detection order).

    `unknown` replaces the default explanation when no format fits.
    """
    if not rows:
        raise UserError(f"{source}: the dataset is empty")
    columns = set(rows[0].values)
    found = ", ".join(sorted(columns)) or "none"
    if requested != "auto":
        missing = [c for c in formats[requested] if c not in columns]
        if missing:
            raise UserError(
                f"{source}: format {requested} needs column(s) {', '.join(missing)}; found {found}"
            )
        return requested
    for name, needed in formats.items():
        if all(c in columns for c in needed):
            return name
    expected = "; ".join(f"{name}: {'+'.join(cols)}" for name, cols in formats.items())
    raise UserError(
        f"{source}: "
        + (
            unknown.format(found=found)
            or f"cannot tell the dataset format from its columns ({found}); expected one of [{expected}], "
            "or pass --dataset_format"
        )
    )


def _require(row: Row, key: str, kind: type):
    if key not in row.values or row.values[key] is None:
        raise UserError(f"{row.where}: missing column {key!r}")
    value = row.values[key]
    if not isinstance(value, kind):
        raise UserError(f"{row.where}: column {key!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


def _check_messages(row: Row, messages: list) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or not isinstance(m.get("role"), str)
        ):
            raise UserError(f"{row.where}: message {i} needs string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{row.where}: the conversation has no assistant message to learn from")
    return out


def to_example(row: Row, fmt: str) -> list[dict] | str:
    """A row as a conversation (list of messages) or, for the text format, a string."""
    if fmt == "text":
        return _require(row, "text", str)
    if fmt == "alpaca":
        instruction = _require(row, "instruction", str)
        extra = row.values.get("input") or ""
        user = f"{instruction}\n\n### Input:\n{extra}" if extra.strip() else instruction
        return [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _require(row, "output", str)},
        ]
    if fmt == "messages":
        return _check_messages(row, _require(row, "messages", list))
    turns = _require(row, "conversations", list)
    messages = []
    for i, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(turn.get("from", "") if isinstance(turn, dict) else "")
        if role is None or not isinstance(turn.get("value"), str):
            raise UserError(f"{row.where}: turn {i} needs 'from' (human/gpt/system) and a string 'value'")
        messages.append({"role": role, "content": turn["value"]})
    return _check_messages(row, messages)


# ---------------------------------------------------------------------------------------------------- rendering


def _render_alpaca(messages: list[dict], bos: str, eos: str) -> tuple[str, list[tuple[int, int]]]:
    """The Alpaca prompt, extended turn by turn for multi-turn conversations."""
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    first_user = next((m["content"] for m in messages if m["role"] == "user"), "")
    header = system or (ALPACA_HEADER_WITH_INPUT if "### Input:" in first_user else ALPACA_HEADER)
    text, spans = f"{bos}{header}\n\n", []
    for m in messages:
        if m["role"] == "user":
            text += f"### Instruction:\n{m['content']}\n\n### Response:\n"
        elif m["role"] == "assistant":
            start = len(text)
            text += f"{m['content']}{eos}"
            spans.append((start, len(text)))
            text += "\n\n"
    return text.rstrip("\n"), spans


def _render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render with the chat template; assistant spans come from rendering each prefix of the conversation."""

    def render(msgs, generation_prompt=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    text = render(messages)
    spans, search_from = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, through = render(messages[:i], True) if i else "", render(messages[: i + 1])
        if i and text.startswith(through) and through.startswith(prompt):
            spans.append((len(prompt), len(through)))
        else:
            # Templates that rewrite earlier turns (e.g. dropping reasoning) break the prefix property:
            # fall back to locating the answer text itself, plus the end-of-turn token right after it.
            start = text.find(m["content"].strip(), search_from)
            if start < 0:
                continue
            end = start + len(m["content"].strip())
            eos = tokenizer.eos_token or ""
            if eos and text.startswith(eos, end):
                end += len(eos)
            spans.append((start, end))
        search_from = spans[-1][1]
    return text, spans


def render(tokenizer, example: list[dict] | str) -> tuple[str, list[tuple[int, int]] | None]:
    """Text for one example and the character spans that carry loss (None: all of it)."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    if isinstance(example, str):
        return f"{bos}{example}{eos}", None
    if tokenizer.chat_template:
        return _render_chat(tokenizer, example)
    return _render_alpaca(example, bos, eos)


def tokenize(tokenizer, text: str, spans, train_on_prompt: bool) -> dict:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if spans is None or train_on_prompt:
        labels = list(ids)
    else:
        labels = [
            token if any(s < span_end and e > span_start for span_start, span_end in spans) else IGNORE_INDEX
            for token, (s, e) in zip(ids, encoded["offset_mapping"], strict=True)
        ]
    return {"input_ids": ids, "labels": labels}


# ---------------------------------------------------------------------------------------------------- pipeline


@dataclass
class DataStats:
    format: str
    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)


def build_examples(rows: list[Row], fmt: str, tokenizer, cfg: TrainConfig) -> tuple[list[dict], DataStats]:
    stats = DataStats(format=fmt, rows=len(rows))
    examples = []
    for row in rows:
        text, spans = render(tokenizer, to_example(row, fmt))
        example = tokenize(tokenizer, text, spans, cfg.train_on_prompt)
        if len(example["input_ids"]) > cfg.seq_length:
            stats.truncated += 1
            example = {k: v[: cfg.seq_length] for k, v in example.items()}
        # The first label never gets a prediction; masking it also keeps packed sequences from
        # predicting across the boundary with the previous one.
        example["labels"][0] = IGNORE_INDEX
        trainable = sum(label != IGNORE_INDEX for label in example["labels"])
        if trainable == 0:
            stats.dropped += 1
            continue
        examples.append(example)
        stats.tokens += len(example["input_ids"])
        stats.trainable_tokens += trainable
        stats.lengths.append(len(example["input_ids"]))
    return examples, stats


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    train_stats: DataStats
    eval_stats: DataStats | None
    source: str


@dataclass
class RowSplits:
    """Rows for training and evaluation, with where they came from and their formats."""

    source: str
    format: str
    train: list[Row]
    eval_source: str
    eval_format: str
    eval: list[Row]


def load_splits(cfg: TrainConfig, default_dataset: str = DEFAULT_DATASET, detect=detect_format) -> RowSplits:
    """--dataset (or the default hub dataset) and its evaluation rows: --eval_dataset, or a seeded --eval_split."""
    if cfg.uses_default_dataset:
        source, limit = default_dataset, cfg.dataset_size or DEFAULT_DATASET_ROWS
    else:
        source, limit = cfg.dataset, cfg.dataset_size
    rows = load_rows(source, limit=limit)
    fmt = detect(rows, cfg.dataset_format, source)
    if cfg.eval_dataset:
        eval_rows = load_rows(cfg.eval_dataset, flag="--eval_dataset")
        eval_fmt = detect(eval_rows, cfg.dataset_format, cfg.eval_dataset)
        return RowSplits(source, fmt, rows, cfg.eval_dataset, eval_fmt, eval_rows)
    if cfg.eval_split == 0:
        return RowSplits(source, fmt, rows, source, fmt, [])
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = max(1, round(len(rows) * cfg.eval_split))
    if n_eval >= len(rows):
        raise UserError(
            f"--eval_split {cfg.eval_split}: {source} has only {len(rows)} rows, none left to train"
        )
    held_out = set(order[:n_eval])
    train = [r for i, r in enumerate(rows) if i not in held_out]
    return RowSplits(source, fmt, train, source, fmt, [r for i, r in enumerate(rows) if i in held_out])


def _examples_or_error(rows, fmt, tokenizer, cfg, source, what) -> tuple[list[dict], DataStats]:
    examples, stats = build_examples(rows, fmt, tokenizer, cfg)
    if not examples:
        raise UserError(
            f"{source}: no {what} example has a response token within --seq_length {cfg.seq_length} "
            f"({stats.rows} rows, {stats.truncated} truncated); raise --seq_length or check the data"
        )
    return examples, stats


def prepare_data(
    cfg: TrainConfig, tokenizer, *, default_dataset: str = DEFAULT_DATASET, detect=detect_format, build=None
) -> PreparedData:
    """Training and evaluation examples. Another recipe (DPO) passes its own default dataset, format detection,
    and `build(rows, fmt, tokenizer, cfg, source, what) -> (examples, stats)`, which raises when none is left."""
    build = build or _examples_or_error
    splits = load_splits(cfg, default_dataset, detect)
    train, train_stats = build(splits.train, splits.format, tokenizer, cfg, splits.source, "training")
    evaluation, eval_stats = [], None
    if splits.eval:
        evaluation, eval_stats = build(
            splits.eval, splits.eval_format, tokenizer, cfg, splits.eval_source, "evaluation"
        )
    return PreparedData(train, evaluation, train_stats, eval_stats, splits.source)


# ---------------------------------------------------------------------------------------------------- batches


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of examples grouped into rows of at most `capacity` tokens, best-fit decreasing: each example,
    longest first, goes into the fullest row it still fits in (an example longer than `capacity` gets its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[index]]
        if fits:
            best = min(fits, key=lambda r: room[r])
            rows[best].append(index)
            room[best] -= lengths[index]
        else:
            rows.append([index])
            room.append(capacity - lengths[index])
    return rows


def token_batches(examples: list[dict], budget: int) -> list[list[dict]]:
    """Micro-batches of at most `budget` tokens each (best-fit decreasing), for --batch_tokens; the Trainer
    draws them one at a time, in a new random order each epoch."""
    groups = pack_rows([len(e["input_ids"]) for e in examples], budget)
    return [[examples[i] for i in group] for group in groups]


@dataclass
class Collator:
    """Builds batches either packed (padding-free, per-example position ids) or right-padded.

    Packed examples go into rows of at most `row_length` tokens, or into one row when it is None or when
    `flat` (the attention reads the examples' boundaries from the position ids: finetune.attention.flat_rows).
    Short rows are filled up with padding tokens, each at position 0 with no label, so each attends only to
    itself and none to an example."""

    pad_token_id: int
    packing: bool
    row_length: int | None = None
    flat: bool = False

    def __call__(self, features: list) -> dict:
        if features and isinstance(
            features[0], list
        ):  # micro-batches from token_batches, drawn one at a time
            features = [f for group in features for f in group]
        if self.packing:
            # Position ids restarting at 0 tell the attention where each example begins, so packed examples
            # never attend to each other.
            lengths = [len(f["input_ids"]) for f in features]
            groups = pack_rows(lengths, self.row_length) if self.row_length else [list(range(len(features)))]
            if self.flat:
                groups = [[i for group in groups for i in group]]
            width = max(sum(lengths[i] for i in group) for group in groups)
            ids, labels, positions = [], [], []
            for group in groups:
                fill = width - sum(lengths[i] for i in group)
                ids.append([t for i in group for t in features[i]["input_ids"]] + [self.pad_token_id] * fill)
                labels.append([t for i in group for t in features[i]["labels"]] + [IGNORE_INDEX] * fill)
                positions.append([p for i in group for p in range(lengths[i])] + [0] * fill)
            return {
                "input_ids": torch.tensor(ids),
                "labels": torch.tensor(labels),
                "position_ids": torch.tensor(positions),
            }
        width = max(len(f["input_ids"]) for f in features)

        def pad(values, fill):
            return values + [fill] * (width - len(values))

        return {
            "input_ids": torch.tensor([pad(f["input_ids"], self.pad_token_id) for f in features]),
            "labels": torch.tensor([pad(f["labels"], IGNORE_INDEX) for f in features]),
            "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features]),
        }


def real_tokens(batch: dict) -> tuple[int, int]:
    """(non-padding tokens, examples) in a collated batch. In packed rows a padding token is a piece of one
    token (position 0, the next not 1); no example is one token long, as its only label is masked."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum()), int(batch["input_ids"].shape[0])
    positions = batch["position_ids"]
    starts = positions == 0
    continued = torch.nn.functional.pad(positions[:, 1:] == 1, (0, 1), value=False)
    padding = int((starts & ~continued).sum())
    return int(positions.numel()) - padding, int(starts.sum()) - padding
