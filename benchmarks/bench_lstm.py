"""LSTM: fastdl.nn.LSTM / LSTMCell against torch.nn.LSTM, a Python loop over nn.LSTMCell, and nn.LSTMCell.

Baselines: ``torch`` is ``torch.nn.LSTM`` (on CPU it runs oneDNN's fused LSTM for padded float32
input and ATen's per-step loop for packed input), ``cell-loop`` a Python loop over
``torch.nn.LSTMCell`` with the same weights, ``torch-cell`` one ``torch.nn.LSTMCell`` step. All
implementations get the same weights and input; ``max_abs_err`` is against torch.nn.LSTM in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastdl.nn

from ._common import make_run, record

# name: (T, B, I, H, quick?)
CASES = {
    "T100-B64-I256-H512": (100, 64, 256, 512, False),
    "T20-B16-I64-H128": (20, 16, 64, 128, True),
}


def case_params():
    return [pytest.param(name, marks=[pytest.mark.quick] if spec[4] else []) for name, spec in CASES.items()]


def make_setup(case: str, device: str, packed: bool = False):
    """fastdl.nn.LSTM, torch.nn.LSTM and torch.nn.LSTMCell sharing one set of weights, and the input
    (packed with lengths drawn uniformly from 1..T when `packed`)."""
    steps, batch, input_size, hidden, _ = CASES[case]
    torch.manual_seed(0)
    ref = nn.LSTM(input_size, hidden).to(device)
    mine = fastdl.nn.LSTM(input_size, hidden).to(device)
    mine.load_state_dict(ref.state_dict())
    cell = nn.LSTMCell(input_size, hidden).to(device)
    cell.load_state_dict({name.replace("_l0", ""): value for name, value in ref.state_dict().items()})
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(steps, batch, input_size, generator=gen).to(device)
    if packed:
        lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
        x = pack_padded_sequence(x, lengths, enforce_sorted=False)
    return mine, ref, cell, x


def reference_output(ref, x):
    with torch.no_grad():
        out, _ = copy.deepcopy(ref).double()(x.double())
    return out.data if isinstance(out, PackedSequence) else out


def sequence_fn(model):
    """The timed function: the output data of `model` (its parameters are passed so that
    forward+backward differentiates them too)."""

    def fn(x, *params):
        out, _ = model(x)
        return out.data if isinstance(out, PackedSequence) else out

    return fn


def cell_loop(cell):
    def fn(x):
        h = c = x.new_zeros(x.size(1), cell.hidden_size)
        outputs = []
        for x_t in x:
            h, c = cell(x_t, (h, c))
            outputs.append(h)
        return torch.stack(outputs)

    return fn


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", ["fastdl", "torch", "cell-loop"])
@pytest.mark.parametrize("case", case_params())
def test_lstm_padded(benchmark, case, impl, mode, device):
    """A whole padded sequence through one layer."""
    if impl == "cell-loop" and mode != "forward":
        pytest.skip("the cell loop is a forward-only baseline")
    mine, ref, cell, x = make_setup(case, device)
    reference = reference_output(ref, x)
    if impl == "cell-loop":
        fn, args = cell_loop(cell), (x,)
    else:
        model = mine if impl == "fastdl" else ref
        fn, args = sequence_fn(model), (x.requires_grad_(mode != "forward"), *model.parameters())
    run = make_run(fn, args, mode, device)

    result = benchmark(run)
    record(benchmark, op="lstm", case=f"{case} {mode}", impl=impl, result=result.detach(), reference=reference)


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", ["fastdl", "torch"])
@pytest.mark.parametrize("case", case_params())
def test_lstm_packed(benchmark, case, impl, mode, device):
    """The same batch packed with lengths uniform in 1..T (seeded), unsorted."""
    mine, ref, _, packed = make_setup(case, device, packed=True)
    reference = reference_output(ref, packed)
    model = mine if impl == "fastdl" else ref
    data = packed.data.requires_grad_(mode != "forward")

    def fn(data, *params):
        out, _ = model(PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices))
        return out.data

    run = make_run(fn, (data, *model.parameters()), mode, device)

    result = benchmark(run)
    record(benchmark, op="lstm", case=f"{case} packed {mode}", impl=impl, result=result.detach(), reference=reference)


@pytest.mark.parametrize("impl", ["fastdl", "torch-cell"])
@pytest.mark.parametrize("case", case_params())
def test_lstm_cell_step(benchmark, case, impl, device):
    """One LSTMCell step on [B, I] with state [B, H]."""
    _, ref, cell, x = make_setup(case, device)
    mine = fastdl.nn.LSTMCell(cell.input_size, cell.hidden_size).to(device)
    mine.load_state_dict(cell.state_dict())
    gen = torch.Generator().manual_seed(1)
    h, c = (torch.randn(x.size(1), cell.hidden_size, generator=gen).to(device) for _ in range(2))
    model = mine if impl == "fastdl" else cell
    with torch.no_grad():
        reference = copy.deepcopy(cell).double()(x[0].double(), (h.double(), c.double()))[0]
    run = make_run(lambda x, h, c: model(x, (h, c))[0], (x[0], h, c), "forward", device)

    result = benchmark(run)
    record(benchmark, op="lstm", case=f"{case} cell step forward", impl=impl, result=result, reference=reference)
