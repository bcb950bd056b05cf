"""fastdl.models.ResNet against a plain torch.nn ResNet written from torchvision's documented
structure, fusion, checkpoints, torch.compile, training, and fastdl.nn.replace_modules."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from harness import assert_close, fresh_seed, with_layout
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastdl.nn
from fastdl import models


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------
# Reference: torchvision's ResNet structure in plain torch.nn (no fastdl.models).


class RefBasic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, downsample, groups, base_width, dilation):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class RefBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, downsample, groups, base_width, dilation):
        super().__init__()
        width = int(planes * base_width / 64) * groups
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, dilation, groups, bias=False)  # V1.5: stride here
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class RefResNet(nn.Module):
    def __init__(
        self,
        block,
        layers,
        num_classes=1000,
        groups=1,
        width_per_group=64,
        dilate=(False, False, False),
        in_channels=3,
        small_input=False,
    ):
        super().__init__()
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)
        cin, dilation = 64, 1
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            first_dilation = dilation
            if i > 0 and dilate[i - 1]:
                dilation, stride = dilation * stride, 1
            downsample = None
            if stride != 1 or cin != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion),
                )
            blocks = [block(cin, planes, stride, downsample, groups, width_per_group, first_dilation)]
            cin = planes * block.expansion
            blocks += [block(cin, planes, 1, None, groups, width_per_group, dilation) for _ in range(depth - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


DEPTHS = {
    "resnet18": (RefBasic, [2, 2, 2, 2]),
    "resnet34": (RefBasic, [3, 4, 6, 3]),
    "resnet50": (RefBottleneck, [3, 4, 6, 3]),
    "resnet101": (RefBottleneck, [3, 4, 23, 3]),
    "resnet152": (RefBottleneck, [3, 8, 36, 3]),
}


def reference(name, **kwargs):
    block, layers = DEPTHS[name]
    return RefResNet(block, layers, **kwargs)


def fastdl_kwargs(kwargs):
    """The fastdl.models spelling of reference() keyword arguments."""
    kwargs = dict(kwargs)
    if "dilate" in kwargs:
        kwargs["replace_stride_with_dilation"] = list(kwargs.pop("dilate"))
    return kwargs


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def twins(name, dtype=torch.float64, **kwargs):
    """A fastdl model and the reference holding the same (randomised) weights and statistics."""
    model = getattr(models, name)(**fastdl_kwargs(kwargs)).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial affine parameters and statistics
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    ref = reference(name, **kwargs).to(dtype)
    ref.load_state_dict(model.state_dict(), strict=True)
    return model, ref


# ---------------------------------------------------------------------------------------------
# Structure


VARIANTS = [
    {},
    {"small_input": True},
    {"in_channels": 1, "num_classes": 10},
    {"dilate": (False, True, True)},
    {"groups": 32, "width_per_group": 4},
]


@pytest.mark.parametrize("name", list(DEPTHS))
def test_state_dict_keys_and_shapes_match_torchvision_structure(name):
    with torch.device("meta"):
        for kwargs in VARIANTS:
            if name in ("resnet18", "resnet34") and ("dilate" in kwargs or "groups" in kwargs):
                continue  # BasicBlock has neither
            model = getattr(models, name)(**fastdl_kwargs(kwargs))
            assert list(shapes(model).items()) == list(shapes(reference(name, **kwargs)).items()), kwargs
            convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
            assert convs and all(type(m) is fastdl.nn.Conv2d for m in convs)


def test_stem_options_and_basic_block_limits():
    with torch.device("meta"):
        small = models.resnet18(small_input=True, in_channels=1)
        assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.in_channels == 1
        assert isinstance(small.maxpool, nn.Identity)
        dilated = models.resnet50(replace_stride_with_dilation=[False, True, True])
        assert dilated.layer4[0].conv2.dilation == (2, 2) and dilated.layer4[1].conv2.dilation == (4, 4)
        assert dilated.layer4[0].conv2.stride == (1, 1) and models.resnet50().layer4[0].conv2.stride == (2, 2)
        with pytest.raises(NotImplementedError, match="dilation"):
            models.resnet18(replace_stride_with_dilation=[False, False, True])
        with pytest.raises(ValueError, match="groups=1"):
            models.resnet18(groups=2)


def test_weight_init_follows_torchvision():
    fresh_seed()
    model = models.resnet18()
    conv = model.layer4[0].conv2.weight  # kaiming normal, fan_out = 512 * 9
    assert abs(conv.std().item() / (2 / (512 * 9)) ** 0.5 - 1) < 0.02 and abs(conv.mean().item()) < 1e-3
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)
    zero = models.ResNet(models.Bottleneck, [1, 1, 1, 1], zero_init_residual=True)
    assert all(
        bool((b.bn3.weight == 0).all()) and bool((b.bn2.weight == 1).all()) for b in (zero.layer1[0], zero.layer4[0])
    )
    basic = models.ResNet(models.BasicBlock, [1, 1, 1, 1], zero_init_residual=True)
    assert bool((basic.layer2[0].bn2.weight == 0).all()) and bool((basic.layer2[0].bn1.weight == 1).all())


def test_bad_input_gives_clear_errors():
    model = models.ResNet(models.BasicBlock, [1, 1, 1, 1], num_classes=10, in_channels=1, small_input=True)
    with pytest.raises(ValueError, match=r"4-D input \[N, 1, H, W\], got 3-D of shape \[1, 8, 8\]"):
        model(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match=r"expected 1 input channels, got 3 .*\[2, 3, 8, 8\].*in_channels=3"):
        model(torch.zeros(2, 3, 8, 8))


# ---------------------------------------------------------------------------------------------
# Numerics against the reference (float64: the same maths, so tight tolerances)


# Sizes keep at least 2x2 pixels in layer4: a train-mode BatchNorm over only the 2 images of a
# batch amplifies rounding differences far beyond float64's precision.
CASES = [
    ("resnet18", {}, 64),
    ("resnet18", {"small_input": True, "in_channels": 1, "num_classes": 10}, 16),
    ("resnet50", {"num_classes": 10}, 64),
    ("resnet50", {"num_classes": 10, "dilate": (False, False, True), "groups": 2, "width_per_group": 32}, 32),
]


@pytest.mark.parametrize("name, kwargs, size", CASES, ids=lambda c: str(c))
def test_train_and_eval_match_reference_outputs_statistics_and_gradients(name, kwargs, size):
    fresh_seed()
    model, ref = twins(name, **kwargs)
    x = torch.randn(2, kwargs.get("in_channels", 3), size, size, dtype=torch.float64)
    model.train(), ref.train()
    out, expected = model(x), ref(x)
    assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    ref_parameters = dict(ref.named_parameters())
    for key, p in model.named_parameters():
        assert_close(
            p.grad, ref_parameters[key].grad, rtol=1e-8, atol=1e-9 * ref_parameters[key].grad.abs().max().item()
        )
    ref_buffers = dict(ref.named_buffers())
    for key, b in model.named_buffers():  # running statistics updated alike
        assert torch.equal(b, ref_buffers[key]) if b.dtype == torch.int64 else assert_close(b, ref_buffers[key]) is None
    model.eval(), ref.eval()
    with torch.no_grad():
        assert_close(model(x), ref(x))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name, kwargs, size", CASES[:3], ids=lambda c: str(c))
def test_fused_model_equals_eval_model(name, kwargs, size, layout):
    fresh_seed()
    model, _ = twins(name, dtype=torch.float32, **kwargs)
    model.eval()
    fused = models.fuse_for_inference(model)
    x = with_layout(torch.randn(3, kwargs.get("in_channels", 3), size, size), layout)
    with torch.no_grad():
        expected = model(x)
        out = fused(x)
    assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched


def test_fused_structure_keeps_names_and_is_inference_only():
    model = models.resnet50(num_classes=10)
    fused = model.fuse()
    assert fused.layer1[0].conv1.activation == "relu" and fused.layer1[0].conv2.activation == "relu"
    assert fused.layer1[0].conv3.activation == "relu" and fused.conv1.activation == "relu"  # relu(conv3 + shortcut)
    assert fused.layer1[0].downsample[0].bias is not None and isinstance(fused.layer1[0].downsample[1], nn.Identity)
    assert isinstance(fused.layer2[1].bn2, nn.Identity) and isinstance(fused.bn1, nn.Identity)
    keys = set(fused.state_dict())
    assert {"conv1.weight", "conv1.bias", "layer3.0.downsample.0.weight", "fc.weight"} <= keys
    assert not any(".bn" in k or k.startswith("bn") for k in keys)
    assert not any(p.requires_grad for p in fused.parameters()) and not fused.training
    with pytest.raises(RuntimeError, match="inference only"):
        fused.train()
    assert model.training and isinstance(model.bn1, nn.BatchNorm2d)
    grouped = models.ResNet(models.Bottleneck, [1, 1, 1, 1], norm_layer=lambda c: nn.GroupNorm(1, c))
    with pytest.raises(ValueError, match="GroupNorm; only BatchNorm2d"):
        grouped.fuse()
    with pytest.raises(TypeError, match="fastdl.models.ResNet"):
        models.fuse_for_inference(nn.Linear(2, 2))


class OpLog(TorchDispatchMode):
    """The names of the ops that run under it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_fused_block_is_only_convolutions(name):
    """In a fused block the shortcut add and the final ReLU happen inside the last convolution."""
    fused = getattr(models, name)(num_classes=10).fuse()
    x = torch.randn(1, 64, 8, 8)
    for block in (fused.layer1[0], fused.layer1[1]):  # with and without a downsample
        with torch.no_grad():
            block(x)  # computes the kept Winograd transforms once
            with OpLog() as log:
                out = block(x)
        x = out
        expected = 3 if name == "resnet50" else 2
        assert log.ops == ["fastdl.conv2d"] * (expected + (block.downsample is not None)), log.ops


def test_torch_compile_unfused_and_fused_inference():
    fresh_seed()
    model = models.ResNet(models.BasicBlock, [1, 1, 1, 1], num_classes=10, small_input=True).eval()
    fused = model.fuse()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for m in (model, fused):
            assert_close(torch.compile(m, fullgraph=False)(x), m(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # compiling forward and backward takes about a minute on 2 cores
@pytest.mark.parametrize("in_channels", [3, 4])  # 3: the row-tile weight gradient of RGB inputs
def test_torch_compile_training(in_channels):
    fresh_seed()
    model = models.ResNet(models.BasicBlock, [1, 1, 1, 1], num_classes=10, small_input=True, in_channels=in_channels)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=False)
    x = torch.randn(4, in_channels, 8, 8)
    out, expected = compiled(x), model(x)
    assert_close(out, expected, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    expected.square().sum().backward()
    for p, e in zip(compiled.parameters(), model.parameters()):
        assert_close(p.grad, e.grad, rtol=1e-3, atol=1e-4 * e.grad.abs().max().item())


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_weights_path_loads_reference_checkpoints(tmp_path):
    fresh_seed()
    ref = reference("resnet18", num_classes=10, small_input=True).eval()
    state = ref.state_dict()
    x = torch.randn(2, 3, 8, 8)
    for i, saved in enumerate((state, {"state_dict": state, "epoch": 3}, {"model": state})):
        path = tmp_path / f"checkpoint{i}.pt"
        torch.save(saved, path)
        model = models.resnet18(weights=path, num_classes=10, small_input=True).eval()
        with torch.no_grad():
            assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_mismatched_checkpoints_give_clear_errors(tmp_path):
    with torch.device("meta"):
        state = reference("resnet18").state_dict()
    path = tmp_path / "imagenet.pt"
    torch.save(state, path)
    with pytest.raises(
        ValueError, match=r"shape mismatches: .*fc.weight: checkpoint \[1000, 512\] vs model \[10, 512\]"
    ):
        models.resnet18(weights=path, num_classes=10)
    with pytest.raises(
        ValueError, match=r"conv1.weight: checkpoint \[64, 3, 7, 7\] vs model \[64, 3, 3, 3\].*small_input"
    ):
        models.resnet18(weights=path, small_input=True)
    with pytest.raises(ValueError, match=r"missing keys: layer1\.2\.conv1\.weight, .* \(86 more\)$"):
        models.resnet34(weights=path)
    partial = {k: v for k, v in state.items() if not k.startswith("fc.")}
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, path)
    with pytest.raises(
        ValueError, match=r"imagenet.pt: .*missing keys: fc.weight, fc.bias; unexpected keys: extra.weight$"
    ):
        models.resnet18(weights=path)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt: not a readable torch checkpoint"):
        models.resnet18(weights=tmp_path / "broken.pt")
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        models.resnet18(weights="IMAGENET1K_V1")


# ---------------------------------------------------------------------------------------------
# Training


def sgd_losses(model, images, labels, steps):
    """Per-step losses of SGD (momentum 0.9, weight decay 5e-4) over 4 repeating batches of 8."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    losses = []
    for step in range(steps):
        batch = slice(8 * (step % 4), 8 * (step % 4) + 8)
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


# float32 rounding differences grow over the steps (the losses fall to ~0.02), hence the looser
# float32 tolerance; float64 checks the same maths tightly
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-2), (torch.float64, 1e-8)], ids=["float32", "float64"])
def test_sgd_losses_match_reference_step_by_step(dtype, rtol):
    fresh_seed()
    model = models.ResNet(models.BasicBlock, [1, 1, 1, 1], num_classes=10, small_input=True).to(dtype)
    ref = RefResNet(RefBasic, [1, 1, 1, 1], num_classes=10, small_input=True).to(dtype)
    ref.load_state_dict(model.state_dict())
    images, labels = torch.randn(32, 3, 16, 16, dtype=dtype), torch.randint(0, 10, (32,))
    losses, expected = sgd_losses(model, images, labels, 20), sgd_losses(ref, images, labels, 20)
    print("losses", losses)
    assert_close(losses, expected, rtol=rtol, atol=rtol / 10)
    assert losses[-4:].mean() < 0.2 * losses[:4].mean()  # it learns (the batches repeat every 4 steps)


def test_resnet_learns_real_digits():
    """A one-block-per-stage ResNet on scikit-learn's 1,797 handwritten 8x8 digits."""
    pytest.importorskip("sklearn")
    from fastdl import data
    from fastdl.data import transforms as T

    torch.manual_seed(0)  # fixed: an accuracy threshold needs a known-good run
    train, test = data.digits("train"), data.digits("test")
    mean, std = (train.images.float() / 255).mean().item(), (train.images.float() / 255).std().item()
    model = models.ResNet(models.BasicBlock, [1, 1, 1, 1], num_classes=10, in_channels=1, small_input=True)
    epochs, batch_size, lr = 3, 64, 0.05
    batches = data.TensorBatches(
        train,
        batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        transform=T.eval_transform([mean], [std]),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * len(batches))
    for _ in range(epochs):
        for images, labels in batches:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    fused = model.eval().fuse()
    with torch.no_grad():
        accuracy = (fused(T.normalize(test.images, [mean], [std])).argmax(1) == test.labels).float().mean().item()
    print(f"test accuracy {accuracy:.3f}")
    assert accuracy >= 0.95


# ---------------------------------------------------------------------------------------------
# fastdl.nn.replace_modules


class WeightStandardized(nn.Conv2d):
    """A user's Conv2d subclass with its own forward: replace_modules must keep it."""

    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


class UserModel(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding="valid"), nn.ReLU(), shared, shared, WeightStandardized(8, 4, 1)
        )
        self.lstm = nn.LSTM(4, 8, num_layers=2, batch_first=True, bidirectional=True)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.sequence_first_attention = nn.MultiheadAttention(16, 2, add_bias_kv=True)
        self.narrow_heads = nn.MultiheadAttention(16, 4, batch_first=True)  # head dim 4: kept
        self.watched = nn.Conv2d(3, 3, 1)  # has a hook: kept
        self.watched.register_forward_hook(lambda module, args, out: None)

    def forward(self, x):
        f = self.features(x).flatten(2).transpose(1, 2)  # [N, positions, 4]
        h, _ = self.lstm(f)
        a, _ = self.attention(h, h, h, need_weights=False)
        b, weights = self.sequence_first_attention(a.transpose(0, 1), a.transpose(0, 1), a.transpose(0, 1))
        c, _ = self.narrow_heads(h, h, h)
        return b.transpose(0, 1), weights, c, self.watched(x)


def test_replace_modules_swaps_in_place_and_keeps_state():
    fresh_seed()
    model = UserModel().double()
    model.features[0].weight.requires_grad_(False)
    original = copy.deepcopy(model)
    parameters = list(model.parameters())
    with pytest.warns(UserWarning) as kept:
        assert fastdl.nn.replace_modules(model) is model
    message = str(kept[0].message)
    assert "features.4 (WeightStandardized): a subclass" in message and "watched (Conv2d): it has hooks" in message
    assert "narrow_heads (MultiheadAttention): head dim 4" in message
    assert type(model.features[0]) is fastdl.nn.Conv2d and model.features[0].padding == "valid"
    assert model.features[2] is model.features[3] and type(model.features[2]) is fastdl.nn.Conv2d
    assert model.features[2].padding_mode == "reflect"
    assert type(model.features[4]) is WeightStandardized and type(model.watched) is nn.Conv2d
    assert type(model.narrow_heads) is nn.MultiheadAttention
    assert type(model.lstm) is fastdl.nn.LSTM and type(model.attention) is fastdl.nn.MultiheadAttention
    assert type(model.sequence_first_attention) is fastdl.nn.MultiheadAttention
    assert not model.sequence_first_attention.batch_first and model.sequence_first_attention.bias_k is not None
    assert all(a is b for a, b in zip(model.parameters(), parameters))  # an existing optimizer still applies
    assert not model.features[0].weight.requires_grad and model.features[0].weight.dtype == torch.float64
    assert list(model.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    for out, expected in zip(model(x), original(x)):  # features, attention weights, kept modules
        assert_close(out, expected)
    with warnings.catch_warnings(record=True):  # the same modules are kept again
        fastdl.nn.replace_modules(model)
    assert all(a is b for a, b in zip(model.parameters(), parameters)) and type(model.features[0]) is fastdl.nn.Conv2d
    root = nn.Conv2d(3, 4, 3)
    assert type(fastdl.nn.replace_modules(root)) is fastdl.nn.Conv2d


def test_replace_modules_on_reference_resnet_matches_fastdl_resnet():
    fresh_seed()
    model, ref = twins("resnet18", num_classes=10, small_input=True)
    fastdl.nn.replace_modules(ref)
    assert all(type(m) is fastdl.nn.Conv2d for m in ref.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model.eval(), ref.eval()
    with torch.no_grad():
        assert_close(ref(x), model(x))
