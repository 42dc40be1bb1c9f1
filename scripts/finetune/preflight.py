"""Memory pre-flight: before any weight is loaded, compare the estimated peak with the memory the run can have.

A run that would not fit is refused with one line: the estimate, the memory available, and the changes that
would make it fit (`--force` trains anyway). This matters most on unified-memory machines (DGX Spark), where an
allocation past capacity can stall the whole machine instead of raising out-of-memory.

What "available" means:
- a discrete GPU: its free memory (`torch.cuda.mem_get_info`);
- a unified-memory GPU (DGX Spark's GB10, Jetson; the GPU allocates from system memory): MemAvailable from
  /proc/meminfo, as on the CPU;
- the CPU: MemAvailable, against the estimate less what this process already holds.
Processes on one machine that share its system memory (torchrun on the CPU or on a unified-memory GPU) each
need their share. The estimate must fit in `USABLE_FRACTION` of what is available, for fragmentation and for
the rest of the system.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from .config import TrainConfig
from .data import DataStats
from .errors import UserError
from .memory import MemoryEstimate, estimate_run, resident_bytes
from .model import Placement, count_parameters
from .report import human_bytes

USABLE_FRACTION = 0.9
UNIFIED_MEMORY_DEVICES = ("GB10",)  # DGX Spark; integrated GPUs (Jetson) report is_integrated
MIN_SEQ_LENGTH = 128


@dataclass
class Available:
    bytes: int
    source: str  # what was measured, for messages
    system_memory: bool  # shared with the CPU side of this and every other process on the machine


@dataclass
class MemoryCheck:
    estimate: int
    needed: int  # what must still come from `available`
    available: Available
    fits: bool
    suggestions: list[str]

    def verdict(self) -> str:
        where = f"{human_bytes(self.available.bytes)} available ({self.available.source})"
        if self.fits:
            return f"fits: needs ~{human_bytes(self.needed)} of {where}"
        return f"does NOT fit: needs ~{human_bytes(self.needed)}, {where}; {self.remedy()}"

    def remedy(self) -> str:
        if self.suggestions:
            return f"it would fit with {' or '.join(self.suggestions)}"
        return "it does not fit even with --gradient_checkpointing, --batch_size 1 and QLoRA; use a larger device"

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "verdict": self.verdict()}


def meminfo_available() -> int:
    """MemAvailable from /proc/meminfo: what can be allocated without swapping (reclaimable cache included)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # Not Linux: total physical memory, the best this can do without psutil.
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def is_unified_memory(index: int = 0) -> bool:
    """A GPU that allocates from system memory: DGX Spark's GB10, or any integrated GPU."""
    props = torch.cuda.get_device_properties(index)
    return bool(getattr(props, "is_integrated", False)) or any(
        name in props.name for name in UNIFIED_MEMORY_DEVICES
    )


def available_memory(place: Placement) -> Available:
    if place.device == "cuda":
        index = place.local_rank
        name = torch.cuda.get_device_name(index)
        if is_unified_memory(index):
            return Available(meminfo_available(), f"system memory, unified with the {name}", True)
        free, _ = torch.cuda.mem_get_info(index)
        return Available(free, f"free memory on cuda:{index}, {name}", False)
    return Available(meminfo_available(), "system memory", True)


def _needed(estimate: MemoryEstimate, place: Placement, available: Available) -> int:
    needed = estimate.total
    if place.device != "cuda":
        needed -= resident_bytes()  # the process's own memory is already taken out of MemAvailable
    if available.system_memory:
        needed *= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(needed, 0)


def _fits(needed: int, available: Available) -> bool:
    return needed <= available.bytes * USABLE_FRACTION


def _suggestions(cfg: TrainConfig, plan: dict, stats: DataStats, place: Placement, available: Available):
    """The single changes (or, failing those, one combination) under which the estimate fits."""
    total, trainable = plan["parameters"], plan["trainable_parameters"]
    model_config = plan["model_config"]
    examples = plan["steps"] * plan["examples_per_step"]

    def fits(changed: TrainConfig, trainable_params: int = trainable) -> bool:
        estimate = estimate_run(changed, model_config, stats, place, total, trainable_params, examples)
        return _fits(_needed(estimate, place, available), available)

    found = []
    if not cfg.gradient_checkpointing and fits(dataclasses.replace(cfg, gradient_checkpointing=True)):
        found.append("--gradient_checkpointing")
    batch = cfg.batch_size // 2
    while batch >= 1 and not fits(dataclasses.replace(cfg, batch_size=batch)):
        batch //= 2
    if batch >= 1:  # the same examples per optimizer step
        accumulation = cfg.gradient_accumulation_steps * cfg.batch_size // batch
        found.append(f"--batch_size {batch} --gradient_accumulation_steps {accumulation}")
    seq = cfg.seq_length // 2
    while seq >= MIN_SEQ_LENGTH and not fits(dataclasses.replace(cfg, seq_length=seq)):
        seq //= 2
    if seq >= MIN_SEQ_LENGTH:
        found.append(f"--seq_length {seq}")
    qlora, qlora_trainable = dataclasses.replace(cfg, method="qlora"), trainable
    if cfg.method != "qlora":
        if not cfg.uses_lora:
            qlora_trainable = count_parameters(qlora, model_config)[1]
        if fits(qlora, qlora_trainable):
            found.append("QLoRA (llama3_70b_qlora.py with the same --model_name)")
    ranks = ranks_to_fit(cfg, plan, stats, place, available)
    if ranks:
        found.append(
            f"--shard on {ranks} ranks ({ranks} GPUs, or {ranks} machines like this one, with torchrun)"
        )
    if found:
        return found
    smallest = dataclasses.replace(qlora, gradient_checkpointing=True, batch_size=1)
    if fits(smallest, qlora_trainable):
        qlora_text = " with QLoRA" if cfg.method != "qlora" else ""
        return [f"--gradient_checkpointing --batch_size 1{qlora_text}"]
    return []


MAX_RANKS = 64


def ranks_to_fit(
    cfg: TrainConfig, plan: dict, stats: DataStats, place: Placement, available: Available
) -> int | None:
    """The fewest ranks, each with memory like this process's, on which the run fits with every weight sharded
    (--shard); None when sharding cannot help (4-bit QLoRA is not sharded) or even MAX_RANKS are not enough."""
    if cfg.method == "qlora":
        return None
    sharded = dataclasses.replace(cfg, shard=True)
    examples = plan["steps"] * plan["examples_per_step"]
    current = int(os.environ.get("WORLD_SIZE", "1")) if cfg.shard else 1
    for ranks in range(current + 1, MAX_RANKS + 1):
        estimate = estimate_run(
            sharded, plan["model_config"], stats, place, plan["parameters"], plan["trainable_parameters"],
            examples, ranks=ranks,
        )  # fmt: skip
        # One rank per GPU or machine: no other rank of the run shares this memory.
        needed = estimate.total - (resident_bytes() if place.device != "cuda" else 0)
        if _fits(needed, available):
            return ranks
    return None


def check_memory(cfg: TrainConfig, plan: dict, stats: DataStats, place: Placement) -> MemoryCheck:
    """Compare the plan's estimate with the memory available to this process (suggestions only if it won't fit)."""
    estimate = MemoryEstimate(**{k: v for k, v in plan["memory_estimate"].items() if k != "total"})
    available = available_memory(place)
    needed = _needed(estimate, place, available)
    fits = _fits(needed, available)
    suggestions = [] if fits else _suggestions(cfg, plan, stats, place, available)
    return MemoryCheck(estimate.total, needed, available, fits, suggestions)


def enforce(check: MemoryCheck, cfg: TrainConfig) -> None:
    """Refuse a run that will not fit, unless --force."""
    if check.fits:
        return
    if cfg.force:
        print(f"warning: --force given, training although the run {check.verdict()}", flush=True)
        return
    held = f" on top of what it holds now (estimated peak {human_bytes(check.estimate)})"
    raise UserError(
        f"not enough memory: the run needs ~{human_bytes(check.needed)}{held if check.estimate != check.needed else ''}, but "
        f"{human_bytes(check.available.bytes)} is available ({check.available.source}), of which "
        f"{USABLE_FRACTION:.0%} may be used; {check.remedy()}; --force trains anyway"
    )
