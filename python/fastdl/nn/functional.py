"""Functional attention helpers backed by :func:`fastdl.ops.attention`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..ops.attention import _chunk_scores, _compute_dtype, _grouped_mask, _probs

__all__ = [
    "attention_probabilities",
    "in_projection",
    "merge_masks",
    "multi_head_attention",
    "out_projection",
    "scaled_dot_product_attention",
]


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Same arguments and mask convention as ``torch.nn.functional.scaled_dot_product_attention``
    (boolean mask: ``True`` = may attend; floating mask: added to the scores), computed by
    :func:`fastdl.ops.attention`. Grouped heads are always accepted (``enable_gqa`` is implied).
    ``is_causal`` keeps torch's top-left alignment when ``Nq != Nk`` (query ``i`` sees keys
    ``0 .. i``), unlike :func:`fastdl.ops.attention`, which aligns to the end. Differences: rows
    with no visible key give zeros instead of NaN."""
    del enable_gqa
    nq, nk = query.size(-2), key.size(-2)
    if is_causal and nq != nk:
        top_left = torch.ones(nq, nk, dtype=torch.bool, device=query.device).tril()
        if attn_mask is None:
            attn_mask = top_left
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & top_left
        else:
            attn_mask = attn_mask.masked_fill(~top_left, float("-inf"))
        is_causal = False
    return ops.attention(query, key, value, causal=is_causal, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p)


def merge_masks(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, batch: int, heads: int, nq: int, nk: int
) -> Tensor | None:
    """Turn ``torch.nn.MultiheadAttention``'s masks into one fastdl mask.

    ``attn_mask`` is ``[Nq, Nk]`` or ``[B * heads, Nq, Nk]`` and ``key_padding_mask`` ``[B, Nk]``;
    boolean ones mean ``True`` = *not* allowed (nn.MultiheadAttention's convention), floating ones
    are added to the scores. The result is broadcastable to ``[B, heads, Nq, Nk]`` and follows
    fastdl's convention (boolean ``True`` = may attend).
    """
    masks = []
    if attn_mask is not None:
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.view(batch, heads, nq, nk)
        elif attn_mask.dim() != 2:
            raise RuntimeError(f"attn_mask must be [Nq, Nk] or [B * heads, Nq, Nk], got {list(attn_mask.shape)}")
        masks.append(attn_mask)
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, nk):
            raise RuntimeError(
                f"key_padding_mask must be [B, Nk] = [{batch}, {nk}], got {list(key_padding_mask.shape)}"
            )
        masks.append(key_padding_mask.view(batch, 1, 1, nk))
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        allowed = ~masks[0]
        for m in masks[1:]:
            allowed = allowed & ~m
        return allowed
    total = None
    for m in masks:
        add = (
            torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(m, float("-inf"))
            if m.dtype == torch.bool
            else m
        )
        total = add if total is None else total + add
    return total


def in_projection(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    q_weight: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    in_bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Project batch-first ``[B, N, E]`` inputs and split heads: ``q, k, v`` as ``Tensor[B, heads, N, E / heads]``."""
    bq = bk = bv = None
    if in_bias is not None:
        bq, bk, bv = in_bias.chunk(3)
    q, k, v = F.linear(query, q_weight, bq), F.linear(key, k_weight, bk), F.linear(value, v_weight, bv)
    b, head_dim = query.size(0), q_weight.size(0) // num_heads
    return tuple(t.view(b, t.size(1), num_heads, head_dim).transpose(1, 2) for t in (q, k, v))


def out_projection(heads: Tensor, out_weight: Tensor, out_bias: Tensor | None) -> Tensor:
    """Merge ``Tensor[B, heads, N, D]`` into ``[B, N, heads * D]`` and project."""
    b, h, n, d = heads.shape
    return F.linear(heads.transpose(1, 2).reshape(b, n, h * d), out_weight, out_bias)


def attention_probabilities(
    q: Tensor, k: Tensor, attn_mask: Tensor | None = None, causal: bool = False, scale: float | None = None
) -> Tensor:
    """The softmax weights :func:`fastdl.ops.attention` applies, materialised: ``Tensor[B, H, Nq, Nk]``.

    Same conventions as the op (boolean mask ``True`` = may attend, floating mask added, causal
    aligned to the end, rows with no visible key all zero). O(Nq * Nk) memory: for inspection and
    ``need_weights=True``, not for the fast path."""
    # the op's own composite formulas (grouped heads, masks, end-aligned causal, empty rows)
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1:3]
    cdt = _compute_dtype(q.dtype)
    mask = _grouped_mask(attn_mask, b, h, hkv, nq, nk)
    kt = k.to(cdt).unsqueeze(2).transpose(-1, -2)
    scores = _chunk_scores(
        q.unflatten(1, (hkv, h // hkv)).to(cdt), kt, mask, causal, 0, nq, nk, d**-0.5 if scale is None else scale, cdt
    )
    return _probs(scores, torch.logsumexp(scores, dim=-1)).flatten(1, 2).to(q.dtype)


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    q_weight: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    in_bias: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
) -> Tensor:
    """Multi-head attention on batch-first inputs ``[B, N, E]``: project, split heads, attend with
    :func:`fastdl.ops.attention`, merge heads, project out. Masks follow
    ``torch.nn.MultiheadAttention`` (see :func:`merge_masks`). Used by GPT / encoder blocks and by
    :class:`fastdl.nn.MultiheadAttention`."""
    q, k, v = in_projection(query, key, value, num_heads, q_weight, k_weight, v_weight, in_bias)
    mask = merge_masks(attn_mask, key_padding_mask, query.size(0), num_heads, query.size(1), key.size(1))
    out = ops.attention(q, k, v, causal=causal, attn_mask=mask, dropout_p=dropout_p)
    return out_projection(out, out_weight, out_bias)
