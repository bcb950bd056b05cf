"""LSTM (fastdl.ops.lstm / lstm_cell, fastdl.nn.LSTM / LSTMCell) against torch.nn with the same weights.

The reference is torch.nn.LSTM / nn.LSTMCell in float64 on the CPU; fastdl runs in float64 (tight
tolerance) and float32 (1e-5). Outputs, final states and the gradients of the input, the initial
state and every parameter are compared.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastdl.nn
import fastdl.ops
from fastdl.ops import _library
from harness import DEVICES, assert_close, check_compiled, composite_serves_mps, fresh_seed, needs_cuda, run_opcheck
from optester import OpTester, Sample, dtype_name

LAYER = torch.ops.fastdl.lstm_layer.default
LAYER_BACKWARD = torch.ops.fastdl._lstm_layer_backward.default
T, B, I, H = 5, 3, 4, 6


def make_models(dtype, device, input_size=I, hidden=H, **kwargs):
    """A float64 nn.LSTM reference and a fastdl.nn.LSTM holding the same weights."""
    ref = nn.LSTM(input_size, hidden, **kwargs).double()
    mine = fastdl.nn.LSTM(input_size, hidden, **kwargs).to(device=device, dtype=dtype)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def random_lengths(batch, steps):
    """Unsorted lengths in 1..steps that include 1 and steps."""
    lengths = [random.randint(1, steps) for _ in range(batch)]
    lengths[random.randrange(batch)] = 1
    lengths[(lengths.index(1) + 1) % batch] = steps
    return torch.tensor(lengths)


def sequence_data(output):
    return output.data if isinstance(output, PackedSequence) else output


def run(model, make_input, tensors, loss_weights):
    """Output, h_n, c_n and the gradients of `tensors` and of every parameter of `model`.

    `make_input(*tensors)` builds the model's arguments (so packing is part of the graph)."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    output, (h_n, c_n) = model(*make_input(*tensors))
    results = [sequence_data(output), h_n, c_n]
    loss = sum((r * w.to(r)).sum() for r, w in zip(results, loss_weights))
    grads = torch.autograd.grad(loss, tensors + list(model.parameters()))
    return [r.detach() for r in results] + list(grads)


def check_against_reference(ref, mine, make_input, tensors, dtype, device):
    with torch.no_grad():
        output, (h_n, c_n) = ref(*make_input(*tensors))
    loss_weights = [torch.randn_like(t) for t in (sequence_data(output), h_n, c_n)]
    expected = run(ref, make_input, tensors, loss_weights)
    actual = run(mine, make_input, [t.to(device=device, dtype=dtype) for t in tensors], loss_weights)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(a, e, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("proj_size", [0, 3])
def test_matches_nn_lstm(device, dtype, num_layers, bidirectional, batch_first, proj_size):
    fresh_seed()
    ref, mine = make_models(
        dtype, device, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, proj_size=proj_size
    )
    d = 2 if bidirectional else 1
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64)
    h0 = torch.randn(num_layers * d, B, proj_size or H, dtype=torch.float64)
    c0 = torch.randn(num_layers * d, B, H, dtype=torch.float64)
    check_against_reference(ref, mine, lambda x, h0, c0: (x, (h0, c0)), [x, h0, c0], dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("proj_size", [0, 3])
def test_packed_unsorted_matches_nn_lstm(device, dtype, bidirectional, proj_size):
    """12 steps: long enough for the CPU's packed-weight GEMM path (8+ steps) in float32."""
    fresh_seed()
    ref, mine = make_models(dtype, device, num_layers=2, bidirectional=bidirectional, proj_size=proj_size)
    d = 2 if bidirectional else 1
    steps = 12
    lengths = random_lengths(B + 2, steps)
    x = torch.randn(steps, B + 2, I, dtype=torch.float64)
    h0 = torch.randn(2 * d, B + 2, proj_size or H, dtype=torch.float64)
    c0 = torch.randn(2 * d, B + 2, H, dtype=torch.float64)

    def packed(x, h0, c0):
        return pack_padded_sequence(x, lengths, enforce_sorted=False), (h0, c0)

    check_against_reference(ref, mine, packed, [x, h0, c0], dtype, device)


@pytest.mark.parametrize("batch_first", [False, True])
def test_lengths_equal_packing(batch_first):
    fresh_seed()
    ref, mine = make_models(torch.float64, "cpu", num_layers=2, bidirectional=True, batch_first=batch_first)
    lengths = random_lengths(B + 1, T)
    x = torch.randn((B + 1, T, I) if batch_first else (T, B + 1, I), dtype=torch.float64)
    out, (h, c) = mine(x, lengths=lengths)
    expected, (h_ref, c_ref) = ref(pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False))
    expected, _ = pad_packed_sequence(expected, batch_first=batch_first, total_length=T)
    for a, e in ((out, expected), (h, h_ref), (c, c_ref)):
        assert_close(a, e)


def test_unbatched_input_and_default_state():
    fresh_seed()
    ref, mine = make_models(torch.float64, "cpu", num_layers=2, proj_size=2)
    x = torch.randn(T, I, dtype=torch.float64)
    for hx in (None, (torch.randn(2, 2, dtype=torch.float64), torch.randn(2, H, dtype=torch.float64))):
        out, (h, c) = mine(x, hx)
        out_ref, (h_ref, c_ref) = ref(x, hx)
        for a, e in ((out, out_ref), (h, h_ref), (c, c_ref)):
            assert_close(a, e)


@pytest.mark.parametrize("packed", [False, True])
def test_dropout_train_and_eval(packed):
    fresh_seed()
    ref, mine = make_models(torch.float64, "cpu", num_layers=3, bidirectional=True, dropout=0.5)
    x = torch.randn(T, B, I, dtype=torch.float64)
    inp = pack_padded_sequence(x, random_lengths(B, T), enforce_sorted=False) if packed else x

    seed = torch.initial_seed()
    outputs = []
    for model in (mine, mine, ref):
        torch.manual_seed(seed)
        outputs.append(sequence_data(model(inp)[0]))
    # same seed: the same dropout masks, and nn.LSTM's (same shapes, same draws)
    assert torch.equal(outputs[0], outputs[1])
    assert_close(outputs[0], outputs[2])
    mine.eval(), ref.eval()
    evaluated = sequence_data(mine(inp)[0])
    assert_close(evaluated, sequence_data(ref(inp)[0]))
    assert not torch.allclose(evaluated, outputs[0])
    assert torch.equal(evaluated, sequence_data(mine(inp)[0]))  # no dropout in eval


@pytest.mark.parametrize("device", DEVICES)
def test_inference_equals_training_forward(device):
    """Without gradients the input projection runs in chunks of steps: same results."""
    fresh_seed()
    ref, mine = make_models(torch.float64, device, num_layers=2, bidirectional=True, proj_size=3)
    steps, batch = 40, 20  # 800 rows: several chunks, boundaries inside the packed batch sizes
    x = torch.randn(steps, batch, I, dtype=torch.float64, device=device)
    lengths = random_lengths(batch, steps)
    for inp in (x, pack_padded_sequence(x, lengths, enforce_sorted=False)):
        trained, (h, c) = mine(inp)
        with torch.no_grad():
            inferred, (h_inf, c_inf) = mine(inp)
        for a, e in ((sequence_data(inferred), sequence_data(trained)), (h_inf, h), (c_inf, c)):
            assert_close(a, e.detach())
    with pytest.raises(RuntimeError, match="save_activations=False"):
        w = ref.weight_ih_l0.detach().to(device).requires_grad_()
        h0, c0 = x.new_zeros(batch, 3), x.new_zeros(batch, H)
        w_hh, w_hr = ref.weight_hh_l0.detach().to(device), ref.weight_hr_l0.detach().to(device)
        out = LAYER(x, None, h0, c0, w, w_hh, None, None, w_hr, False, False)[0]
        out.sum().backward()


def test_state_dict_loads_both_ways():
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=3)
    ref = nn.LSTM(I, H, **kwargs)
    mine = fastdl.nn.LSTM(I, H, **kwargs)
    assert list(mine.state_dict()) == list(ref.state_dict())
    assert "weight_hh_l1_reverse" in mine.state_dict() and "weight_hr_l0" in mine.state_dict()
    mine.load_state_dict(ref.state_dict())
    back = nn.LSTM(I, H, **kwargs)
    back.load_state_dict(mine.state_dict())
    x = torch.randn(T, B, I)
    assert_close(back(x)[0], mine(x)[0])
    assert list(fastdl.nn.LSTMCell(I, H).state_dict()) == list(nn.LSTMCell(I, H).state_dict())


# ---- the cell ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
def test_cell_matches_nn_lstm_cell(device, dtype, bias, batched):
    fresh_seed()
    ref = nn.LSTMCell(I, H, bias=bias).double()
    mine = fastdl.nn.LSTMCell(I, H, bias=bias).to(device=device, dtype=dtype)
    mine.load_state_dict(ref.state_dict())
    shape = (B,) if batched else ()
    tensors = [torch.randn(*shape, n, dtype=torch.float64) for n in (I, H, H)]
    weights = [torch.randn(*shape, H, dtype=torch.float64) for _ in range(2)]

    def outputs(model, tensors):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        h, c = model(tensors[0], (tensors[1], tensors[2]))
        loss = (h * weights[0].to(h)).sum() + (c * weights[1].to(c)).sum()
        return [h.detach(), c.detach(), *torch.autograd.grad(loss, tensors + list(model.parameters()))]

    expected = outputs(ref, tensors)
    actual = outputs(mine, [t.to(device=device, dtype=dtype) for t in tensors])
    for a, e in zip(actual, expected):
        assert_close(a, e, dtype)
    h, c = mine(tensors[0].to(device=device, dtype=dtype))  # hx=None: zeros
    h_ref, c_ref = ref(tensors[0])
    assert_close(h, h_ref, dtype), assert_close(c, c_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_cell_gradcheck(device):
    fresh_seed()
    args = [
        torch.randn(s, dtype=torch.float64, device=device, requires_grad=True)
        for s in ((2, 3), (2, 4), (2, 4), (16, 3), (16, 4), (16,), (16,))
    ]
    torch.autograd.gradcheck(lambda *a: fastdl.ops.lstm_cell(*a), args)


# ---- the operator ---------------------------------------------------------------------------------


def layer_args(device, dtype=torch.float64, *, packed, projected, bias, reverse, save=True):
    batch_sizes = torch.tensor([4, 3, 3, 1]) if packed else None
    x = torch.randn((11, I) if packed else (4, 4, I), dtype=dtype, device=device)
    p = 3 if projected else H

    def rand(*s):
        return torch.randn(*s, dtype=dtype, device=device)

    b_ih, b_hh = (rand(4 * H), rand(4 * H)) if bias else (None, None)
    w_hr = rand(p, H) if projected else None
    return (x, batch_sizes, rand(4, p), rand(4, H), rand(4 * H, I), rand(4 * H, p), b_ih, b_hh, w_hr, reverse, save)


def cell_shaped_args(dtype=torch.float32):
    """One step, as lstm_cell calls the layer."""
    x, h, c = torch.randn(1, B, I, dtype=dtype), torch.randn(B, H, dtype=dtype), torch.randn(B, H, dtype=dtype)
    weights = [torch.randn(s, dtype=dtype) for s in ((4 * H, I), (4 * H, H), (4 * H,), (4 * H,))]
    return (x, None, h, c, *weights, None, False, True)


def lstm_layer_reference(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, save_activations):
    """nn.LSTM's equations one sequence at a time in float64 (the projection applied after each
    step, as its proj_size): the output rows, h_n, c_n and, when saved, each row's activated
    gates [i, f, g, o] and cell state."""
    x, h0, c0, w_ih, w_hh, w_hr = (t.double() if t is not None else None for t in (x, h0, c0, w_ih, w_hh, w_hr))
    bias = sum(b.double() for b in (b_ih, b_hh) if b is not None)
    sizes = batch_sizes.tolist() if batch_sizes is not None else [x.size(1)] * x.size(0)
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    rows = x.reshape(-1, x.size(-1))
    hidden = w_ih.size(0) // 4
    output = rows.new_empty(rows.size(0), h0.size(1))
    gates, cells = rows.new_empty(rows.size(0), 4 * hidden), rows.new_empty(rows.size(0), hidden)
    h_n, c_n = h0.clone(), c0.clone()
    for b in range(h0.size(0)):
        steps = [offsets[t] + b for t in range(len(sizes)) if sizes[t] > b]
        h, c = h0[b], c0[b]
        for row in reversed(steps) if reverse else steps:
            i, f, g, o = (w_ih @ rows[row] + w_hh @ h + bias).chunk(4)
            i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
            c = f * c + i * g
            h = o * c.tanh()
            if w_hr is not None:
                h = w_hr @ h
            gates[row], cells[row], output[row] = torch.cat([i, f, g, o]), c, h
        h_n[b], c_n[b] = h, c
    if not save_activations:
        gates, cells = gates[:0], cells[:0]
    return output.view(*x.shape[:-1], -1), h_n, c_n, gates, cells


CASES = [
    dict(packed=p, projected=q, bias=b, reverse=r)
    for p in (False, True)
    for q in (False, True)
    for b, r in ((True, False), (False, True))
]


def case_name(case):
    return "-".join(
        (
            "packed" if case["packed"] else "padded",
            "projected" if case["projected"] else "plain",
            "bias" if case["bias"] else "no_bias",
            "reverse" if case["reverse"] else "forward",
        )
    )


class TestLstmLayer(OpTester):
    op = LAYER
    differentiable = (0, 2, 3, 4, 5, 6, 7, 8)  # input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr

    def samples(self):
        for device in DEVICES:
            for dtype in (torch.float64, torch.float32):
                for case in CASES:
                    for save in (True, False):
                        yield Sample(
                            layer_args(device, dtype, **case, save=save),
                            name=f"{device}-{dtype_name(dtype)}-{case_name(case)}" + ("" if save else "-unsaved"),
                        )
        yield Sample(cell_shaped_args(), name="cell_shaped")

    def reference(self, *args):
        return lstm_layer_reference(*args)

    def assert_matches(self, sample, result, expected):
        for got, want in zip(result, expected):
            assert got.shape == want.shape and got.dtype == sample.dtype
            assert_close(got, want, sample.dtype)

    def test_gradcheck(self, impl, sample_name):
        if impl == "composite":
            # it writes each step's states in place: only the op's autograd formula differentiates it
            pytest.skip("the composite is differentiated through the op's backward")
        super().test_gradcheck(impl, sample_name)

    def gradcheck_samples(self):
        """Small and packed (so that sequences end at different steps), in both directions."""
        for device in DEVICES:
            for reverse in (False, True):
                batch_sizes = torch.tensor([3, 2, 2, 1])
                shapes = ((8, 2), (3, 2), (3, 3), (12, 2), (12, 2), (12,), (12,), (2, 3))
                x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = (
                    torch.randn(s, dtype=torch.float64, device=device) for s in shapes
                )
                yield Sample(
                    (x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, True),
                    name=f"{device}-packed-projected-{'reverse' if reverse else 'forward'}",
                )

    def opcheck_samples(self):
        # opcheck traces each sample several times: a few float32 cases, one of them not saving
        for device in DEVICES:
            for case in CASES[::3] + [dict(CASES[1], save=False)]:
                yield Sample(
                    layer_args(device, torch.float32, **case),
                    name=f"{device}-{case_name(case)}" + ("-unsaved" if not case.get("save", True) else ""),
                )
        yield Sample(cell_shaped_args(), name="cell_shaped")

    def test_opcheck(self, sample_name):
        if not sample_name.endswith("-unsaved"):
            return super().test_opcheck(sample_name)
        # an inference call cannot be differentiated: opcheck runs it without gradients
        fresh_seed()
        run_opcheck(self.op, self._sample("test_opcheck", sample_name).args)

    def compile_sample(self):
        return Sample(layer_args("cpu", torch.float32, packed=False, projected=True, bias=True, reverse=False))

    def bad_inputs(self):
        x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, _, _, _ = layer_args(
            "cpu", packed=True, projected=False, bias=True, reverse=False
        )

        def args(x=x, batch_sizes=batch_sizes, h0=h0, w_hh=w_hh):
            return (x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, None, False, True)

        return [
            (
                args(batch_sizes=torch.tensor([3, 4, 3, 1])),
                {},
                RuntimeError,
                "batch_sizes must be positive and non-increasing",
            ),
            (
                args(batch_sizes=torch.tensor([4, 3, 2, 1])),
                {},
                RuntimeError,
                "batch_sizes sum to 10 rows but input has 11",
            ),
            (args(h0=h0[:3]), {}, RuntimeError, r"expected h0 of shape \[4, 6\], got \[3, 6\]"),
            (args(w_hh=w_hh[:, :5]), {}, RuntimeError, r"expected w_hh of shape \[24, 6\], got \[24, 5\]"),
            (args(x=x[:, :3]), {}, RuntimeError, "input has 3 features .* input_size=4"),
            (args(batch_sizes=None), {}, RuntimeError, "3-D tensor"),
            (args(x=x.float()), {}, RuntimeError, "dtype|float32"),
        ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=case_name)
def test_backward_native_equals_composite(device, case):
    fresh_seed()
    args = layer_args(device, **case)
    x, batch_sizes, h0, c0, w_ih, w_hh, _, _, w_hr, reverse, _ = args
    output, _, _, gates, cells = LAYER(*args)
    grads = [torch.randn_like(t) for t in (output, h0, c0)]
    backward_args = (*grads, x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, output, gates, cells, reverse)
    for a, e in zip(LAYER_BACKWARD(*backward_args), _library.composite("_lstm_layer_backward")(*backward_args)):
        assert_close(a, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES[::3], ids=case_name)
def test_backward_opcheck(device, case):
    fresh_seed()
    x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, save = layer_args(device, torch.float32, **case)
    output, _, _, gates, cells = LAYER(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, save)
    grads = [torch.randn_like(t) for t in (output, h0, c0)]
    run_opcheck(LAYER_BACKWARD, (*grads, x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, output, gates, cells, reverse))


def test_torch_compile_cell():
    fresh_seed()
    shapes = ((B, I), (B, H), (B, H), (4 * H, I), (4 * H, H), (4 * H,), (4 * H,))
    args = [torch.randn(s, requires_grad=True) for s in shapes]
    check_compiled(lambda *a: torch.cat(fastdl.ops.lstm_cell(*a), dim=1) * 2, *args)


def test_torch_compile_functional_lstm():
    fresh_seed()
    ref = nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=3)
    weights = [w.detach().clone().requires_grad_() for w in ref._flat_weights]
    x = torch.randn(T, B, I, requires_grad=True)

    def run(x, *weights):
        return fastdl.ops.lstm(x, weights, num_layers=2, bidirectional=True, proj_size=3)[0]

    check_compiled(run, x, *weights)


def test_composite_serves_mps():
    assert composite_serves_mps("lstm_layer") and composite_serves_mps("_lstm_layer_backward")


# ---- bad input -------------------------------------------------------------------------------------


def test_bad_module_input():
    mine = fastdl.nn.LSTM(I, H, num_layers=2)
    x = torch.randn(T, B, I)
    with pytest.raises(ValueError, match="input.size\\(-1\\) must be equal to input_size. Expected 4, got 5"):
        mine(torch.randn(T, B, I + 1))
    with pytest.raises(ValueError, match="2-D \\(unbatched\\) or 3-D"):
        mine(torch.randn(1, T, B, I))
    with pytest.raises(ValueError, match=r"expected h0 of size \(2, 3, 6\), got \(1, 3, 6\)"):
        mine(x, (torch.zeros(1, B, H), torch.zeros(2, B, H)))
    with pytest.raises(ValueError, match=r"expected c0 of size \(2, 3, 6\), got \(2, 4, 6\)"):
        mine(x, (torch.zeros(2, B, H), torch.zeros(2, B + 1, H)))
    with pytest.raises(ValueError, match=f"every length must lie in 1 .. T={T}, got lengths from 1 to {T + 1}"):
        mine(x, lengths=[1, T + 1, 2])
    with pytest.raises(ValueError, match="every length must lie in 1 .. T=5, got lengths from 0 to 3"):
        mine(x, lengths=[0, 3, 2])
    with pytest.raises(ValueError, match="one length per sequence"):
        mine(x, lengths=[1, 2])
    cell = fastdl.nn.LSTMCell(I, H)
    with pytest.raises(ValueError, match="input has 5 features, expected input_size=4"):
        cell(torch.randn(B, I + 1))
    with pytest.raises(ValueError, match=r"expected c of shape \(3, 6\), got \(3, 5\)"):
        cell(torch.randn(B, I), (torch.zeros(B, H), torch.zeros(B, H - 1)))


# ---- CUDA ------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_reduced_precision(dtype):
    fresh_seed()
    ref, mine = make_models(dtype, "cuda", num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, dtype=torch.float64)
    lengths = random_lengths(B, T)
    out, (h, c) = mine(x.to("cuda", dtype), lengths=lengths)
    out_ref, (h_ref, c_ref) = ref(pack_padded_sequence(x, lengths, enforce_sorted=False))
    out_ref, _ = pad_packed_sequence(out_ref, total_length=T)
    for a, e in ((out, out_ref), (h, h_ref), (c, c_ref)):
        assert_close(a, e, dtype)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in mine.parameters())


@needs_cuda
def test_cuda_cell_half():
    fresh_seed()
    ref = nn.LSTMCell(I, H).double()
    mine = fastdl.nn.LSTMCell(I, H).to("cuda", torch.float16)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(B, I, dtype=torch.float64)
    for a, e in zip(mine(x.to("cuda", torch.float16)), ref(x)):
        assert_close(a, e, torch.float16)
