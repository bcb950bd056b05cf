"""fastdl.models: whole ResNets against the same architecture in plain ``torch.nn``: float32,
and on CUDA also float16 and bfloat16 inference (against cuDNN).

Implementations (same weights, same input):

* ``fastdl``: inference runs the fused model (``model.fuse()``: BatchNorm folded, ReLU and the
  residual add in the convolutions' output pass, Winograd weights prepacked); a training step runs
  the unfused fastdl model (fastdl's conv forward and backward).
* ``fastdl-unfused``: the fastdl model in eval mode, not fused (fastdl's convolutions alone).
* ``eager``: the same modules with every convolution a ``torch.nn.Conv2d`` (oneDNN on the CPU).
* ``eager-compiled``: ``torch.compile`` of ``eager`` (inference, full runs only: compiling takes
  minutes on small machines).

``max_abs_err`` is against ``eager`` in float64: the logits for inference, the first step's loss
for a training step.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdl.nn
from fastdl import models

from ._common import record, sync

# name: (builder, small_input, batch, size, quick?)
INFERENCE_CASES = {
    "resnet18-b8-224": ("resnet18", False, 8, 224, False),
    "resnet18-cifar-b256-32": ("resnet18", True, 256, 32, False),
    "resnet50-b8-224": ("resnet50", False, 8, 224, False),
    "resnet18-b8-64": ("resnet18", False, 8, 64, True),
}
TRAINING_CASES = {
    "resnet18-cifar-b128-32": ("resnet18", True, 128, 32, False),
    "resnet18-cifar-b16-32": ("resnet18", True, 16, 32, True),
}
NUM_CLASSES = 10


def params(cases):
    return [pytest.param(name, marks=[pytest.mark.quick] if spec[-1] else []) for name, spec in cases.items()]


def torch_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every fastdl convolution replaced by a ``torch.nn.Conv2d`` holding
    the same weights: the same network in plain PyTorch."""
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, fastdl.nn.Conv2d):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                 child.dilation, child.groups, bias=child.bias is not None, padding_mode=child.padding_mode)
                conv.load_state_dict(child.state_dict())
                setattr(parent, name, conv)
    return twin


def make_model(builder: str, small_input: bool, device: str) -> nn.Module:
    """A ResNet with trained-looking BatchNorm statistics (random running mean and variance), so
    folding them is not an identity."""
    torch.manual_seed(0)
    model = getattr(models, builder)(num_classes=NUM_CLASSES, small_input=small_input)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model.to(device)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("impl", ["fastdl", "fastdl-unfused", "eager", "eager-compiled"])
@pytest.mark.parametrize("case", params(INFERENCE_CASES))
def test_inference(benchmark, case, impl, layout, dtype, device, request):
    builder, small_input, batch, size, _ = INFERENCE_CASES[case]
    if impl == "eager-compiled" and request.config.getoption("--quick"):
        pytest.skip("compiling takes minutes: full runs only")
    if dtype != "float32" and device != "cuda":
        pytest.skip("float16/bfloat16 models are a CUDA case")
    model = make_model(builder, small_input, device).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    eager = torch_twin(model)
    with torch.no_grad():
        reference = copy.deepcopy(eager).double()(x.double())
    model, eager, x = (t.to(getattr(torch, dtype)) for t in (model, eager, x))
    if layout == "channels_last":
        model, eager = model.to(memory_format=torch.channels_last), eager.to(memory_format=torch.channels_last)
    fn = {
        "fastdl": lambda: model.fuse(),
        "fastdl-unfused": lambda: model,
        "eager": lambda: eager,
        "eager-compiled": lambda: torch.compile(eager),
    }[impl]()

    def run():
        with torch.inference_mode():
            out = fn(x)
        sync(device)
        return out

    run()  # compiles, and keeps the fused model's Winograd transforms
    result = benchmark(run)
    case_name = f"{case} inference {layout}" + ("" if dtype == "float32" else f" {dtype}")
    record(benchmark, op="models", case=case_name, impl=impl, result=result, reference=reference)


def sgd_step(model: nn.Module, device: str):
    """One training step of the notes' recipe (SGD, momentum 0.9, weight decay 5e-4): forward,
    cross-entropy, backward, update. Returns the step's loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        return loss.detach()

    return step


@pytest.mark.parametrize("impl", ["fastdl", "eager"])
@pytest.mark.parametrize("case", params(TRAINING_CASES))
def test_training_step(benchmark, case, impl, device):
    builder, small_input, batch, size, _ = TRAINING_CASES[case]
    model = make_model(builder, small_input, device).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    eager = torch_twin(model)
    reference = F.cross_entropy(copy.deepcopy(eager).double()(x.double()), y).detach()
    step = sgd_step(model if impl == "fastdl" else eager, device)
    first_loss = step(x, y)
    benchmark(step, x, y)
    record(benchmark, op="models", case=f"{case} training step", impl=impl, result=first_loss, reference=reference)
