"""LSTM: a fused cell and a whole-sequence, multi-layer LSTM with ``torch.nn.LSTM`` semantics.

Everything runs on one operator, ``fastdl::lstm_layer``: one layer in one direction over a whole
sequence (padded ``[T, B, I]`` or packed rows with ``batch_sizes``). Its native kernels
(``csrc/ops/lstm/``) compute the input projection of all steps in one GEMM and run the recurrence
in C++/CUDA with one fused pointwise kernel per step; layers, directions and dropout are stacked
here in Python. The cell is the same operator with ``T = 1``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ._library import register_composite

__all__ = ["lstm", "lstm_cell"]


def lstm_cell(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None, b_hh: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One fused LSTM step, as ``torch.nn.LSTMCell`` (gate order i, f, g, o).

    Args:
        x: ``Tensor[B, I]``.
        h, c: ``Tensor[B, H]``, the previous hidden and cell state.
        w_ih: ``Tensor[4H, I]``; w_hh: ``Tensor[4H, H]``; b_ih, b_hh: ``Tensor[4H]`` or ``None``.

    Returns:
        ``(h_new, c_new)``, each ``Tensor[B, H]``: ``c_new = f * c + i * g``,
        ``h_new = o * tanh(c_new)`` with ``[i, f, g, o] = x w_ih^T + b_ih + h w_hh^T + b_hh``
        passed through sigmoid, sigmoid, tanh, sigmoid.

    Differentiable w.r.t. every tensor argument. Both products land in one gates buffer; the
    biases, the four activations and the new states are one fused pass.
    """
    if x.dim() != 2 or h.dim() != 2 or c.dim() != 2:
        raise ValueError(
            f"lstm_cell: expected x [B, I], h [B, H] and c [B, H], got shapes {list(x.shape)}, "
            f"{list(h.shape)} and {list(c.shape)}"
        )
    hidden = w_ih.size(0) // 4
    if x.size(0) != h.size(0) or h.shape != c.shape or h.size(1) != hidden:
        raise ValueError(
            f"lstm_cell: x {list(x.shape)} needs h and c of shape [{x.size(0)}, {hidden}] "
            f"(hidden_size={hidden} from w_ih {list(w_ih.shape)}), got h {list(h.shape)} and c {list(c.shape)}"
        )
    _, h_new, c_new, _, _ = torch.ops.fastdl.lstm_layer.default(
        x.unsqueeze(0), None, h, c, w_ih, w_hh, b_ih, b_hh, None, False, _needs_grad(x, h, c, w_ih, w_hh, b_ih, b_hh)
    )
    return h_new, c_new


def lstm(
    input: Tensor | PackedSequence,
    weights: Sequence[Tensor],
    hx: tuple[Tensor, Tensor] | None = None,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    bias: bool = True,
    proj_size: int = 0,
    dropout: float = 0.0,
    training: bool = False,
    batch_first: bool = False,
    lengths: Tensor | Sequence[int] | None = None,
) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
    """A multi-layer LSTM over whole sequences, with the semantics of ``torch.nn.LSTM``.

    Args:
        input: ``Tensor[T, B, I]`` (``[B, T, I]`` with ``batch_first``), unbatched ``Tensor[T, I]``,
            or a ``PackedSequence`` of rows ``Tensor[N, I]`` (sorted or not).
        weights: ``torch.nn.LSTM._flat_weights`` order: for each layer, for each direction,
            ``w_ih [4H, I_l]``, ``w_hh [4H, P]``, then ``b_ih [4H]``, ``b_hh [4H]`` if ``bias``, then
            ``w_hr [P, H]`` if ``proj_size > 0``. ``I_l`` is ``I`` for layer 0 and ``D * P``
            after it (``D`` = 2 if bidirectional else 1; ``P`` = ``proj_size`` or ``H``).
        hx: ``(h0 [L * D, B, P], c0 [L * D, B, H])`` (without the batch dimension for unbatched
            input), zeros if ``None``; in the caller's batch order also for unsorted packed input.
        dropout: applied to the output of every layer but the last when ``training``.
        lengths: for padded input, the length of every sequence (``[B]``, each in ``1 .. T``): the
            steps past a sequence's end are skipped, their outputs are zero and ``h_n``, ``c_n`` hold
            the state at its last step (as packing the input would give).

    Returns:
        ``(output, (h_n, c_n))``: ``output`` is ``Tensor[T, B, D * P]`` (``[B, T, D * P]`` with
        ``batch_first``) or a ``PackedSequence`` like the input; ``h_n [L * D, B, P]``,
        ``c_n [L * D, B, H]``.

    Packed sequences run with a shrinking batch: step ``t`` only computes the ``batch_sizes[t]``
    sequences still running, so the work is proportional to the total length, not ``T * B``.
    """
    if lengths is not None:
        return _lstm_with_lengths(
            input,
            weights,
            hx,
            lengths,
            num_layers=num_layers,
            bidirectional=bidirectional,
            bias=bias,
            proj_size=proj_size,
            dropout=dropout,
            training=training,
            batch_first=batch_first,
        )
    directions = 2 if bidirectional else 1
    per_layer = 2 + 2 * bool(bias) + (proj_size > 0)
    if len(weights) != num_layers * directions * per_layer:
        raise ValueError(
            f"lstm: expected {num_layers * directions * per_layer} weights ({num_layers} layers x {directions} "
            f"directions x {per_layer}), got {len(weights)}"
        )
    hidden = weights[0].size(0) // 4
    out_size = proj_size if proj_size > 0 else hidden
    input_size = weights[0].size(1)

    packed = isinstance(input, PackedSequence)
    unbatched = False
    if packed:
        x, batch_sizes, sorted_indices, unsorted_indices = input
        batch = int(batch_sizes[0]) if batch_sizes.numel() else 0
    else:
        x, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
        if x.dim() not in (2, 3):
            raise ValueError(
                f"lstm: expected input to be 2-D (unbatched) or 3-D, got {x.dim()}-D of shape {list(x.shape)}"
            )
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        elif batch_first:
            x = x.transpose(0, 1)
        batch = x.size(1)
    if x.size(-1) != input_size:
        raise ValueError(f"lstm: input.size(-1) must be equal to input_size. Expected {input_size}, got {x.size(-1)}")

    states = num_layers * directions
    if hx is None:
        h0 = x.new_zeros(states, batch, out_size)
        c0 = x.new_zeros(states, batch, hidden)
    else:
        h0, c0 = hx
        if unbatched:
            if h0.dim() != 2 or c0.dim() != 2:
                raise ValueError(
                    f"lstm: for unbatched 2-D input, h0 and c0 must be 2-D, got {h0.dim()}-D and {c0.dim()}-D"
                )
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        for name, state, width in (("h0", h0, out_size), ("c0", c0, hidden)):
            if tuple(state.shape) != (states, batch, width):
                raise ValueError(f"lstm: expected {name} of size {(states, batch, width)}, got {tuple(state.shape)}")
        if sorted_indices is not None:
            h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)

    save_activations = _needs_grad(x, h0, c0, *weights)
    h_n, c_n = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w = list(weights[k * per_layer : (k + 1) * per_layer])
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
            w_hr = w[-1] if proj_size > 0 else None
            out, h, c, _, _ = torch.ops.fastdl.lstm_layer.default(
                x, batch_sizes, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh, w_hr, direction == 1, save_activations
            )
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
        if dropout > 0 and training and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
    h_n, c_n = torch.stack(h_n), torch.stack(c_n)

    if packed:
        if unsorted_indices is not None:
            h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
        return PackedSequence(x, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)
    if unbatched:
        return x.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    return (x.transpose(0, 1) if batch_first else x), (h_n, c_n)


def _needs_grad(*tensors) -> bool:
    """Whether the layer op must save its activations for a backward pass."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _lstm_with_lengths(input, weights, hx, lengths, *, batch_first, **kwargs):
    """Padded input with per-sequence lengths: packed, run, and padded back to the input's T."""
    if isinstance(input, PackedSequence) or input.dim() != 3:
        raise ValueError("lstm: lengths is only for padded 3-D input (a PackedSequence carries its own lengths)")
    steps, batch = (input.size(1), input.size(0)) if batch_first else (input.size(0), input.size(1))
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
    if lengths.dim() != 1 or lengths.numel() != batch:
        raise ValueError(
            f"lstm: expected one length per sequence (shape [{batch}]), got lengths of shape {list(lengths.shape)}"
        )
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > steps):
        raise ValueError(
            f"lstm: every length must lie in 1 .. T={steps}, "
            f"got lengths from {int(lengths.min())} to {int(lengths.max())}"
        )
    packed = pack_padded_sequence(input, lengths, batch_first=batch_first, enforce_sorted=False)
    output, state = lstm(packed, weights, hx, batch_first=batch_first, **kwargs)
    output, _ = pad_packed_sequence(output, batch_first=batch_first, total_length=steps)
    return output, state


# ---- argument checks (the composite and the fake kernels; the C++ twin is csrc/ops/lstm/lstm.h) ----


def _check_layer(op, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, *, check_values):
    """Returns (T, B, N, I, H, P) after the checks the native kernels make."""

    def fail(msg):
        raise RuntimeError(f"{op}: {msg}")

    for name, t, rank in (("w_ih", w_ih, 2), ("w_hh", w_hh, 2), ("h0", h0, 2), ("c0", c0, 2)):
        if t.dim() != rank:
            fail(f"expected {name} to be a {rank}-D tensor, but got shape {list(t.shape)}")
    if w_ih.size(0) % 4 != 0 or w_ih.size(0) == 0:
        fail(f"w_ih must have 4 * hidden_size rows (gates i, f, g, o), got shape {list(w_ih.shape)}")
    hidden, input_size = w_ih.size(0) // 4, w_ih.size(1)
    out_size = hidden
    if w_hr is not None:
        if w_hr.dim() != 2 or w_hr.size(1) != hidden:
            fail(f"w_hr must be [P, H] with H={hidden}, got shape {list(w_hr.shape)}")
        out_size = w_hr.size(0)
    if tuple(w_hh.shape) != (4 * hidden, out_size):
        fail(f"expected w_hh of shape [{4 * hidden}, {out_size}], got {list(w_hh.shape)}")
    if batch_sizes is not None:
        if input.dim() != 2:
            fail(f"expected input to be a 2-D tensor [N, I] (packed rows), but got shape {list(input.shape)}")
        steps = batch_sizes.size(0)
        rows = input.size(0)
        batch = h0.size(0)
        if check_values:
            sizes = batch_sizes.tolist()
            if any(s <= 0 for s in sizes) or any(b > a for a, b in zip(sizes, sizes[1:])):
                fail(f"batch_sizes must be positive and non-increasing, got {sizes}")
            if sum(sizes) != rows:
                fail(f"batch_sizes sum to {sum(sizes)} rows but input has {rows} (shape {list(input.shape)})")
            batch = sizes[0] if sizes else 0
    else:
        if input.dim() != 3:
            fail(f"expected input to be a 3-D tensor [T, B, I], but got shape {list(input.shape)}")
        steps, batch = input.size(0), input.size(1)
        rows = steps * batch
    if input.size(-1) != input_size:
        fail(
            f"input has {input.size(-1)} features (shape {list(input.shape)}) but w_ih expects input_size={input_size}"
        )
    if tuple(h0.shape) != (batch, out_size):
        fail(f"expected h0 of shape [{batch}, {out_size}], got {list(h0.shape)}")
    if tuple(c0.shape) != (batch, hidden):
        fail(f"expected c0 of shape [{batch}, {hidden}], got {list(c0.shape)}")
    for name, t in (("h0", h0), ("c0", c0), ("w_ih", w_ih), ("w_hh", w_hh), ("w_hr", w_hr)):
        if t is not None and (t.dtype != input.dtype or t.device != input.device):
            fail(f"input is {input.dtype} on {input.device} but {name} is {t.dtype} on {t.device}")
    return steps, batch, rows, input_size, hidden, out_size


# ---- fake kernels --------------------------------------------------------------------------------


@torch.library.register_fake("fastdl::lstm_layer")
def _lstm_layer_fake(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, save_activations):
    _, batch, rows, _, hidden, out_size = _check_layer(
        "lstm_layer", input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, check_values=False
    )
    saved_rows = rows if save_activations else 0
    return (
        input.new_empty((*input.shape[:-1], out_size)),
        input.new_empty((batch, out_size)),
        input.new_empty((batch, hidden)),
        input.new_empty((saved_rows, 4 * hidden)),
        input.new_empty((saved_rows, hidden)),
    )


@torch.library.register_fake("fastdl::_lstm_layer_backward")
def _lstm_layer_backward_fake(
    grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, output, gates, cells, reverse
):
    _check_layer("lstm_layer_backward", input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, check_values=False)
    return (
        input.new_empty(input.shape),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_ih.new_empty((w_ih.size(0),)),
        w_hr.new_empty(w_hr.shape) if w_hr is not None else input.new_empty((0,)),
    )


# ---- autograd ------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, save_activations = inputs
    out, _, _, gates, cells = output
    ctx.save_for_backward(input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cells)
    ctx.reverse = reverse
    ctx.saved_activations = save_activations
    ctx.has_bias = (b_ih is not None, b_hh is not None)
    ctx.mark_non_differentiable(gates, cells)
    # Unused outputs get None instead of zero-filled gradients (gates alone is [N, 4H]).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    if not ctx.saved_activations:
        raise RuntimeError("lstm_layer: differentiating a call made with save_activations=False; pass True")
    input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cells = ctx.saved_tensors
    grad_output = torch.zeros_like(out) if grad_output is None else grad_output
    grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n
    grad_c_n = torch.zeros_like(c0) if grad_c_n is None else grad_c_n
    d_input, d_h0, d_c0, d_w_ih, d_w_hh, d_bias, d_w_hr = torch.ops.fastdl._lstm_layer_backward.default(
        grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cells, ctx.reverse
    )
    has_ih, has_hh = ctx.has_bias
    return (
        d_input,
        None,
        d_h0,
        d_c0,
        d_w_ih,
        d_w_hh,
        d_bias if has_ih else None,
        d_bias if has_hh else None,
        d_w_hr if w_hr is not None else None,
        None,
        None,
    )


torch.library.register_autograd("fastdl::lstm_layer", _backward, setup_context=_setup_context)


# ---- composite (plain PyTorch; serves MPS and devices without a native kernel) -------------------
#
# The same algorithm as csrc/ops/lstm/lstm.h, one step at a time with ordinary tensor ops.


def _steps(input, batch_sizes):
    """Per step: (first row, number of rows) in the packed [N, width] layout."""
    sizes = batch_sizes.tolist() if batch_sizes is not None else [input.size(1)] * input.size(0)
    offsets, row = [], 0
    for size in sizes:
        offsets.append(row)
        row += size
    return list(zip(offsets, sizes))


def _previous_rows(steps, t, reverse, saved, initial):
    """The rows step ``t`` starts from: the previous step's rows of ``saved``, then ``initial``."""
    prev = t + 1 if reverse else t - 1
    n = steps[t][1]
    carried = min(n, steps[prev][1]) if 0 <= prev < len(steps) else 0
    parts = [initial[carried:n]]
    if carried:
        parts.insert(0, saved[steps[prev][0] : steps[prev][0] + carried])
    return torch.cat(parts)


@register_composite("lstm_layer")
def lstm_layer_composite(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, save_activations):
    _, _, rows, input_size, hidden, out_size = _check_layer(
        "lstm_layer", input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, check_values=True
    )
    steps = _steps(input, batch_sizes)
    gates = input.reshape(rows, input_size) @ w_ih.t()
    for b in (b_ih, b_hh):
        if b is not None:
            gates = gates + b
    activations = torch.empty_like(gates)
    output = input.new_empty((rows, out_size))
    cells = input.new_empty((rows, hidden))
    h, c = h0.clone(), c0.clone()
    for t in reversed(range(len(steps))) if reverse else range(len(steps)):
        row, n = steps[t]
        i, f, g, o = (gates[row : row + n] + h[:n] @ w_hh.t()).chunk(4, dim=1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c_new = f * c[:n] + i * g
        h_new = o * c_new.tanh()
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        activations[row : row + n] = torch.cat([i, f, g, o], dim=1)
        cells[row : row + n] = c_new
        output[row : row + n] = h_new
        h[:n], c[:n] = h_new, c_new
    if not save_activations:
        activations, cells = input.new_empty((0, 4 * hidden)), input.new_empty((0, hidden))
    return output.view(*input.shape[:-1], out_size), h, c, activations, cells


@register_composite("_lstm_layer_backward")
def lstm_layer_backward_composite(
    grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, output, gates, cells, reverse
):
    _, _, rows, input_size, hidden, out_size = _check_layer(
        "lstm_layer_backward", input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, check_values=True
    )
    steps = _steps(input, batch_sizes)
    out = output.reshape(rows, out_size)
    grad_out = grad_output.reshape(rows, out_size)
    dgates = torch.empty_like(gates)
    h_prev = torch.empty_like(out)
    dh_all = torch.empty_like(out)
    hidden_all = torch.empty_like(cells)
    dh, dc = grad_h_n.clone(), grad_c_n.clone()
    for t in range(len(steps)) if reverse else reversed(range(len(steps))):
        row, n = steps[t]
        c_prev = _previous_rows(steps, t, reverse, cells, c0)
        h_prev[row : row + n] = _previous_rows(steps, t, reverse, out, h0)
        i, f, g, o = gates[row : row + n].chunk(4, dim=1)
        tanh_c = cells[row : row + n].tanh()
        dh_t = grad_out[row : row + n] + dh[:n]
        dh_all[row : row + n] = dh_t
        hidden_all[row : row + n] = o * tanh_c
        dr = dh_t @ w_hr if w_hr is not None else dh_t
        dc_t = dc[:n] + dr * o * (1 - tanh_c * tanh_c)
        dgates[row : row + n] = torch.cat(
            [dc_t * g * i * (1 - i), dc_t * c_prev * f * (1 - f), dc_t * i * (1 - g * g), dr * tanh_c * o * (1 - o)],
            dim=1,
        )
        dc[:n] = dc_t * f
        dh[:n] = dgates[row : row + n] @ w_hh
    x = input.reshape(rows, input_size)
    grad_w_hr = dh_all.t() @ hidden_all if w_hr is not None else input.new_empty((0,))
    return (
        (dgates @ w_ih).view(input.shape),
        dh,
        dc,
        dgates.t() @ x,
        dgates.t() @ h_prev,
        dgates.sum(0),
        grad_w_hr,
    )
