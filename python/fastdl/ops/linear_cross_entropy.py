"""A linear layer followed by cross-entropy, computed a chunk of rows at a time.

``linear_cross_entropy(h, W, y)`` equals ``F.cross_entropy(h @ W.T, y)`` without the
``[N, V]`` logits: a language model's head at vocabulary 50257 and 1024 tokens would hold 206 MB
of float32 logits and as much again for their gradient. Each chunk's logits are formed, reduced to
the loss and, when a gradient is wanted, turned into ``softmax - onehot`` in place and multiplied
into the gradients of ``h`` and ``W`` before the next chunk reuses the buffer.

For ``reduction="mean"`` or ``"sum"`` the gradients are computed during the forward pass (the loss
is a scalar, so the backward pass only scales them), which costs no extra matrix product. For
``reduction="none"`` the backward pass recomputes each chunk's logits from the saved log-sum-exp.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._library import register_autocast, register_composite

__all__ = ["linear_cross_entropy"]

_OP = "linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, target)`` without materialising the logits.

    Args:
        hidden: ``Tensor[N, E]`` (or ``Tensor[*, E]``, flattened to rows).
        weight: ``Tensor[V, E]``, the classifier (a language model's tied embedding).
        target: ``Tensor[N]`` int64 class indices in ``[0, V)`` or ``ignore_index``.
        bias: ``Tensor[V]`` or ``None``.
        ignore_index: rows with this target add no loss and get no gradient.
        reduction: ``"mean"`` (over the rows not ignored; NaN if every row is, as torch),
            ``"sum"`` or ``"none"`` (``Tensor[N]``, 0 for ignored rows).

    Returns:
        The loss in ``hidden``'s dtype (accumulated in float32, float64 for float64 inputs).

    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() > 2:
        hidden = hidden.reshape(-1, hidden.size(-1))
        target = target.reshape(-1)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, _, _, _, _ = torch.ops.fastdl.linear_cross_entropy.default(
        hidden, weight, target, bias, int(ignore_index), reduction, wants_grad and reduction != "none"
    )
    return loss


# ---- argument checks (shared by the composite and the fake kernels; C++ twin: linear_cross_entropy.h) ----


def _fail(op: str, msg: str):
    raise RuntimeError(f"{op}: {msg}")


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(op, hidden, weight, target, bias, reduction) -> tuple[int, int, int]:
    """Returns (N, E, V) after the checks the native kernels make (values excepted)."""
    if hidden.dtype not in _DTYPES:
        _fail(op, f"hidden has unsupported dtype {hidden.dtype}; supported: float16, bfloat16, float32, float64")
    if target.dtype != torch.int64:
        _fail(op, f"target must be int64 class indices, got dtype {target.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            _fail(op, f"hidden has dtype {hidden.dtype} but {name} has dtype {t.dtype}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            _fail(op, f"hidden is on {hidden.device} but {name} is on {t.device}; move them to the same device")
    if reduction not in REDUCTIONS:
        _fail(op, f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2:
        _fail(op, f"expected hidden to be a 2-D tensor [N, E], but got shape {list(hidden.shape)}")
    if weight.dim() != 2:
        _fail(op, f"expected weight to be a 2-D tensor [V, E], but got shape {list(weight.shape)}")
    n, e = hidden.shape
    v = weight.size(0)
    if weight.size(1) != e:
        _fail(
            op, f"hidden {list(hidden.shape)} has E={e} features but weight {list(weight.shape)} has {weight.size(1)}"
        )
    if v == 0:
        _fail(op, f"weight has no classes (shape {list(weight.shape)})")
    if target.dim() != 1 or target.size(0) != n:
        _fail(op, f"expected target of shape [{n}] (one class per row of hidden), got {list(target.shape)}")
    if bias is not None and list(bias.shape) != [v]:
        _fail(op, f"expected bias of shape [{v}], got {list(bias.shape)}")
    return n, e, v


def check_targets(op, target, v, ignore_index):
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= v))
    if bool(bad.any()):
        first = int(target[bad][0])
        _fail(op, f"target {first} is out of range for {v} classes (and is not ignore_index={ignore_index})")
    return valid


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _loss_shape(n: int, reduction: str) -> tuple[int, ...]:
    return (n,) if reduction == "none" else ()


# ---- fake kernels ------------------------------------------------------------------------------


@torch.library.register_fake("fastdl::linear_cross_entropy")
def _linear_cross_entropy_fake(hidden, weight, target, bias, ignore_index, reduction, compute_grad):
    n, _, _ = check_inputs("linear_cross_entropy", hidden, weight, target, bias, reduction)
    loss = hidden.new_empty(_loss_shape(n, reduction))
    lse = hidden.new_empty((n,), dtype=loss_dtype(hidden.dtype))
    return loss, lse, *_grad_buffers(hidden, weight, bias, compute_grad)


@torch.library.register_fake("fastdl::_linear_cross_entropy_backward")
def _linear_cross_entropy_backward_fake(grad_loss, hidden, weight, target, bias, lse, ignore_index, reduction):
    check_inputs("_linear_cross_entropy_backward", hidden, weight, target, bias, reduction)
    return _grad_buffers(hidden, weight, bias, True)


def _grad_buffers(hidden, weight, bias, compute_grad):
    """The gradient outputs (hidden, weight, bias): their shapes when computed, else empty."""
    if not compute_grad:
        return hidden.new_empty((0,)), weight.new_empty((0,)), hidden.new_empty((0,))
    grad_bias = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty((0,))
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


# ---- autograd ----------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    hidden, weight, target, bias, ignore_index, reduction, compute_grad = inputs
    _, lse, grad_hidden, grad_weight, grad_bias = output
    ctx.precomputed = compute_grad
    ctx.has_bias = bias is not None
    if compute_grad:
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    else:
        ctx.save_for_backward(hidden, weight, target, bias, lse)
    ctx.params = (ignore_index, reduction)
    ctx.mark_non_differentiable(lse, grad_hidden, grad_weight, grad_bias)
    # Only the loss gets a gradient: materialised, the other outputs' would be zeros of their
    # shapes, a [V, E] buffer for the weight's on every step.
    ctx.set_materialize_grads(False)


def _is_one(grad: Tensor) -> bool:
    """Whether an upstream gradient is exactly 1 (``loss.backward()``), read only where it holds a
    value: a plain tensor, not one that torch.compile, opcheck or torch.func traces."""
    if (
        type(grad) is not Tensor
        or torch.compiler.is_compiling()
        or torch._C._functorch.is_functorch_wrapped_tensor(grad)
    ):
        return False
    return bool(grad == 1)


def _backward(ctx, grad_loss, *_unused):
    if grad_loss is None:  # only the non-differentiable outputs were given gradients
        return None, None, None, None, None, None, None
    if ctx.precomputed:
        # The forward pass computed d(loss)/d(input) for a unit upstream gradient. For a unit one
        # they are handed on as they are: a [V, E] weight gradient is not copied, and once the
        # graph is freed autograd adds a tied embedding's gradient into it in place.
        grads = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = grads if _is_one(grad_loss) else (t * grad_loss for t in grads)
    else:
        hidden, weight, target, bias, lse = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = torch.ops.fastdl._linear_cross_entropy_backward.default(
            grad_loss, hidden, weight, target, bias, lse, *ctx.params
        )
    return grad_hidden, grad_weight, None, grad_bias if ctx.has_bias else None, None, None, None


torch.library.register_autograd("fastdl::linear_cross_entropy", _backward, setup_context=_setup_context)
# torch's autocast runs a linear in the lower dtype and cross-entropy in float32; fastdl's fused op
# multiplies in the lower dtype and accumulates the softmax in float32 anyway
register_autocast(_OP, "lower")


# ---- composite (plain PyTorch; serves MPS and devices without a native kernel) ----------------
#
# The algorithm of the native kernels: row chunks whose logits stay below _CHUNK_ELEMENTS.

_CHUNK_ELEMENTS = 1 << 23


def chunk_rows(n: int, v: int) -> int:
    return max(1, min(n, _CHUNK_ELEMENTS // v))


def _row_scale(valid, reduction, grad_loss, cdt):
    """The factor each row's softmax gradient is multiplied by, ``Tensor[N]``: 0 for ignored rows,
    ``1 / count`` for a mean, times the upstream gradient (scalar, or per row for ``"none"``)."""
    scale = valid.to(cdt)
    if reduction == "mean":
        scale = scale / scale.sum().clamp_min(1)  # every row ignored: zero gradients, as torch
    return scale if grad_loss is None else scale * grad_loss.to(cdt)


def _chunks(hidden, weight, bias, start, stop, cdt):
    logits = hidden[start:stop].to(cdt) @ weight.to(cdt).t()
    return logits + bias.to(cdt) if bias is not None else logits


def _accumulate_grads(dlogits, hidden, weight, start, stop, grads, cdt):
    grad_hidden, grad_weight, grad_bias = grads
    grad_hidden[start:stop] = dlogits @ weight.to(cdt)
    grad_weight += dlogits.t() @ hidden[start:stop].to(cdt)
    if grad_bias is not None:
        grad_bias += dlogits.sum(0)


def _softmax_minus_onehot(logits, lse, target, valid, scale):
    """(softmax(logits) - onehot(target)) * scale per row, in place of ``logits``."""
    dlogits = logits.sub_(lse[:, None]).exp_()
    rows = torch.arange(target.numel(), device=target.device)
    dlogits[rows[valid], target[valid]] -= 1
    return dlogits.mul_(scale[:, None])


def _new_grads(hidden, weight, bias, cdt):
    return (
        hidden.new_zeros(hidden.shape, dtype=cdt),
        weight.new_zeros(weight.shape, dtype=cdt),
        bias.new_zeros(bias.shape, dtype=cdt) if bias is not None else None,
    )


def _grads_out(grads, hidden, weight, bias):
    grad_hidden, grad_weight, grad_bias = grads
    grad_bias = grad_bias.to(bias.dtype) if bias is not None else hidden.new_empty((0,))
    return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), grad_bias


@register_composite(_OP, cuda_kernel="Triton")
def linear_cross_entropy_composite(hidden, weight, target, bias, ignore_index, reduction, compute_grad):
    n, _, v = check_inputs("linear_cross_entropy", hidden, weight, target, bias, reduction)
    if compute_grad and reduction == "none":
        _fail("linear_cross_entropy", "compute_grad needs a scalar loss (reduction 'mean' or 'sum')")
    valid = check_targets("linear_cross_entropy", target, v, ignore_index)
    cdt = loss_dtype(hidden.dtype)
    losses = hidden.new_zeros((n,), dtype=cdt)
    lse = hidden.new_zeros((n,), dtype=cdt)
    grads = _new_grads(hidden, weight, bias, cdt) if compute_grad else None
    scale = _row_scale(valid, reduction, None, cdt) if compute_grad else None
    safe_target = torch.where(valid, target, 0)
    step = chunk_rows(n, v)
    for start in range(0, n, step):
        stop = min(n, start + step)
        logits = _chunks(hidden, weight, bias, start, stop, cdt)
        lse[start:stop] = torch.logsumexp(logits, dim=1)
        picked = logits.gather(1, safe_target[start:stop, None])[:, 0]
        losses[start:stop] = torch.where(valid[start:stop], lse[start:stop] - picked, 0)
        if compute_grad:
            dlogits = _softmax_minus_onehot(
                logits, lse[start:stop], target[start:stop], valid[start:stop], scale[start:stop]
            )
            _accumulate_grads(dlogits, hidden, weight, start, stop, grads, cdt)
    if reduction == "none":
        loss = losses
    else:
        loss = losses.sum() / valid.sum() if reduction == "mean" else losses.sum()
    grad_outputs = (
        _grads_out(grads, hidden, weight, bias) if compute_grad else _grad_buffers(hidden, weight, bias, False)
    )
    return loss.to(hidden.dtype), lse, *grad_outputs


@register_composite("_linear_cross_entropy_backward", cuda_kernel="Triton")
def linear_cross_entropy_backward_composite(grad_loss, hidden, weight, target, bias, lse, ignore_index, reduction):
    n, _, v = check_inputs("_linear_cross_entropy_backward", hidden, weight, target, bias, reduction)
    valid = check_targets("_linear_cross_entropy_backward", target, v, ignore_index)
    cdt = loss_dtype(hidden.dtype)
    if list(grad_loss.shape) != list(_loss_shape(n, reduction)):
        _fail(
            "_linear_cross_entropy_backward",
            f"grad_loss has shape {list(grad_loss.shape)}, expected {list(_loss_shape(n, reduction))}",
        )
    scale = _row_scale(valid, reduction, grad_loss, cdt)
    grads = _new_grads(hidden, weight, bias, cdt)
    step = chunk_rows(n, v)
    for start in range(0, n, step):
        stop = min(n, start + step)
        logits = _chunks(hidden, weight, bias, start, stop, cdt)
        dlogits = _softmax_minus_onehot(
            logits, lse[start:stop].to(cdt), target[start:stop], valid[start:stop], scale[start:stop]
        )
        _accumulate_grads(dlogits, hidden, weight, start, stop, grads, cdt)
    return _grads_out(grads, hidden, weight, bias)


# ---- CUDA: Triton kernels, registered only where they can run -----------------------------------

from ._library import register_triton_kernels, triton_available  # noqa: E402

if triton_available():
    from fastdl.kernels import linear_cross_entropy as triton_linear_cross_entropy

    register_triton_kernels(
        {
            "linear_cross_entropy": triton_linear_cross_entropy.linear_cross_entropy_forward_op,
            "_linear_cross_entropy_backward": triton_linear_cross_entropy.linear_cross_entropy_backward_op,
        }
    )
