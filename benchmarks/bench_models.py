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
from fastdl.models.gpt2 import GPT, GPTConfig, KVCache

from ._common import peak_mb, record, sync
from ._reference_gpt import PlainGPT, transformers_gpt2

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


# ---- GPT-2 --------------------------------------------------------------------------------------
#
# fastdl's GPT (fastdl attention, fused residual + LayerNorm, fused linear cross-entropy) against
# the same weights in plain torch (``PlainGPT``: SDPA, F.layer_norm, full logits) and in
# ``transformers.GPT2LMHeadModel`` (SDPA attention), dropout off, float32.

# name: (preset, batch, tokens, quick?)
GPT_TRAINING_CASES = {
    "gpt2-b4-256": ("gpt2", 4, 256, False),
    "gpt2-tiny-b4-64": ("gpt2-tiny", 4, 64, True),
}
# name: (preset, batch, prompt tokens, new tokens, quick?)
GPT_GENERATION_CASES = {
    "gpt2-b1-p128-n128": ("gpt2", 1, 128, 128, False),
    "gpt2-b8-p128-n128": ("gpt2", 8, 128, 128, False),
    "gpt2-tiny-b2-p16-n16": ("gpt2-tiny", 2, 16, 16, True),
}


def make_gpt(preset: str, device: str) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name(preset, dropout=0.0)).to(device)


def gpt_impl(model: GPT, impl: str) -> nn.Module | None:
    """The implementation ``impl`` of ``model``'s network, same weights; None if unavailable."""
    if impl == "fastdl":
        return model
    if impl == "eager":
        plain = PlainGPT(model.config).to(next(model.parameters()).device)
        plain.load_state_dict(model.state_dict())
        return plain
    return transformers_gpt2(model)


def next_token_loss(net: nn.Module, impl: str, idx, targets):
    if impl == "fastdl":
        return net(idx, targets)[1]
    if impl == "eager":
        return net(idx, targets)
    logits = net(input_ids=idx, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("impl", ["fastdl", "eager", "transformers"])
@pytest.mark.parametrize("case", params(GPT_TRAINING_CASES))
def test_gpt_training_step(benchmark, case, impl, device):
    """Forward, loss, backward and ``torch.optim.AdamW`` (its defaults, the same on every side)."""
    preset, batch, tokens, _ = GPT_TRAINING_CASES[case]
    model = make_gpt(preset, device)
    text = torch.randint(0, model.config.vocab_size, (batch, tokens + 1), generator=torch.Generator().manual_seed(1))
    idx, targets = text[:, :-1].to(device), text[:, 1:].to(device)
    with torch.no_grad():
        reference = gpt_impl(model, "eager").double()(idx, targets)
    net = gpt_impl(model, impl)
    if net is None:
        pytest.skip("transformers is not installed")
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.1)

    def step():
        loss = next_token_loss(net, impl, idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        return loss.detach()

    first_loss = step()
    benchmark(step)
    record(benchmark, op="models", case=f"{case} training step", impl=impl, result=first_loss, reference=reference)
    if device == "cpu":
        benchmark.extra_info["peak_mb"] = peak_mb(step)


def greedy(net: nn.Module, impl: str, prompt, new_tokens: int):
    """``new_tokens`` greedy tokens after ``prompt``, KV-cached, exactly ``new_tokens`` of them."""
    if impl == "fastdl":
        return net.generate(prompt, new_tokens, temperature=0.0)[:, prompt.size(1):]
    with torch.inference_mode():
        out = net.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    return out[:, prompt.size(1):]


def prefill(net: nn.Module, impl: str, prompt):
    """The prompt's forward pass that fills the KV cache, and the first token's logits."""
    with torch.inference_mode():
        if impl == "fastdl":
            cache = KVCache(net.config.n_layer, prompt.size(1) + 1)
            return net.lm_head(net.hidden_states(prompt, None, cache)[:, -1])
        return net(input_ids=prompt, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("stage", ["generate", "prefill"])
@pytest.mark.parametrize("impl", ["fastdl", "transformers"])
@pytest.mark.parametrize("case", params(GPT_GENERATION_CASES))
def test_gpt_generation(benchmark, case, impl, stage, device):
    """Greedy generation with a KV cache (``generate``: prompt, then ``new`` tokens one by one),
    and its prompt pass alone (``prefill``). ``max_abs_err`` is against transformers' tokens (0
    when identical) or its logits."""
    preset, batch, prompt_len, new_tokens, _ = GPT_GENERATION_CASES[case]
    model = make_gpt(preset, device).eval()
    hf = transformers_gpt2(model)
    if hf is None:
        pytest.skip("transformers is not installed")
    hf.eval()
    net = model if impl == "fastdl" else hf
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                           generator=torch.Generator().manual_seed(1)).to(device)
    if stage == "generate":
        reference = greedy(hf, "transformers", prompt, new_tokens)
        run = lambda: greedy(net, impl, prompt, new_tokens)  # noqa: E731
    else:
        reference = prefill(hf, "transformers", prompt)
        run = lambda: prefill(net, impl, prompt)  # noqa: E731
    result = run()
    benchmark(run)
    record(benchmark, op="models", case=f"{case} {stage}", impl=impl, result=result, reference=reference)
