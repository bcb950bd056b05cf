"""Triton kernel for ``fastdl::linear_cross_entropy`` and ``fastdl::_linear_cross_entropy_backward``
(CUDA).

The rows of ``hidden`` are processed a chunk at a time, so the ``[N, V]`` logits never exist:

1. ``logits = hidden[chunk] @ weight.T (+ bias)`` with ``torch.mm`` / ``torch.addmm`` into one
   reused buffer, in the input dtype (cuBLAS accumulates in float32 and rounds the result, as
   ``F.linear`` does);
2. ``_cross_entropy_kernel``, one program per row of the chunk, walks the vocabulary in blocks of
   ``BLOCK_V`` with an online max / sum of exponentials in base 2 (float32) and writes the row's
   natural-log log-sum-exp and its loss ``lse - logits[target]`` (0 for ``ignore_index``); when a
   gradient is wanted, a second walk overwrites the logits in place with
   ``(softmax - onehot(target)) * row_scale``, the gradient of the loss w.r.t. the logits;
3. ``grad_hidden[chunk] = dlogits @ weight``, ``grad_weight += dlogits.T @ hidden[chunk]``,
   ``grad_bias += dlogits.sum(0)`` (float32) before the next chunk reuses the buffer.

``row_scale`` is 0 for ignored rows, ``1 / (rows not ignored)`` for a mean and 1 for a sum, times
the upstream gradient in the backward pass (per row for ``reduction="none"``, which recomputes the
chunks from the saved log-sum-exp, skipping the first walk). With every row ignored a mean loss is
NaN (0 / 0, as in torch) and the gradients are zero, as torch's are.

Chunk size: ``chunk_rows`` gives each chunk at most ``_CHUNK_LOGITS`` logits (2**23: 16 MiB in
16-bit dtypes, 32 MiB in float32), balanced so that all chunks have about the same number of rows;
GPT-2's head (V = 50257, N = 1024) runs in 7 chunks of 147 rows. The gradient w.r.t. the weight is
accumulated in the weight's dtype (one rounding per chunk in float16 / bfloat16).

The host functions take CPU tensors as well, which lets the Triton interpreter
(``TRITON_INTERPRET=1``) run the kernel on machines without a GPU; it gets a small block and a
small chunk budget, so the tests walk several vocabulary blocks and several chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET

__all__ = ["linear_cross_entropy_forward_op", "linear_cross_entropy_backward_op", "chunk_rows"]

_CHUNK_LOGITS = 256 if _INTERPRET else 1 << 23
_MAX_BLOCK_V = 32 if _INTERPRET else 4096
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- kernel --------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_kernel(
    LOGITS,
    TARGET,
    ROW_SCALE,
    LOSS,
    LSE,
    V,
    ignore_index,
    COMPUTE_LSE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Row program_id 0 of LOGITS [rows, V]: LSE and LOSS (COMPUTE_LSE; otherwise LSE is read),
    and with COMPUTE_GRAD the row overwritten by (softmax - onehot(target)) * ROW_SCALE[row].
    Exponentials are exp2 of logits times log2(e) = 1.4426950408889634; ln(2) = 0.6931471805599453
    brings the log-sum-exp back to natural log."""
    row = tl.program_id(0)
    row_logits = LOGITS + row.to(tl.int64) * V
    target = tl.load(TARGET + row)
    if COMPUTE_LSE:
        running_max = float("-inf")  # in base-2 units, as is the running sum's scale
        running_sum = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_logits + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * 1.4426950408889634
            new_max = tl.maximum(running_max, tl.max(x, 0))
            # while every logit so far is -inf (a bias masking classes) there is nothing to rescale
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.math.exp2(running_max - safe_max) + tl.sum(tl.math.exp2(x - safe_max), 0)
            running_max = new_max
        lse = (running_max + tl.math.log2(running_sum)) * 0.6931471805599453
        valid = target != ignore_index
        picked = tl.load(row_logits + tl.where(valid, target, 0)).to(tl.float32)
        tl.store(LSE + row, lse)
        tl.store(LOSS + row, tl.where(valid, lse - picked, 0.0))
    else:
        lse = tl.load(LSE + row)
    if COMPUTE_GRAD:
        scale = tl.load(ROW_SCALE + row)
        lse2 = lse * 1.4426950408889634
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = cols < V
            x = tl.load(row_logits + cols, mask=ok, other=0.0).to(tl.float32)
            prob = tl.math.exp2(x * 1.4426950408889634 - lse2)
            grad = tl.where(cols == target, prob - 1.0, prob) * scale
            tl.store(row_logits + cols, grad.to(LOGITS.dtype.element_ty), mask=ok)


# ---- host side -----------------------------------------------------------------------------------


def chunk_rows(n: int, v: int, budget: int | None = None) -> int:
    """Rows per chunk for ``n`` rows and ``v`` classes: at most ``budget`` (default
    ``_CHUNK_LOGITS``) logits per chunk (at least one row), the rows spread evenly over as few
    chunks as that allows."""
    budget = _CHUNK_LOGITS if budget is None else budget
    if n == 0:
        return 1
    most = max(1, min(n, budget // v))
    return triton.cdiv(n, triton.cdiv(n, most))


def _composite(name):
    from fastdl.ops import _library

    return _library.composite(name)


def _row_scale(valid, reduction, grad_loss):
    """``Tensor[N]`` float32: what each row's softmax gradient is multiplied by (see the module
    docstring). Stays on the device (no host synchronisation)."""
    scale = valid.to(torch.float32)
    if reduction == "mean":
        scale = scale / scale.sum().clamp_min(1.0)  # all rows ignored: zero gradients, as torch
    return scale if grad_loss is None else scale * grad_loss.to(torch.float32)


def _launch(logits, target, row_scale, losses, lse, ignore_index, compute_lse, compute_grad):
    rows, v = logits.shape
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(v))
    _cross_entropy_kernel[(rows,)](
        logits,
        target,
        row_scale,
        losses,
        lse,
        v,
        ignore_index,
        COMPUTE_LSE=compute_lse,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )


class _ChunkedHead:
    """The chunk loop shared by the forward and the backward pass: one reused logits buffer, and
    the gradient accumulators when they are wanted."""

    def __init__(self, hidden, weight, bias, with_grads):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        n, v = hidden.size(0), weight.size(0)
        self.step = chunk_rows(n, v)
        self.buffer = hidden.new_empty((min(n, self.step), v))
        if with_grads:
            self.grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
            self.grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
            self.grad_bias = torch.zeros(v, dtype=torch.float32, device=hidden.device) if bias is not None else None

    def chunks(self):
        n = self.hidden.size(0)
        return ((start, min(n, start + self.step)) for start in range(0, n, self.step))

    def logits(self, start, stop):
        out = self.buffer[: stop - start]
        rows = self.hidden[start:stop]
        if self.bias is None:
            return torch.mm(rows, self.weight.t(), out=out)
        return torch.addmm(self.bias, rows, self.weight.t(), out=out)

    def accumulate(self, dlogits, start, stop):
        rows = self.hidden[start:stop]
        torch.mm(dlogits, self.weight, out=self.grad_hidden[start:stop])
        self.grad_weight.addmm_(dlogits.t(), rows)
        if self.grad_bias is not None:
            self.grad_bias += dlogits.sum(0, dtype=torch.float32)

    def grads_out(self):
        grad_bias = self.grad_bias.to(self.bias.dtype) if self.bias is not None else self.hidden.new_empty((0,))
        return self.grad_hidden, self.grad_weight, grad_bias


def linear_cross_entropy_forward_op(hidden, weight, target, bias, ignore_index, reduction, compute_grad):
    """``fastdl::linear_cross_entropy`` on Triton: ``(loss, lse, grad_hidden, grad_weight,
    grad_bias)``; ``loss`` in ``hidden``'s dtype (``Tensor[N]`` for ``"none"``, else a scalar),
    ``lse`` ``Tensor[N]`` float32, the gradients of the loss (for a unit upstream gradient) when
    ``compute_grad``, else ``Tensor[0]`` each."""
    from fastdl.ops.linear_cross_entropy import check_inputs, check_targets

    op = "linear_cross_entropy"
    n, _, v = check_inputs(op, hidden, weight, target, bias, reduction)
    if hidden.dtype not in _DTYPES:  # float64: the plain-PyTorch composite
        return _composite(op)(hidden, weight, target, bias, ignore_index, reduction, compute_grad)
    if compute_grad and reduction == "none":
        raise RuntimeError(f"{op}: compute_grad needs a scalar loss (reduction 'mean' or 'sum')")
    valid = check_targets(op, target, v, ignore_index)
    target = target.contiguous()
    losses = torch.zeros((n,), dtype=torch.float32, device=hidden.device)
    lse = torch.empty((n,), dtype=torch.float32, device=hidden.device)
    row_scale = _row_scale(valid, reduction, None) if compute_grad else losses
    head = _ChunkedHead(hidden, weight, bias, compute_grad)
    for start, stop in head.chunks():
        logits = head.logits(start, stop)
        _launch(
            logits,
            target[start:stop],
            row_scale[start:stop],
            losses[start:stop],
            lse[start:stop],
            ignore_index,
            True,
            compute_grad,
        )
        if compute_grad:
            head.accumulate(logits, start, stop)
    if reduction == "none":
        loss = losses
    else:
        loss = losses.sum() / valid.sum() if reduction == "mean" else losses.sum()
    if compute_grad:
        grads = head.grads_out()
    else:
        grads = hidden.new_empty((0,)), weight.new_empty((0,)), hidden.new_empty((0,))
    return loss.to(hidden.dtype), lse, *grads


def linear_cross_entropy_backward_op(grad_loss, hidden, weight, target, bias, lse, ignore_index, reduction):
    """``fastdl::_linear_cross_entropy_backward`` on Triton: ``(grad_hidden, grad_weight,
    grad_bias)`` for the upstream ``grad_loss`` (``Tensor[N]`` for ``"none"``, else a scalar),
    each chunk's logits recomputed and turned into gradients with the forward's ``lse``."""
    from fastdl.ops.linear_cross_entropy import check_inputs, check_targets

    op = "_linear_cross_entropy_backward"
    n, _, v = check_inputs(op, hidden, weight, target, bias, reduction)
    if hidden.dtype not in _DTYPES:
        return _composite(op)(grad_loss, hidden, weight, target, bias, lse, ignore_index, reduction)
    valid = check_targets(op, target, v, ignore_index)
    expected_shape = [n] if reduction == "none" else []
    if list(grad_loss.shape) != expected_shape:
        raise RuntimeError(f"{op}: grad_loss has shape {list(grad_loss.shape)}, expected {expected_shape}")
    if list(lse.shape) != [n] or lse.device != hidden.device:
        raise RuntimeError(
            f"{op}: expected lse of shape [{n}] on {hidden.device} (one per row of hidden), "
            f"got shape {list(lse.shape)} on {lse.device}"
        )
    target = target.contiguous()
    lse = lse.to(torch.float32).contiguous()
    row_scale = _row_scale(valid, reduction, grad_loss).contiguous()
    head = _ChunkedHead(hidden, weight, bias, True)
    for start, stop in head.chunks():
        logits = head.logits(start, stop)
        _launch(logits, target[start:stop], row_scale[start:stop], lse, lse[start:stop], ignore_index, False, True)
        head.accumulate(logits, start, stop)
    return head.grads_out()
