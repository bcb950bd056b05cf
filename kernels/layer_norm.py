"""Triton kernels for ``fastdl::layer_norm`` and ``fastdl::_layer_norm_backward`` (CUDA).

The input is viewed as ``Tensor[rows, row_size]`` (``row_size = prod(normalized_shape)``); every
statistic is float32 whatever the input dtype (float16, bfloat16, float32; float64 goes to the
composite).

Forward, two shapes of the same work:

* rows up to ``_MAX_ONE_BLOCK`` elements (every transformer width in use): one program per
  ``[BLOCK_M, BLOCK_N]`` tile of whole rows, ``BLOCK_N`` the row size rounded up to a power of
  two. It adds the residual (rounded to the input dtype, as ``input + residual`` is, and written
  out), computes the mean and the variance from the tile in registers (two-pass, no cancellation),
  and writes the output, the mean and ``rstd = 1 / sqrt(var + eps)``: one read, one write.
* longer rows: ``_row_stats_kernel`` walks each row in blocks of ``_LOOP_BLOCK``, merging the
  blocks' (count, mean, sum of squared deviations) with Chan's pairwise formula (one read, and as
  stable as two passes), writing the residual sum; then the same normalising kernel runs with one
  program per ``[BLOCK_M, _LOOP_BLOCK]`` tile (``BLOCK_M = 1`` on a GPU), reading the saved
  statistics.

Backward, with ``xhat = (x - mean) * rstd`` and ``g = dy * weight``:
``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` per row, ``dweight = sum_rows dy * xhat``,
``dbias = sum_rows dy``. Every program owns a range of rows (and, for long rows, one column block);
it writes its rows' ``dx`` and its float32 partial sums of ``dweight`` / ``dbias`` to its own row
of a ``[programs, row_size]`` buffer, and one ``sum`` over the programs finishes them:
deterministic, no atomics. Long rows first get their two row means from ``_grad_row_sums_kernel``.

The host functions take CPU tensors as well, which lets the Triton interpreter
(``TRITON_INTERPRET=1``) run these kernels on machines without a GPU; it gets small blocks so the
tests reach the multi-row tiles, the looped rows and the multi-program partial sums.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET

__all__ = ["layer_norm_forward_op", "layer_norm_backward_op"]

# rows up to this many elements are handled as one block; longer ones in blocks of _LOOP_BLOCK
_MAX_ONE_BLOCK = 128 if _INTERPRET else 8192
_LOOP_BLOCK = 32 if _INTERPRET else 4096
# short rows are batched BLOCK_M at a time so that a tile holds about this many elements
_TILE_ELEMENTS = 256 if _INTERPRET else 4096

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- kernels -------------------------------------------------------------------------------------


@triton.jit
def _tile(pid_rows, pid_cols, ROWS, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices, column indices, their masks and the flat offsets of one [BLOCK_M, BLOCK_N] tile."""
    rows = pid_rows * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_cols * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < ROWS
    col_ok = cols < N
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    return rows, cols, row_ok, col_ok, row_ok[:, None] & col_ok[None, :], offs


@triton.jit
def _load_sum(X, RES, RES_OUT, offs, ok, HAS_RESIDUAL: tl.constexpr):
    """x (or x + residual, rounded to the input dtype and stored to RES_OUT) in float32."""
    x = tl.load(X + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        total = (x.to(tl.float32) + tl.load(RES + offs, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(RES_OUT + offs, total, mask=ok)
        x = total
    return x.to(tl.float32)


@triton.jit
def _row_stats_kernel(X, RES, RES_OUT, MEAN, RSTD, N, eps, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Mean and rstd of one long row (program_id 0), walked in blocks of BLOCK_N."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * N
    count = 0.0
    mean = 0.0
    m2 = 0.0  # sum of squared deviations from the running mean
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        ok = cols < N
        x = _load_sum(X, RES, RES_OUT, base + cols, ok, HAS_RESIDUAL)
        block_count = tl.minimum(N - start, BLOCK_N).to(tl.float32)
        block_mean = tl.sum(x, 0) / block_count
        dev = tl.where(ok, x - block_mean, 0.0)
        # Chan et al.: merge (count, mean, m2) with this block's statistics
        total = count + block_count
        delta = block_mean - mean
        mean = mean + delta * (block_count / total)
        m2 = m2 + tl.sum(dev * dev, 0) + delta * delta * (count * block_count / total)
        count = total
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, tl.math.rsqrt(m2 / N + eps))


@triton.jit
def _normalize_kernel(
    X,
    RES,
    W,
    B,
    Y,
    RES_OUT,
    MEAN,
    RSTD,
    ROWS,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STATS_INLINE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y = (x - mean) * rstd * weight + bias on one tile. STATS_INLINE: the tile holds whole rows
    (one column block), so the statistics are computed here and stored; otherwise they are read
    from MEAN / RSTD and X already holds the residual sum."""
    rows, cols, row_ok, col_ok, ok, offs = _tile(tl.program_id(0), tl.program_id(1), ROWS, N, BLOCK_M, BLOCK_N)
    if STATS_INLINE:
        x = _load_sum(X, RES, RES_OUT, offs, ok, HAS_RESIDUAL)
        mean = tl.sum(x, 1) / N
        dev = tl.where(ok, x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(dev * dev, 1) / N + eps)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)
    else:
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        dev = x - tl.load(MEAN + rows, mask=row_ok, other=0.0)[:, None]
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    y = dev * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _load_grad_terms(DY, X, W, MEAN, RSTD, rows, cols, row_ok, col_ok, ok, offs, HAS_WEIGHT: tl.constexpr):
    """(dy, xhat, g = dy * weight, rstd) of one tile in float32, zero outside it."""
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if HAS_WEIGHT:
        g = dy * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return dy, xhat, g, rstd


@triton.jit
def _grad_row_sums_kernel(DY, X, W, MEAN, RSTD, SUMS, ROWS, N, HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """SUMS[row] = (mean(g * xhat), mean(g)) of one long row (program_id 0)."""
    row = tl.program_id(0)
    g_xhat = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    g_sum = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        rows, cols, row_ok, col_ok, ok, offs = _tile(row, start // BLOCK_N, ROWS, N, 1, BLOCK_N)
        _, xhat, g, _ = _load_grad_terms(DY, X, W, MEAN, RSTD, rows, cols, row_ok, col_ok, ok, offs, HAS_WEIGHT)
        g_xhat += g * xhat
        g_sum += g
    tl.store(SUMS + 2 * row, tl.sum(tl.sum(g_xhat, 1), 0) / N)
    tl.store(SUMS + 2 * row + 1, tl.sum(tl.sum(g_sum, 1), 0) / N)


@triton.jit
def _grad_kernel(
    DY,
    X,
    W,
    MEAN,
    RSTD,
    SUMS,
    DX,
    DW_PARTIAL,
    DB_PARTIAL,
    ROWS,
    N,
    ROWS_PER_PROGRAM,
    HAS_WEIGHT: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    SUMS_INLINE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dx of the rows [program_id 1 * ROWS_PER_PROGRAM, + ROWS_PER_PROGRAM) in column block
    program_id 0, and their partial dweight / dbias in row program_id 1 of the partial buffers.
    SUMS_INLINE: the column block is the whole row, so the two row means are computed here."""
    pid_cols = tl.program_id(0)
    pid_rows = tl.program_id(1)
    row_start = pid_rows * ROWS_PER_PROGRAM
    row_end = tl.minimum(ROWS, row_start + ROWS_PER_PROGRAM)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for block_start in range(row_start, row_end, BLOCK_M):
        rows, cols, row_ok, col_ok, ok, offs = _tile(block_start // BLOCK_M, pid_cols, row_end, N, BLOCK_M, BLOCK_N)
        dy, xhat, g, rstd = _load_grad_terms(DY, X, W, MEAN, RSTD, rows, cols, row_ok, col_ok, ok, offs, HAS_WEIGHT)
        if SUMS_INLINE:
            mean_g_xhat = tl.sum(g * xhat, 1) / N
            mean_g = tl.sum(g, 1) / N
        else:
            mean_g_xhat = tl.load(SUMS + 2 * rows, mask=row_ok, other=0.0)
            mean_g = tl.load(SUMS + 2 * rows + 1, mask=row_ok, other=0.0)
        dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_g_xhat[:, None])
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)
        if WEIGHT_GRAD:
            dw += tl.sum(dy * xhat, 0)
        if BIAS_GRAD:
            db += tl.sum(dy, 0)
    cols = pid_cols * BLOCK_N + tl.arange(0, BLOCK_N)
    partial_offs = pid_rows.to(tl.int64) * N + cols
    if WEIGHT_GRAD:
        tl.store(DW_PARTIAL + partial_offs, dw, mask=cols < N)
    if BIAS_GRAD:
        tl.store(DB_PARTIAL + partial_offs, db, mask=cols < N)


# ---- host side -----------------------------------------------------------------------------------


def _composite(name):
    from fastdl.ops import _library

    return _library.composite(name)


def _blocks(rows: int, row_size: int) -> tuple[int, int, bool]:
    """(BLOCK_M, BLOCK_N, whole rows in one block) of the tiles for ``rows`` rows of ``row_size``
    elements: BLOCK_M rows (no more than there are) of about _TILE_ELEMENTS elements together."""
    one_block = row_size <= _MAX_ONE_BLOCK
    block_n = triton.next_power_of_2(row_size) if one_block else _LOOP_BLOCK
    block_m = min(max(1, _TILE_ELEMENTS // block_n), triton.next_power_of_2(rows))
    return block_m, block_n, one_block


def _num_warps(tile_elements: int) -> int:
    return 4 if tile_elements <= 1024 else 8 if tile_elements <= 4096 else 16


@functools.lru_cache(maxsize=None)
def _partial_sum_programs(device: torch.device) -> int:
    """How many programs share the rows in the backward pass (each owns one row of the partial
    sums): two per multiprocessor; three in the interpreter, so the tests reduce over several."""
    if _INTERPRET or device.type != "cuda":
        return 3
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _rows_of(t: torch.Tensor, rows: int, row_size: int) -> torch.Tensor:
    return t.contiguous().view(rows, row_size)


def _check_backward_inputs(grad_output, input, mean, rstd, rows):
    """What the kernels read beyond ``check_inputs``: grad_output of input's shape, one mean and
    one rstd per row, all on input's device."""
    op = "_layer_norm_backward"
    if grad_output.shape != input.shape or grad_output.device != input.device:
        raise RuntimeError(
            f"{op}: grad_output has shape {list(grad_output.shape)} on {grad_output.device}, "
            f"expected input's shape {list(input.shape)} on {input.device}"
        )
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.numel() != rows or t.device != input.device:
            raise RuntimeError(
                f"{op}: expected {name} with {rows} elements (one per row) on {input.device}, "
                f"got shape {list(t.shape)} on {t.device}"
            )


def layer_norm_forward_op(input, normalized_shape, weight, bias, residual, eps):
    """``fastdl::layer_norm`` on Triton: ``(output, residual_out, mean, rstd)`` with ``output``
    and ``residual_out = input + residual`` (``Tensor[0]`` without a residual) of ``input``'s
    shape and dtype, ``mean`` and ``rstd`` ``Tensor[rows]`` float32."""
    from fastdl.ops.layer_norm import check_inputs

    rows, row_size = check_inputs("layer_norm", input, normalized_shape, weight, bias, residual, eps)
    if input.dtype not in _DTYPES:  # float64: the plain-PyTorch composite
        return _composite("layer_norm")(input, normalized_shape, weight, bias, residual, eps)
    x = _rows_of(input, rows, row_size)
    out = torch.empty((rows, row_size), dtype=input.dtype, device=input.device)
    residual_out = torch.empty_like(out) if residual is not None else input.new_empty((0,))
    mean = torch.empty((rows,), dtype=torch.float32, device=input.device)
    rstd = torch.empty_like(mean)
    if rows:
        res = _rows_of(residual, rows, row_size) if residual is not None else x
        w = weight.contiguous() if weight is not None else x
        b = bias.contiguous() if bias is not None else x
        block_m, block_n, one_block = _blocks(rows, row_size)
        if not one_block:
            _row_stats_kernel[(rows,)](
                x,
                res,
                residual_out,
                mean,
                rstd,
                row_size,
                eps,
                HAS_RESIDUAL=residual is not None,
                BLOCK_N=block_n,
                num_warps=_num_warps(block_n),
            )
            if residual is not None:  # the sum is what gets normalised
                x = residual_out
        grid = (triton.cdiv(rows, block_m), triton.cdiv(row_size, block_n))
        _normalize_kernel[grid](
            x,
            res,
            w,
            b,
            out,
            residual_out,
            mean,
            rstd,
            rows,
            row_size,
            eps,
            HAS_RESIDUAL=one_block and residual is not None,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            STATS_INLINE=one_block,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=_num_warps(block_m * block_n),
        )
    if residual is not None:
        residual_out = residual_out.view(input.shape)
    return out.view(input.shape), residual_out, mean, rstd


def layer_norm_backward_op(grad_output, input, weight, mean, rstd, normalized_shape, output_mask):
    """``fastdl::_layer_norm_backward`` on Triton: ``(grad_input, grad_weight, grad_bias)``;
    ``input`` is what was normalised (the residual sum when there was one). ``grad_weight`` is
    ``Tensor[0]`` unless ``output_mask[1]`` and there is a weight, ``grad_bias`` unless
    ``output_mask[2]``; ``grad_input`` is always computed (the fake kernel gives it ``input``'s
    shape)."""
    from fastdl.ops.layer_norm import check_inputs

    rows, row_size = check_inputs("_layer_norm_backward", input, normalized_shape, weight, None, None, 0.0)
    if input.dtype not in _DTYPES:
        return _composite("_layer_norm_backward")(grad_output, input, weight, mean, rstd, normalized_shape, output_mask)
    _check_backward_inputs(grad_output, input, mean, rstd, rows)
    # no weight, no weight gradient (the composite's and the fake kernel's rule)
    weight_grad, bias_grad = bool(output_mask[1]) and weight is not None, bool(output_mask[2])
    grad_input = torch.empty((rows, row_size), dtype=input.dtype, device=input.device)
    empty = input.new_empty((0,))
    if rows == 0:
        zeros = input.new_zeros(normalized_shape)
        return grad_input.view(input.shape), zeros if weight_grad else empty, zeros if bias_grad else empty

    x = _rows_of(input, rows, row_size)
    dy = _rows_of(grad_output, rows, row_size)
    mean = mean.to(torch.float32).contiguous()
    rstd = rstd.to(torch.float32).contiguous()
    w = weight.contiguous() if weight is not None else x
    block_m, block_n, one_block = _blocks(rows, row_size)
    col_blocks = triton.cdiv(row_size, block_n)
    # whole BLOCK_M tiles per program, and enough programs to fill the device
    row_groups = min(math.ceil(_partial_sum_programs(input.device) / col_blocks), triton.cdiv(rows, block_m))
    rows_per_program = triton.cdiv(triton.cdiv(rows, row_groups), block_m) * block_m
    row_groups = triton.cdiv(rows, rows_per_program)

    sums = mean  # unused placeholder when the row means are computed inline
    if not one_block:
        sums = torch.empty((rows, 2), dtype=torch.float32, device=input.device)
        _grad_row_sums_kernel[(rows,)](
            dy,
            x,
            w,
            mean,
            rstd,
            sums,
            rows,
            row_size,
            HAS_WEIGHT=weight is not None,
            BLOCK_N=block_n,
            num_warps=_num_warps(block_n),
        )
    partial_w = torch.empty((row_groups, row_size), dtype=torch.float32, device=input.device) if weight_grad else mean
    partial_b = torch.empty((row_groups, row_size), dtype=torch.float32, device=input.device) if bias_grad else mean
    _grad_kernel[(col_blocks, row_groups)](
        dy,
        x,
        w,
        mean,
        rstd,
        sums,
        grad_input,
        partial_w,
        partial_b,
        rows,
        row_size,
        rows_per_program,
        HAS_WEIGHT=weight is not None,
        WEIGHT_GRAD=weight_grad,
        BIAS_GRAD=bias_grad,
        SUMS_INLINE=one_block,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=_num_warps(block_m * block_n),
    )
    grad_weight = partial_w.sum(0).to(input.dtype).view(normalized_shape) if weight_grad else empty
    grad_bias = partial_b.sum(0).to(input.dtype).view(normalized_shape) if bias_grad else empty
    return grad_input.view(input.shape), grad_weight, grad_bias
