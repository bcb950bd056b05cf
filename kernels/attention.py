"""Triton kernels for ``fastdl::attention`` and ``fastdl::_attention_backward`` (CUDA).

Forward: one program per (query block, batch * head). It walks the key blocks with an online
softmax in base 2 (log2(e) is folded into the scale, ``exp2`` everywhere), keeping the running
max, the running sum and the output accumulator in float32, and writes the output and the
natural-log log-sum-exp of every row. With ``causal`` the key blocks entirely above the diagonal
are never visited (loop bound) and only the blocks that straddle it are masked; the blocks fully
below it run without any per-element causal test.

Backward (probabilities recomputed from the saved log-sum-exp):

* ``_bwd_preprocess``: ``delta = rowsum(out * grad_out) - grad_lse``;
* ``_bwd_dkdv``: one program per (key block, batch * key/value head); K and V stay on chip while
  the program loops over the query heads of the group (grouped-query attention) and over the query
  blocks that can see the key block, so every dK / dV element has one owner (no atomics);
* ``_bwd_dq``: one program per (query block, batch * head), looping over the visible key blocks.

Head dims that are not powers of two are padded to the next one with masked loads. Boolean and
additive floating masks are read through their broadcast strides (stride 0 on broadcast
dimensions: the mask is never expanded in memory). Dropout uses the same counter-based hash as the
composite and the C++ kernel, so all implementations drop exactly the same elements; it hashes the
absolute (row, column) index, so the dropped elements do not depend on the tiles.

The forward, dK/dV and dQ kernels are autotuned on a GPU (tile sizes, warps, pipeline stages; see
the tiles section); the preprocessing kernel keeps a fixed block. Under the interpreter each kernel
gets a single small tile, so nothing is benchmarked there.

The host functions take CPU tensors as well, which lets the Triton interpreter
(``TRITON_INTERPRET=1``) run and test these kernels on machines without a GPU.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET
from ._common import mm as _mm
from ._common import precision as _precision
from ._common import tile_configs

__all__ = ["attention_forward_op", "attention_backward_op"]

_LOG2E = 1.4426950408889634


# ---- tiles -------------------------------------------------------------------------------------

# Candidates (BM query rows, BN key columns, num_warps, num_stages) of each kernel; BM and BN are
# powers of two >= 16 (tl.dot). Nothing ties BM to BN: the causal loop bounds are computed from
# the tile's own rows and columns. Under the interpreter each kernel gets one small tile with
# BM != BN, so the tests cover query and key blocks that meet the diagonal at different places.
_GPU_TILES = {
    "fwd": [
        (128, 128, 8, 2),
        (128, 64, 8, 3),
        (128, 64, 4, 3),
        (128, 64, 8, 2),
        (64, 64, 4, 4),
        (64, 64, 4, 2),
        (64, 32, 4, 2),
        (32, 64, 4, 3),  # few queries (decoding), many keys
        (32, 32, 4, 2),
        (32, 32, 4, 1),  # float32 with D = 256
    ],
    "dkdv": [  # BN keys stay on chip while BM queries stream past
        (64, 128, 8, 2),
        (32, 128, 8, 2),
        (32, 128, 4, 3),
        (64, 64, 4, 2),
        (32, 64, 4, 3),
        (32, 64, 8, 2),
        (32, 32, 4, 2),
        (16, 32, 8, 1),  # float32 with D = 256
    ],
    "dq": [  # BM queries stay on chip while BN keys stream past
        (128, 64, 8, 2),
        (128, 32, 8, 2),
        (64, 64, 4, 2),
        (64, 32, 4, 3),
        (32, 64, 4, 3),  # few queries (decoding), many keys
        (32, 32, 4, 2),
        (32, 16, 8, 1),  # float32 with D = 256
    ],
}
_INTERPRETER_TILES = {"fwd": (32, 16, 1, 1), "dkdv": (16, 32, 1, 1), "dq": (32, 16, 1, 1)}
# Shared memory a program may use: under the 99 KB per-block limit of sm_86 / sm_89 (A100 and H100
# allow more), leaving room for what the _shared_memory estimate leaves out.
_SHARED_MEMORY_BUDGET = 96 * 1024


def _tile_configs(kernel: str, interpret: bool = _INTERPRET) -> list[triton.Config]:
    return tile_configs(("BM", "BN"), _GPU_TILES[kernel], _INTERPRETER_TILES[kernel], interpret)


def _shared_memory(kernel: str, bm: int, bn: int, block_d: int, elem_size: int, num_stages: int) -> int:
    """Bytes of shared memory one program needs, roughly: the [*, BLOCK_D] tiles it keeps on chip
    plus num_stages buffers of the tiles its loop streams in (the software pipeline)."""
    resident, streamed = {
        "fwd": (bm, 2 * bn),  # Q; K and V
        "dkdv": (2 * bn, 2 * bm),  # K and V; Q and dO
        "dq": (2 * bm, 2 * bn),  # Q and dO; K and V
    }[kernel]
    return (resident + num_stages * streamed) * block_d * elem_size


def _usable_tiles(kernel, configs, block_d, elem_size, nq_bucket, nk_bucket):
    """The configs worth benchmarking: those within the shared-memory budget, without tiles far
    longer than the sequences (they only add masked work and tuning time). Never empty: falls
    back to the config needing the least shared memory."""

    def shared_memory(c):
        return _shared_memory(kernel, c.kwargs["BM"], c.kwargs["BN"], block_d, elem_size, c.num_stages)

    fitting = [c for c in configs if shared_memory(c) <= _SHARED_MEMORY_BUDGET]
    short = [c for c in fitting if c.kwargs["BM"] <= nq_bucket and c.kwargs["BN"] <= nk_bucket]
    return short or [min(fitting or configs, key=shared_memory)]


def _prune_tiles(kernel, configs, named_args, **kwargs):
    return _usable_tiles(
        kernel,
        configs,
        kwargs["BLOCK_D"],
        named_args["Q"].element_size(),
        named_args["Nq_bucket"],
        named_args["Nk_bucket"],
    )


def _autotuned(kernel: str):
    """Autotune over _GPU_TILES[kernel]. The key is what changes the best tile: the sequence
    lengths rounded up to powers of two (so a growing KV cache does not re-tune at every step),
    the head dim and the constexpr features; the autotuner adds the tensors' dtypes. Every launch
    writes each output element exactly once (no atomics, nothing accumulated across launches), so
    the benchmark launches need no reset_to_zero."""
    return triton.autotune(
        configs=_tile_configs(kernel),
        key=["Nq_bucket", "Nk_bucket", "D", "CAUSAL", "HAS_MASK", "MASK_BOOL", "DROPOUT"],
        prune_configs_by={"early_config_prune": functools.partial(_prune_tiles, kernel)},
    )


def _length_bucket(n: int) -> int:
    """A sequence length rounded up to a power of two, at least 32: tiles up to 32 are never
    considered too long (the smallest GPU tiles, and a decoding step has a single query)."""
    return max(32, triton.next_power_of_2(n))


def _length_args(nq: int, nk: int) -> tuple[int, int, int, int]:
    """The kernels' (Nq, Nk, Nq_bucket, Nk_bucket); the buckets are read only by the autotuner."""
    return nq, nk, _length_bucket(nq), _length_bucket(nk)


# ---- dropout: the shared counter-based hash (see fastdl.ops.attention.dropout_keep) ------------


@triton.jit
def _fmix32(x):
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    x = x ^ (x >> 16)
    return x


@triton.jit
def _dropout_keep(row_counter, offs_n, s1, s2, threshold):
    """keep[i, j] for the int64 counters row_counter[i] + offs_n[j]."""
    counter = row_counter[:, None] + offs_n[None, :].to(tl.int64)
    lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    hi = (counter >> 32).to(tl.uint32)
    x = _fmix32(lo ^ s1.to(tl.uint32, bitcast=True))
    x = _fmix32(x ^ hi ^ s2.to(tl.uint32, bitcast=True))
    return (x >> 8).to(tl.int32) >= threshold


@triton.jit
def _scores(
    q,
    k_ptrs,
    kv_ok,
    mask_base,
    offs_m,
    offs_n,
    stride_mi,
    stride_mj,
    Nq,
    Nk,
    qk_scale,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    BOUND_MASK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Scores of a [BM, BN] tile in base-2 units (-inf where hidden) and the loaded key tile."""
    k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
    s = _mm(q, tl.trans(k), PREC) * qk_scale
    if HAS_MASK:
        m_ptrs = mask_base + offs_m[:, None].to(tl.int64) * stride_mi + offs_n[None, :].to(tl.int64) * stride_mj
        m_ok = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
        if MASK_BOOL:
            mv = tl.load(m_ptrs, mask=m_ok, other=0)
            s = tl.where(mv != 0, s, float("-inf"))
        else:
            mv = tl.load(m_ptrs, mask=m_ok, other=0.0).to(tl.float32)
            mv2 = mv * 1.4426950408889634
            # finite masks saturate instead of overflowing to -inf (finfo.min is a value, not
            # "hidden"), as additive_mask does on the CPU
            big = 3.4028234663852886e38
            s = s + tl.where(tl.abs(mv) <= big, tl.minimum(tl.maximum(mv2, -big), big), mv2)
    if CAUSAL_MASK:
        s = tl.where(offs_n[None, :] <= offs_m[:, None] + (Nk - Nq), s, float("-inf"))
    if BOUND_MASK:
        s = tl.where(offs_n[None, :] < Nk, s, float("-inf"))
    return s, k


# ---- forward -----------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    mask_base,
    offs_m,
    offs_d,
    d_ok,
    row_counter,
    seeds_ptr,
    lo,
    hi,
    Nq,
    Nk,
    stride_mi,
    stride_mj,
    qk_scale,
    threshold,
    rescale,
    D: tl.constexpr,
    BN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    BOUND_MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
):
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        kv_ok = (offs_n[:, None] < Nk) & d_ok[None, :]
        kv_off = offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
        s, k = _scores(
            q,
            k_base + kv_off,
            kv_ok,
            mask_base,
            offs_m,
            offs_n,
            stride_mi,
            stride_mj,
            Nq,
            Nk,
            qk_scale,
            HAS_MASK,
            MASK_BOOL,
            CAUSAL_MASK,
            BOUND_MASK,
            PREC,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible so far
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            s1 = tl.load(seeds_ptr)
            s2 = tl.load(seeds_ptr + 1)
            keep = _dropout_keep(row_counter, offs_n, s1, s2, threshold)
            p = tl.where(keep, p * rescale, 0.0)
        v = tl.load(v_base + kv_off, mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_block(H, G, D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr):
    """This program's query block: grid axis 1 is batch * head (b, h), whose key/value head under
    grouped-query attention is bhk; axis 0 picks the BM rows starting at start_m."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bhk = b * (H // G) + h // G
    start_m = tl.program_id(0) * BM
    offs_d = tl.arange(0, BLOCK_D)
    return bh, b, h, bhk, start_m, start_m + tl.arange(0, BM), offs_d, offs_d < D


@_autotuned("fwd")
@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    MASK,
    SEEDS,
    stride_mb,
    stride_mh,
    stride_mi,
    stride_mj,
    H,
    G,
    Nq,
    Nk,
    Nq_bucket,
    Nk_bucket,
    qk_scale,
    threshold,
    rescale,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
):
    bh, b, h, bhk, start_m, offs_m, offs_d, d_ok = _query_block(H, G, D, BLOCK_D, BM)
    q_base = Q + bh.to(tl.int64) * Nq * D
    k_base = K + bhk.to(tl.int64) * Nk * D
    v_base = V + bhk.to(tl.int64) * Nk * D
    mask_base = MASK + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    row_ok = offs_m < Nq
    q = tl.load(
        q_base + offs_m[:, None].to(tl.int64) * D + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
    )
    row_counter = (bh.to(tl.int64) * Nq + offs_m) * Nk

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BLOCK_D], dtype=tl.float32)

    full_blocks = (Nk // BN) * BN
    if CAUSAL:
        # columns visible to any row of the block: < start_m + BM + Nk - Nq; to every row: <= start_m + Nk - Nq
        hi = tl.minimum(Nk, tl.maximum(start_m + BM + Nk - Nq, 0))
        first_row_limit = tl.maximum(start_m + Nk - Nq + 1, 0)
        mid = tl.minimum((first_row_limit // BN) * BN, full_blocks)
        mid = tl.minimum(mid, hi)
    else:
        hi = Nk
        mid = full_blocks
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        mask_base,
        offs_m,
        offs_d,
        d_ok,
        row_counter,
        SEEDS,
        0,
        mid,
        Nq,
        Nk,
        stride_mi,
        stride_mj,
        qk_scale,
        threshold,
        rescale,
        D,
        BN,
        HAS_MASK,
        MASK_BOOL,
        False,
        False,
        DROPOUT,
        PREC,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        mask_base,
        offs_m,
        offs_d,
        d_ok,
        row_counter,
        SEEDS,
        mid,
        hi,
        Nq,
        Nk,
        stride_mi,
        stride_mj,
        qk_scale,
        threshold,
        rescale,
        D,
        BN,
        HAS_MASK,
        MASK_BOOL,
        CAUSAL,
        True,
        DROPOUT,
        PREC,
    )

    empty = l_i == 0.0
    # rows with no visible key are 0 even where v holds NaN (their p is 0, and 0 * NaN is NaN)
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_base = O + bh.to(tl.int64) * Nq * D
    tl.store(
        o_base + offs_m[:, None].to(tl.int64) * D + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + bh.to(tl.int64) * Nq + offs_m, lse, mask=row_ok)


# ---- backward ----------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess(
    O, DO, GLSE, DELTA, Nq, D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, HAS_GLSE: tl.constexpr
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Nq) & (offs_d[None, :] < D)
    off = bh.to(tl.int64) * Nq * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
    o = tl.load(O + off, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=ok, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row_off = bh.to(tl.int64) * Nq + offs_m
    if HAS_GLSE:
        delta = delta - tl.load(GLSE + row_off, mask=offs_m < Nq, other=0.0).to(tl.float32)
    tl.store(DELTA + row_off, delta, mask=offs_m < Nq)


@triton.jit
def _load_lse2(LSE, row_off, rows_ok):
    """Saved log-sum-exp in base 2; +inf for empty rows and padding rows, so their p is 0."""
    lse = tl.load(LSE + row_off, mask=rows_ok, other=float("inf")).to(tl.float32)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse * 1.4426950408889634


@triton.jit
def _dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    mask_base,
    offs_n,
    offs_d,
    d_ok,
    bh,
    seeds_ptr,
    lo,
    hi,
    Nq,
    Nk,
    stride_mi,
    stride_mj,
    qk_scale,
    threshold,
    rescale,
    D: tl.constexpr,
    BM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
):
    for start_m in range(lo, hi, BM):
        offs_m = start_m + tl.arange(0, BM)
        rows_ok = offs_m < Nq
        off = offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
        ok = rows_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + off, mask=ok, other=0.0)
        do = tl.load(do_base + off, mask=ok, other=0.0)
        lse2 = _load_lse2(lse_base, offs_m, rows_ok)
        delta = tl.load(delta_base + offs_m, mask=rows_ok, other=0.0)
        # scores [BM, BN] (k already loaded: recompute q k^T directly)
        s = _mm(q, tl.trans(k), PREC) * qk_scale
        if HAS_MASK:
            m_ptrs = mask_base + offs_m[:, None].to(tl.int64) * stride_mi + offs_n[None, :].to(tl.int64) * stride_mj
            m_ok = rows_ok[:, None] & (offs_n[None, :] < Nk)
            if MASK_BOOL:
                mv = tl.load(m_ptrs, mask=m_ok, other=0)
                s = tl.where(mv != 0, s, float("-inf"))
            else:
                mv = tl.load(m_ptrs, mask=m_ok, other=0.0).to(tl.float32)
                s = s + mv * 1.4426950408889634
        if CAUSAL_MASK:
            s = tl.where(offs_n[None, :] <= offs_m[:, None] + (Nk - Nq), s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = _mm(do, tl.trans(v), PREC)
        if DROPOUT:
            s1 = tl.load(seeds_ptr)
            s2 = tl.load(seeds_ptr + 1)
            keep = _dropout_keep((bh.to(tl.int64) * Nq + offs_m) * Nk, offs_n, s1, s2, threshold)
            pd = tl.where(keep, p * rescale, 0.0)
            dp = tl.where(keep, dp * rescale, 0.0)
        else:
            pd = p
        dv += _mm(tl.trans(pd.to(do.dtype)), do, PREC)
        ds = p * (dp - delta[:, None])
        dk += _mm(tl.trans(ds.to(q.dtype)), q, PREC)
    return dk, dv


@_autotuned("dkdv")
@triton.jit
def _bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    MASK,
    SEEDS,
    stride_mb,
    stride_mh,
    stride_mi,
    stride_mj,
    H,
    G,
    Nq,
    Nk,
    Nq_bucket,
    Nk_bucket,
    qk_scale,
    sm_scale,
    threshold,
    rescale,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    hkv = H // G
    b = bhk // hkv
    hk = bhk % hkv
    start_n = pid_n * BN
    offs_n = start_n + tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_ok = (offs_n[:, None] < Nk) & d_ok[None, :]
    kv_off = bhk.to(tl.int64) * Nk * D + offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
    k = tl.load(K + kv_off, mask=kv_ok, other=0.0)
    v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
    dk = tl.zeros([BN, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BN, BLOCK_D], dtype=tl.float32)

    n_blocks_end = tl.cdiv(Nq, BM) * BM
    if CAUSAL:
        # row i sees some column of the block when i >= start_n - (Nk - Nq),
        # and every column of it when i >= start_n + BN - 1 - (Nk - Nq)
        lo = (tl.maximum(start_n - (Nk - Nq), 0) // BM) * BM
        full = tl.maximum(start_n + BN - 1 - (Nk - Nq), 0)
        mid = tl.minimum(tl.maximum(tl.cdiv(full, BM) * BM, lo), n_blocks_end)
        lo = tl.minimum(lo, mid)
    else:
        lo = 0
        mid = 0
    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        q_base = Q + bh.to(tl.int64) * Nq * D
        do_base = DO + bh.to(tl.int64) * Nq * D
        lse_base = LSE + bh.to(tl.int64) * Nq
        delta_base = DELTA + bh.to(tl.int64) * Nq
        mask_base = MASK + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
        dk, dv = _dkdv_inner(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            mask_base,
            offs_n,
            offs_d,
            d_ok,
            bh,
            SEEDS,
            lo,
            mid,
            Nq,
            Nk,
            stride_mi,
            stride_mj,
            qk_scale,
            threshold,
            rescale,
            D,
            BM,
            HAS_MASK,
            MASK_BOOL,
            CAUSAL,
            DROPOUT,
            PREC,
        )
        dk, dv = _dkdv_inner(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            mask_base,
            offs_n,
            offs_d,
            d_ok,
            bh,
            SEEDS,
            mid,
            n_blocks_end,
            Nq,
            Nk,
            stride_mi,
            stride_mj,
            qk_scale,
            threshold,
            rescale,
            D,
            BM,
            HAS_MASK,
            MASK_BOOL,
            False,
            DROPOUT,
            PREC,
        )
    dk = dk * sm_scale
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_inner(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    mask_base,
    offs_m,
    offs_d,
    d_ok,
    row_counter,
    seeds_ptr,
    lo,
    hi,
    Nq,
    Nk,
    stride_mi,
    stride_mj,
    qk_scale,
    threshold,
    rescale,
    D: tl.constexpr,
    BN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
):
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        kv_ok = (offs_n[:, None] < Nk) & d_ok[None, :]
        kv_off = offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
        # padding columns (>= Nk) load k = 0, so their ds never reaches dq
        s, k = _scores(
            q,
            k_base + kv_off,
            kv_ok,
            mask_base,
            offs_m,
            offs_n,
            stride_mi,
            stride_mj,
            Nq,
            Nk,
            qk_scale,
            HAS_MASK,
            MASK_BOOL,
            CAUSAL_MASK,
            False,
            PREC,
        )
        v = tl.load(v_base + kv_off, mask=kv_ok, other=0.0)
        p = tl.math.exp2(s - lse2[:, None])
        dp = _mm(do, tl.trans(v), PREC)
        if DROPOUT:
            s1 = tl.load(seeds_ptr)
            s2 = tl.load(seeds_ptr + 1)
            keep = _dropout_keep(row_counter, offs_n, s1, s2, threshold)
            dp = tl.where(keep, dp * rescale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, PREC)
    return dq


@_autotuned("dq")
@triton.jit
def _bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    MASK,
    SEEDS,
    stride_mb,
    stride_mh,
    stride_mi,
    stride_mj,
    H,
    G,
    Nq,
    Nk,
    Nq_bucket,
    Nk_bucket,
    qk_scale,
    sm_scale,
    threshold,
    rescale,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
):
    bh, b, h, bhk, start_m, offs_m, offs_d, d_ok = _query_block(H, G, D, BLOCK_D, BM)
    rows_ok = offs_m < Nq
    off = bh.to(tl.int64) * Nq * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
    ok = rows_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + off, mask=ok, other=0.0)
    do = tl.load(DO + off, mask=ok, other=0.0)
    lse2 = _load_lse2(LSE + bh.to(tl.int64) * Nq, offs_m, rows_ok)
    delta = tl.load(DELTA + bh.to(tl.int64) * Nq + offs_m, mask=rows_ok, other=0.0)
    k_base = K + bhk.to(tl.int64) * Nk * D
    v_base = V + bhk.to(tl.int64) * Nk * D
    mask_base = MASK + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    row_counter = (bh.to(tl.int64) * Nq + offs_m) * Nk
    dq = tl.zeros([BM, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        hi = tl.minimum(Nk, tl.maximum(start_m + BM + Nk - Nq, 0))
        first_row_limit = tl.maximum(start_m + Nk - Nq + 1, 0)
        mid = tl.minimum((first_row_limit // BN) * BN, hi)
    else:
        hi = Nk
        mid = Nk
    dq = _dq_inner(
        dq,
        q,
        do,
        lse2,
        delta,
        k_base,
        v_base,
        mask_base,
        offs_m,
        offs_d,
        d_ok,
        row_counter,
        SEEDS,
        0,
        mid,
        Nq,
        Nk,
        stride_mi,
        stride_mj,
        qk_scale,
        threshold,
        rescale,
        D,
        BN,
        HAS_MASK,
        MASK_BOOL,
        False,
        DROPOUT,
        PREC,
    )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse2,
        delta,
        k_base,
        v_base,
        mask_base,
        offs_m,
        offs_d,
        d_ok,
        row_counter,
        SEEDS,
        mid,
        hi,
        Nq,
        Nk,
        stride_mi,
        stride_mj,
        qk_scale,
        threshold,
        rescale,
        D,
        BN,
        HAS_MASK,
        MASK_BOOL,
        CAUSAL,
        DROPOUT,
        PREC,
    )
    dq = dq * sm_scale
    tl.store(DQ + off, dq.to(DQ.dtype.element_ty), mask=ok)


# ---- host side ---------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _mask_args(attn_mask, q, b, h, nq, nk):
    """(tensor, strides, has_mask, is_bool) for the kernels; broadcast dims get stride 0 (no copy)."""
    if attn_mask is None:
        return q, (0, 0, 0, 0), False, False
    m = attn_mask
    is_bool = m.dtype == torch.bool
    if is_bool:
        m = m.to(torch.uint8)
    m = m.expand(b, h, nq, nk)
    return m, tuple(m.stride()), True, is_bool


def _dropout_args(seed, dropout_p, device):
    from fastdl.ops.attention import seed_words

    if dropout_p <= 0.0:
        return torch.zeros(2, dtype=torch.int32, device=device), 0, 1.0, False
    s1, s2 = seed_words(int(seed))
    # pass the two 32-bit words as uint32 bit patterns stored in int32
    words = [w - (1 << 32) if w >= (1 << 31) else w for w in (s1, s2)]
    seeds = torch.tensor(words, dtype=torch.int32, device=device)
    threshold = min(int(dropout_p * (1 << 24)), 1 << 24)
    return seeds, threshold, 1.0 / (1.0 - dropout_p), True


def _composite(name):
    from fastdl.ops import _library

    return _library.composite(name)


def attention_forward_op(q, k, v, attn_mask, causal, scale, dropout_p, seed):
    """``fastdl::attention`` on Triton: returns (out, lse) with lse the natural-log log-sum-exp."""
    from fastdl.ops.attention import check_inputs

    check_inputs(q, k, v, attn_mask, scale, dropout_p)
    if q.dtype not in _DTYPES:  # float64: the plain-PyTorch composite
        return _composite("attention")(q, k, v, attn_mask, causal, scale, dropout_p, seed)
    b, h, nq, d = q.shape
    hkv, nk = k.size(1), k.size(2)
    if q.numel() == 0 or nk == 0:
        out = torch.zeros((b, h, nq, d), dtype=q.dtype, device=q.device)
        return out, torch.full((b, h, nq), float("-inf"), dtype=torch.float32, device=q.device)
    out = torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mask, (smb, smh, smi, smj), has_mask, mask_bool = _mask_args(attn_mask, q, b, h, nq, nk)
    seeds, threshold, rescale, use_dropout = _dropout_args(seed, float(dropout_p), q.device)
    _fwd_kernel[lambda meta: (triton.cdiv(nq, meta["BM"]), b * h)](
        q,
        k,
        v,
        out,
        lse,
        mask,
        seeds,
        smb,
        smh,
        smi,
        smj,
        h,
        h // hkv,
        *_length_args(nq, nk),
        float(scale) * _LOG2E,
        threshold,
        rescale,
        D=d,
        BLOCK_D=_block_d(d),
        CAUSAL=bool(causal),
        HAS_MASK=has_mask,
        MASK_BOOL=mask_bool,
        DROPOUT=use_dropout,
        PREC=_precision(q.dtype),
    )
    return out, lse


def attention_backward_op(grad_out, q, k, v, attn_mask, out, lse, grad_lse, causal, scale, dropout_p, seed):
    """``fastdl::_attention_backward`` on Triton: returns (dq, dk, dv)."""
    from fastdl.ops.attention import check_inputs

    check_inputs(q, k, v, attn_mask, scale, dropout_p)
    if q.dtype not in _DTYPES:
        return _composite("_attention_backward")(
            grad_out, q, k, v, attn_mask, out, lse, grad_lse, causal, scale, dropout_p, seed
        )
    b, h, nq, d = q.shape
    hkv, nk = k.size(1), k.size(2)
    if q.numel() == 0 or nk == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out, out = grad_out.to(q.dtype).contiguous(), out.to(q.dtype).contiguous()
    lse = lse.to(torch.float32).contiguous()
    block_d = _block_d(d)

    delta = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    glse = grad_lse.to(torch.float32).contiguous() if grad_lse is not None else delta
    _bwd_preprocess[(triton.cdiv(nq, 64), b * h)](
        out,
        grad_out,
        glse,
        delta,
        nq,
        D=d,
        BLOCK_D=block_d,
        BM=64,
        HAS_GLSE=grad_lse is not None,
    )

    mask, (smb, smh, smi, smj), has_mask, mask_bool = _mask_args(attn_mask, q, b, h, nq, nk)
    seeds, threshold, rescale, use_dropout = _dropout_args(seed, float(dropout_p), q.device)
    qk_scale = float(scale) * _LOG2E
    lengths = _length_args(nq, nk)
    common = dict(
        D=d,
        BLOCK_D=block_d,
        CAUSAL=bool(causal),
        HAS_MASK=has_mask,
        MASK_BOOL=mask_bool,
        DROPOUT=use_dropout,
        PREC=_precision(q.dtype),
    )
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    _bwd_dkdv[lambda meta: (triton.cdiv(nk, meta["BN"]), b * hkv)](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dk,
        dv,
        mask,
        seeds,
        smb,
        smh,
        smi,
        smj,
        h,
        h // hkv,
        *lengths,
        qk_scale,
        float(scale),
        threshold,
        rescale,
        **common,
    )
    dq = torch.empty_like(q)
    _bwd_dq[lambda meta: (triton.cdiv(nq, meta["BM"]), b * h)](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dq,
        mask,
        seeds,
        smb,
        smh,
        smi,
        smj,
        h,
        h // hkv,
        *lengths,
        qk_scale,
        float(scale),
        threshold,
        rescale,
        **common,
    )
    return dq, dk, dv
