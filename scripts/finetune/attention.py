"""Attention over packed rows whose cost is linear in the number of examples.

A packed row holds several examples, each with position ids restarting at 0. transformers 5.5.4 keeps them
apart with a block-diagonal mask (masking_utils.find_packed_sequence_indices + sdpa_mask): it materialises a
rows x L x L boolean mask, and SDPA with an explicit mask runs its math kernel on the CPU, which builds
rows x heads x L x L scores. `packed_sdpa` instead runs SDPA with `is_causal` on each example's slice of the row
(the fused kernel, no mask, cost the sum of each example's length squared) and creates no mask at all for
packed rows. Padded batches (a 2D attention mask) and generation (a KV cache) go to transformers' own SDPA.

What runs where:
- CPU or CUDA, --attn_implementation sdpa with packing: `packed_sdpa` (this module), one flat row per
  micro-batch, so no token is padding.
- CUDA with flash_attention_2/3 (or a `kernels` hub kernel): transformers' varlen kernel, cu_seqlens from the
  position ids. transformers only takes that path for a batch of one row, so the collator sends one flat row.
- eager: transformers' block-diagonal mask over rows of <= --seq_length (quadratic in the row, not the batch).
"""

from __future__ import annotations

import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "packed_sdpa"


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int, bool]]]:
    """Per row, (start, end, single) for each example: a new one starts wherever the position does not go up
    by 1 (as transformers decides). Runs of one-token pieces (padding, each at position 0) merge into one piece
    marked single: each of its tokens attends to itself only."""
    starts = torch.diff(position_ids, dim=-1) != 1
    starts = torch.cat([torch.ones_like(starts[:, :1]), starts], dim=-1)
    rows = []
    for row in starts:
        bounds = [*row.nonzero().flatten().tolist(), row.numel()]
        pieces = []
        for start, end in zip(bounds, bounds[1:], strict=False):
            single = end - start == 1
            if single and pieces and pieces[-1][2]:
                pieces[-1] = (pieces[-1][0], end, True)
            else:
                pieces.append((start, end, single))
        rows.append(pieces)
    return rows


_last_segments: tuple[weakref.ref, int, list] | None = None


def row_segments(position_ids: torch.Tensor) -> list[list[tuple[int, int, bool]]]:
    """`segments(position_ids)`, worked out once per forward pass: every layer gets the same position ids tensor,
    and on CUDA each working-out is a host sync (`tolist`). Kept while that very tensor, unchanged, is alive."""
    global _last_segments
    if _last_segments is not None:
        ref, version, found = _last_segments
        if ref() is position_ids and version == position_ids._version:
            return found
    found = segments(position_ids)
    _last_segments = (weakref.ref(position_ids), position_ids._version, found)
    return found


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if (
        attention_mask is not None
        or position_ids is None
        or query.shape[2] != key.shape[2]
        or query.shape[2] < 2
    ):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    # Grouped-query attention inside the kernel (CPU and CUDA, torch >= 2.5): no copies of k and v per query
    # head kept for the backward pass. Rows and examples are taken apart with unbind and split, whose backward
    # passes put the pieces' gradients together in one copy (a slice's allocates a zero tensor of the whole row
    # per example), and the outputs go back into (rows, length, heads, dim) in one copy.
    groups = query.shape[1] // key.shape[1]
    pieces_per_row = row_segments(position_ids)
    if len(pieces_per_row) == 1:  # one row of position ids for every row of the batch
        pieces_per_row = pieces_per_row * query.shape[0]
    rows = []
    for pieces, q, k, v in zip(
        pieces_per_row,
        *((t.squeeze(0),) if t.shape[0] == 1 else t.unbind(0) for t in (query, key, value)),
        strict=True,
    ):
        sizes = [end - start for start, end, _ in pieces]
        outputs = []
        for (_, _, single), qs, ks, vs in zip(
            pieces, q.split(sizes, dim=1), k.split(sizes, dim=1), v.split(sizes, dim=1), strict=True
        ):
            if single:  # each token attends to itself only, so its output is its value
                outputs.append(vs.repeat_interleave(groups, dim=0).transpose(0, 1))
                continue
            out = torch.nn.functional.scaled_dot_product_attention(
                qs[None], ks[None], vs[None], dropout_p=dropout, scale=scaling, is_causal=True,
                enable_gqa=groups > 1,
            )  # fmt: skip
            outputs.append(out.squeeze(0).transpose(0, 1))  # length x heads x dim
        rows.append(torch.cat(outputs) if len(outputs) > 1 else outputs[0].contiguous())
    return (rows[0][None] if len(rows) == 1 else torch.stack(rows)), None


def packed_sdpa_mask(*, attention_mask=None, **kwargs):
    """No mask for packed or causal rows (the attention splits rows itself); padded batches get SDPA's mask."""
    if attention_mask is None:
        return None
    return sdpa_mask(attention_mask=attention_mask, **kwargs)


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


def flat_rows(attn_implementation: str) -> bool:
    """Whether packed examples travel as one flat row rather than rows of at most --seq_length.

    transformers' flash-attention kernels find the examples' boundaries (cu_seqlens) from the position ids
    only for a batch of one row, and `packed_sdpa` splits any row into its examples: for both, a flat row
    spends no compute or memory on padding (rows of <= 512 left up to 44% of a 4096-token micro-batch as
    padding on bench/peers.py's data). Only a mask-building attention (eager) needs the short rows."""
    return "flash" in attn_implementation or attn_implementation in ("sdpa", PACKED_SDPA)


def training_attention(attn_implementation: str, packing: bool) -> str:
    """The implementation a packed run loads: `packed_sdpa` in place of sdpa, any other unchanged."""
    return PACKED_SDPA if packing and attn_implementation == "sdpa" else attn_implementation
