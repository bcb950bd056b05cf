"""Fused scaled-dot-product attention: softmax(q k^T * scale + mask) v without an N x N buffer."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._library import register_autocast, register_composite, register_triton_kernels, triton_available

__all__ = ["attention"]

_OP = "attention"
SUPPORTED_HEAD_DIMS = tuple(range(8, 257, 8))


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    generator: torch.Generator | None = None,
):
    """Scaled-dot-product attention, fused (flash style: online softmax, no N x N scores).

    Args:
        q: ``Tensor[B, H, Nq, D]`` queries.
        k: ``Tensor[B, Hkv, Nk, D]`` keys; ``Hkv`` must divide ``H`` (grouped-query / multi-query
            attention: query head ``h`` reads key/value head ``h // (H // Hkv)``).
        v: ``Tensor[B, Hkv, Nk, D]`` values.
        causal: query ``i`` sees keys ``0 .. Nk - Nq + i`` (the mask is aligned to the end, so
            with ``Nq < Nk`` the queries are the last ``Nq`` positions of the sequence).
        attn_mask: broadcastable to ``[B, H, Nq, Nk]``; boolean (``True`` = may attend) or
            floating (added to the scaled scores). Combined with ``causal`` when both are given.
        scale: multiplies ``q k^T``; defaults to ``1 / sqrt(D)``.
        dropout_p: dropout probability on the attention probabilities (``0`` is the fast path).
            The mask is a pure function of a seed drawn from ``generator`` (default: torch's
            global CPU generator), so ``torch.manual_seed`` makes it reproducible, and the
            backward pass regenerates it instead of storing it.
        return_lse: also return the natural-log log-sum-exp of each row's scaled, masked scores
            (``Tensor[B, H, Nq]``, float32; float64 for float64 inputs; ``-inf`` for empty rows).

    Returns:
        ``Tensor[B, H, Nq, D]`` in the dtype of ``q`` (and the log-sum-exp if ``return_lse``).

    A row whose keys are all masked out returns zeros (not NaN), and its gradient is zero.
    Differentiable w.r.t. ``q``, ``k``, ``v`` (and through the returned log-sum-exp); a floating
    ``attn_mask`` is treated as a constant (no gradient flows to it).

    Devices and dtypes: CPU runs a tiled C++ kernel (float32, bfloat16 with float32 accumulation,
    float64); CUDA runs fused Triton kernels, forward and backward (float16, bfloat16, float32 with
    float32 accumulation; masks, grouped heads and dropout included; float64 on CUDA, and CUDA
    without triton installed, fall back to the composite); other devices (MPS, ...) run a
    plain-PyTorch composite that materialises scores a chunk of queries at a time. Head dim ``D``
    is any multiple of 8 from 8 to 256 (the Triton kernels pad it to a power of two internally).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1)) if q.dim() == 4 and q.size(-1) > 0 else 1.0
    dropout_p = float(dropout_p)
    seed = 0
    if dropout_p > 0.0:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
    out, lse = torch.ops.fastdl.attention.default(q, k, v, attn_mask, bool(causal), float(scale), dropout_p, seed)
    return (out, lse) if return_lse else out


# ---- argument checks (shared by the composite and the fake kernels) ---------------------------


def _fail(msg: str):
    raise RuntimeError(f"attention: {msg}")


def check_inputs(q, k, v, attn_mask, scale, dropout_p, *, dtypes=None, device_name=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            _fail(f"expected {name} to be a 4-D tensor [B, H, N, D], but got shape {list(t.shape)}")
    b, h, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    if d not in SUPPORTED_HEAD_DIMS:
        _fail(f"unsupported head dim D={d} (q shape {tuple(q.shape)}); supported: multiples of 8 from 8 to 256")
    if dk != d or v.size(3) != d:
        _fail(f"head dims differ: q has D={d}, k has D={dk}, v has D={v.size(3)}")
    if bk != b or v.size(0) != b:
        _fail(f"batch sizes differ: q has B={b}, k has B={bk}, v has B={v.size(0)}")
    if tuple(v.shape[1:3]) != (hkv, nk):
        _fail(f"k and v must have the same [Hkv, Nk], got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if hkv == 0 or h % hkv != 0:
        _fail(f"the number of query heads H={h} must be a multiple of the key/value heads Hkv={hkv}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(f"q has dtype {q.dtype} but {name} has dtype {t.dtype}")
        if t.device != q.device:
            _fail(f"q is on {q.device} but {name} is on {t.device}; move them to the same device")
    allowed = dtypes or (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if q.dtype not in allowed:
        names = ", ".join(str(x).replace("torch.", "") for x in allowed)
        _fail(f"q has unsupported dtype {q.dtype} on {device_name or q.device.type}; supported: {names}")
    if not 0.0 <= dropout_p < 1.0:
        _fail(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not math.isfinite(scale):
        _fail(f"scale must be finite, got {scale}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            _fail(f"attn_mask must be boolean or floating, got dtype {attn_mask.dtype}")
        if attn_mask.device != q.device:
            _fail(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
        target = (b, h, nq, nk)
        shape = tuple(attn_mask.shape)
        ok = len(shape) <= 4 and all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))
        if not ok:
            _fail(f"attn_mask of shape {shape} is not broadcastable to [B, H, Nq, Nk] = {list(target)}")


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake kernels ------------------------------------------------------------------------------


@torch.library.register_fake("fastdl::attention")
def _attention_fake(q, k, v, attn_mask, causal, scale, dropout_p, seed):
    check_inputs(q, k, v, attn_mask, scale, dropout_p)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=_lse_dtype(q.dtype), device=q.device)
    return out, lse


@torch.library.register_fake("fastdl::_attention_backward")
def _attention_backward_fake(grad_out, q, k, v, attn_mask, out, lse, grad_lse, causal, scale, dropout_p, seed):
    check_inputs(q, k, v, attn_mask, scale, dropout_p)
    return (
        torch.empty(q.shape, dtype=q.dtype, device=q.device),
        torch.empty(k.shape, dtype=k.dtype, device=k.device),
        torch.empty(v.shape, dtype=v.dtype, device=v.device),
    )


# ---- autograd ----------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, causal, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, attn_mask, out, lse)
    ctx.params = (causal, scale, dropout_p, seed)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, attn_mask, out, lse = ctx.saved_tensors
    causal, scale, dropout_p, seed = ctx.params
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.fastdl._attention_backward.default(
        grad_out, q, k, v, attn_mask, out, lse, grad_lse, causal, scale, dropout_p, seed
    )
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("fastdl::attention", _backward, setup_context=_setup_context)
register_autocast("attention", "lower")


# ---- dropout mask: a counter-based hash shared by every implementation -------------------------
#
# keep(seed, row, j) for row = (b * H + h) * Nq + i: two rounds of the murmur3 finaliser over the
# 64-bit counter row * Nk + j, mixed with the seed; the top 24 bits give a uniform in [0, 1) and
# the element is kept when it is >= dropout_p. The C++ and Triton kernels compute the same bits.

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without int64 overflow."""
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & _M32


def _fmix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def seed_words(seed: int) -> tuple[int, int]:
    s = seed & 0xFFFFFFFFFFFFFFFF
    return (s * 0x9E3779B1 + 0x7F4A7C15) & _M32, ((s >> 32) ^ 0x94D049BB ^ (s * 0x632BE5AB)) & _M32


def dropout_keep(seed: int, counter: Tensor, dropout_p: float) -> Tensor:
    """Boolean keep mask for int64 element counters."""
    s1, s2 = seed_words(seed)
    x = _fmix32((counter & _M32) ^ s1)
    x = _fmix32(x ^ (counter >> 32) ^ s2)
    threshold = min(int(dropout_p * (1 << 24)), 1 << 24)
    return (x >> 8) >= threshold


# ---- composite (plain PyTorch; serves MPS and devices without a native kernel) ----------------
#
# Queries are processed a chunk at a time so that the scores never exceed about _CHUNK_ELEMENTS
# elements. Grouped heads are handled by viewing q as [B, Hkv, G, Nq, D] against k, v as
# [B, Hkv, 1, Nk, D], so nothing is repeated.

_CHUNK_ELEMENTS = 1 << 22


def _chunk_rows(q, nk):
    b, h = q.shape[:2]
    return max(1, min(q.size(2), _CHUNK_ELEMENTS // max(1, b * h * nk)))


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped_mask(attn_mask, b, h, hkv, nq, nk):
    if attn_mask is None:
        return None
    return attn_mask.expand(b, h, nq, nk).unflatten(1, (hkv, h // hkv))


def _chunk_scores(qc, kt, mask_c, causal, i0, nq, nk, scale, cdt):
    """Scaled, masked scores [B, Hkv, G, c, Nk] (-inf where a key is hidden)."""
    s = (qc @ kt) * scale
    visible = None
    if mask_c is not None:
        if mask_c.dtype == torch.bool:
            visible = mask_c
        else:
            s = s + mask_c.to(cdt)
    if causal:
        rows = torch.arange(i0, i0 + qc.size(3), device=qc.device)
        cols = torch.arange(nk, device=qc.device)
        cm = cols[None, :] <= rows[:, None] + (nk - nq)
        visible = cm if visible is None else visible & cm
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    return s


def _probs(s, lse):
    """exp(s - lse), zero in rows whose lse is -inf (no visible key); NaN where lse is NaN or
    +inf (a NaN score, or +inf in a float mask), as in the math reference."""
    lse_safe = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    return torch.exp(s - lse_safe[..., None])


def _chunk_dropout_scale(seed, dropout_p, b, h, hkv, nq, nk, i0, rows, device, cdt):
    """keep / (1 - p) for the chunk, shaped [B, Hkv, G, c, Nk]."""
    bh = torch.arange(b * h, device=device, dtype=torch.int64).view(b, hkv, h // hkv, 1, 1)
    i = torch.arange(i0, i0 + rows, device=device, dtype=torch.int64).view(1, 1, 1, rows, 1)
    j = torch.arange(nk, device=device, dtype=torch.int64).view(1, 1, 1, 1, nk)
    keep = dropout_keep(seed, (bh * nq + i) * nk + j, dropout_p)
    return keep.to(cdt) / (1.0 - dropout_p)


@register_composite(_OP, cuda_kernel="Triton")
def attention_composite(q, k, v, attn_mask, causal, scale, dropout_p, seed):
    check_inputs(q, k, v, attn_mask, scale, dropout_p)
    b, h, nq, d = q.shape
    hkv, nk = k.size(1), k.size(2)
    cdt = _compute_dtype(q.dtype)
    out = torch.zeros((b, h, nq, d), dtype=cdt, device=q.device)
    lse = torch.full((b, h, nq), float("-inf"), dtype=cdt, device=q.device)
    if out.numel() == 0 or nk == 0:
        return out.to(q.dtype), lse.to(_lse_dtype(q.dtype))
    qg = q.unflatten(1, (hkv, h // hkv))
    kt = k.to(cdt).unsqueeze(2).transpose(-1, -2)
    vg = v.to(cdt).unsqueeze(2)
    mask = _grouped_mask(attn_mask, b, h, hkv, nq, nk)
    og, lg = out.unflatten(1, (hkv, h // hkv)), lse.unflatten(1, (hkv, h // hkv))
    step = _chunk_rows(q, nk)
    for i0 in range(0, nq, step):
        i1 = min(nq, i0 + step)
        s = _chunk_scores(
            qg[:, :, :, i0:i1].to(cdt),
            kt,
            None if mask is None else mask[:, :, :, i0:i1],
            causal,
            i0,
            nq,
            nk,
            scale,
            cdt,
        )
        row_lse = torch.logsumexp(s, dim=-1)
        p = _probs(s, row_lse)
        if dropout_p > 0:
            p = p * _chunk_dropout_scale(seed, dropout_p, b, h, hkv, nq, nk, i0, i1 - i0, q.device, cdt)
        # rows with no visible key are 0 even where v holds NaN (0 * NaN would be NaN)
        og[:, :, :, i0:i1] = torch.where((row_lse == float("-inf"))[..., None], 0.0, p @ vg)
        lg[:, :, :, i0:i1] = row_lse
    return out.to(q.dtype), lse.to(_lse_dtype(q.dtype))


@register_composite("_attention_backward", cuda_kernel="Triton")
def attention_backward_composite(grad_out, q, k, v, attn_mask, out, lse, grad_lse, causal, scale, dropout_p, seed):
    check_inputs(q, k, v, attn_mask, scale, dropout_p)
    b, h, nq, d = q.shape
    hkv, nk = k.size(1), k.size(2)
    g = h // hkv
    cdt = _compute_dtype(q.dtype)
    dq = torch.zeros((b, h, nq, d), dtype=cdt, device=q.device)
    dk = torch.zeros((b, hkv, nk, d), dtype=cdt, device=q.device)
    dv = torch.zeros((b, hkv, nk, d), dtype=cdt, device=q.device)
    if dq.numel() == 0 or nk == 0:
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    qg = q.unflatten(1, (hkv, g))
    kc, vc = k.to(cdt).unsqueeze(2), v.to(cdt).unsqueeze(2)
    kt, vt = kc.transpose(-1, -2), vc.transpose(-1, -2)
    mask = _grouped_mask(attn_mask, b, h, hkv, nq, nk)
    do_g, o_g = grad_out.unflatten(1, (hkv, g)), out.unflatten(1, (hkv, g))
    lse_g = lse.to(cdt).unflatten(1, (hkv, g))
    glse_g = None if grad_lse is None else grad_lse.to(cdt).unflatten(1, (hkv, g))
    dq_g = dq.unflatten(1, (hkv, g))
    step = _chunk_rows(q, nk)
    for i0 in range(0, nq, step):
        i1 = min(nq, i0 + step)
        qc = qg[:, :, :, i0:i1].to(cdt)
        s = _chunk_scores(qc, kt, None if mask is None else mask[:, :, :, i0:i1], causal, i0, nq, nk, scale, cdt)
        p = _probs(s, lse_g[:, :, :, i0:i1])
        doc = do_g[:, :, :, i0:i1].to(cdt)
        delta = (doc * o_g[:, :, :, i0:i1].to(cdt)).sum(-1)
        if glse_g is not None:
            delta = delta - glse_g[:, :, :, i0:i1]
        dp = doc @ vt
        pd = p
        if dropout_p > 0:
            z = _chunk_dropout_scale(seed, dropout_p, b, h, hkv, nq, nk, i0, i1 - i0, q.device, cdt)
            pd = p * z
            dp = dp * z
        dv += (pd.transpose(-1, -2) @ doc).sum(2)
        ds = p * (dp - delta[..., None])
        dq_g[:, :, :, i0:i1] = (ds @ kc) * scale
        dk += (ds.transpose(-1, -2) @ qc).sum(2) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---- CUDA: Triton kernels, registered only where they can run -----------------------------------


if triton_available():
    from fastdl.kernels import attention as triton_attention

    register_triton_kernels(
        {
            "attention": triton_attention.attention_forward_op,
            "_attention_backward": triton_attention.attention_backward_op,
        }
    )
