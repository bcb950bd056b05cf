"""ResNet (He et al., 2015) with torchvision's module names, built on fastdl's convolution.

Every convolution is a :class:`fastdl.nn.Conv2d`, so a torchvision checkpoint loads unchanged
(``load_state_dict(strict=True)``) and the layers run fastdl's kernels. The Bottleneck block
strides in its 3x3 convolution ("ResNet V1.5"), as torchvision does.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..nn import Conv2d, fuse_conv_bn

__all__ = [
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "fuse_for_inference",
    "load_checkpoint",
]

NormLayer = Callable[[int], nn.Module]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> Conv2d:
    """3x3 convolution without bias; padding = dilation keeps the size at stride 1."""
    return Conv2d(
        in_planes, out_planes, 3, stride=stride, padding=dilation, groups=groups, bias=False, dilation=dilation
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> Conv2d:
    """1x1 convolution without bias."""
    return Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def _fuse_pair(conv: nn.Module, norm: nn.Module, activation: str | None, where: str) -> Conv2d:
    """``activation(norm(conv(x)))`` as one fastdl convolution, or a ValueError naming ``where``
    when ``norm`` is not a BatchNorm with running statistics."""
    if not isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm)) or not norm.track_running_stats:
        raise ValueError(
            f"fuse: {where} is {type(norm).__name__}; only BatchNorm2d with running statistics folds into a convolution"
        )
    return fuse_conv_bn(conv, norm, activation)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    ``forward(Tensor[N, inplanes, H, W]) -> Tensor[N, planes, H / stride, W / stride]``.
    ``downsample`` maps the input to the output's shape when they differ.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: NormLayer | None = None,
    ):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(f"BasicBlock supports only groups=1 and width_per_group=64, got {groups} and {base_width}")
        if dilation > 1:
            raise NotImplementedError("BasicBlock does not support dilation > 1 (use a Bottleneck model)")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self.fused = False

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        if self.fused:
            return self.conv2(self.conv1(x), residual=identity)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)

    def fuse_(self) -> None:
        """Fold each BatchNorm into the convolution before it, in place (see :func:`fuse_for_inference`)."""
        self.conv1, self.bn1 = _fuse_pair(self.conv1, self.bn1, "relu", "bn1"), nn.Identity()
        self.conv2, self.bn2 = _fuse_pair(self.conv2, self.bn2, "relu", "bn2"), nn.Identity()
        _fuse_downsample(self.downsample)
        self.fused = True


class Bottleneck(nn.Module):
    """1x1 (reduce) -> 3x3 (strided, grouped) -> 1x1 (expand by 4) with a residual connection
    (ResNet-50/101/152, ResNeXt, Wide ResNet). The inner width is
    ``int(planes * width_per_group / 64) * groups``.

    ``forward(Tensor[N, inplanes, H, W]) -> Tensor[N, 4 * planes, H / stride, W / stride]``.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: NormLayer | None = None,
    ):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.fused = False

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        if self.fused:
            return self.conv3(self.conv2(self.conv1(x)), residual=identity)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def fuse_(self) -> None:
        """Fold each BatchNorm into the convolution before it, in place (see :func:`fuse_for_inference`)."""
        self.conv1, self.bn1 = _fuse_pair(self.conv1, self.bn1, "relu", "bn1"), nn.Identity()
        self.conv2, self.bn2 = _fuse_pair(self.conv2, self.bn2, "relu", "bn2"), nn.Identity()
        self.conv3, self.bn3 = _fuse_pair(self.conv3, self.bn3, "relu", "bn3"), nn.Identity()
        _fuse_downsample(self.downsample)
        self.fused = True


def _fuse_downsample(downsample: nn.Module | None) -> None:
    """Fold ``downsample.1`` (BatchNorm) into ``downsample.0`` (1x1 convolution), in place."""
    if downsample is None:
        return
    downsample[0] = _fuse_pair(downsample[0], downsample[1], None, "downsample.1")
    downsample[1] = nn.Identity()


class ResNet(nn.Module):
    """ResNet with torchvision's structure and state_dict keys: ``conv1, bn1, relu, maxpool,
    layer1..layer4, avgpool, fc``.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``[2, 2, 2, 2]`` for ResNet-18.
        num_classes: outputs of ``fc``.
        zero_init_residual: start each block's last BatchNorm at weight 0, so every block begins
            as the identity.
        groups, width_per_group: the grouped 3x3 convolution of Bottleneck (ResNeXt: 32 and 4;
            Wide ResNet: 1 and 128).
        replace_stride_with_dilation: three bools for layer2..layer4: dilate instead of striding
            (keeps the resolution; Bottleneck only).
        norm_layer: ``norm_layer(channels) -> nn.Module``; default ``nn.BatchNorm2d``.
        in_channels: channels of the input images (1 for MNIST).
        small_input: the CIFAR stem for 32x32-sized images: ``conv1`` is 3x3 stride 1 and
            ``maxpool`` is ``nn.Identity``, so layer1 sees the full resolution. The default is
            ImageNet's 7x7 stride-2 ``conv1`` followed by a 3x3 stride-2 max pool.

    ``forward(Tensor[N, in_channels, H, W]) -> Tensor[N, num_classes]`` (logits).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: list[bool] | None = None,
        norm_layer: NormLayer | None = None,
        in_channels: int = 3,
        small_input: bool = False,
    ):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 stage depths, got {layers}")
        replace_stride_with_dilation = replace_stride_with_dilation or [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(f"replace_stride_with_dilation must have 3 entries, got {replace_stride_with_dilation}")
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.in_channels = in_channels
        self.inplanes = 64
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group
        self.fused = False

        if small_input:
            self.conv1 = Conv2d(in_channels, self.inplanes, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = Conv2d(in_channels, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        """One stage: the first block changes resolution and width, the others keep them."""
        first_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                self._norm_layer(planes * block.expansion),
            )
        stage = [
            block(
                self.inplanes,
                planes,
                stride,
                downsample,
                self.groups,
                self.base_width,
                first_dilation,
                self._norm_layer,
            )
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            stage.append(
                block(
                    self.inplanes,
                    planes,
                    groups=self.groups,
                    base_width=self.base_width,
                    dilation=self.dilation,
                    norm_layer=self._norm_layer,
                )
            )
        return nn.Sequential(*stage)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                last_norm = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
                if last_norm is not None and getattr(last_norm, "weight", None) is not None:
                    nn.init.constant_(last_norm.weight, 0)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"ResNet: expected a 4-D input [N, {self.in_channels}, H, W], got {x.dim()}-D of shape {list(x.shape)}"
            )
        if x.size(1) != self.in_channels:
            raise ValueError(
                f"ResNet: expected {self.in_channels} input channels, got {x.size(1)} (input shape {list(x.shape)}); "
                f"build the model with in_channels={x.size(1)} for such images"
            )
        # fastdl's kernels read and write channels_last natively, and BatchNorm keeps the layout;
        # an NCHW network would pay a layout change at both ends of every convolution (forward
        # and backward), so the model converts once. The logits are [N, num_classes] either way.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def train(self, mode: bool = True) -> "ResNet":
        if mode and self.fused:
            raise RuntimeError("ResNet: a fused model is for inference only; train the unfused model and fuse it again")
        return super().train(mode)

    def fuse(self) -> "ResNet":
        """An inference copy with every BatchNorm folded (see :func:`fuse_for_inference`)."""
        return fuse_for_inference(self)


def fuse_for_inference(model: ResNet) -> ResNet:
    """An eval-only copy of ``model`` in which each convolution -> BatchNorm (-> ReLU) is one
    fastdl convolution with the BatchNorm folded into its weights and the ReLU applied as it
    writes the output (:func:`fastdl.nn.fuse_conv_bn`); the downsample's convolution and
    BatchNorm are fused too. The BatchNorm modules become ``nn.Identity``, so the module names
    stay those of ``model`` (the state_dict loses the BatchNorm entries and gains conv biases).
    Each block's last convolution also adds the shortcut and applies the final ReLU as it
    writes (``residual=`` of :func:`fastdl.ops.conv2d`), so a block's output is written once.
    ``model`` is left unchanged. The copy has no trainable parameters and refuses
    ``train()``; it needs BatchNorm2d normalisation (the default ``norm_layer``).
    """
    if not isinstance(model, ResNet):
        raise TypeError(f"fuse_for_inference expects a fastdl.models.ResNet, got {type(model).__name__}")
    if model.fused:
        return copy.deepcopy(model)
    fused = copy.deepcopy(model).eval()
    fused.conv1 = _fuse_pair(fused.conv1, fused.bn1, "relu", "bn1")
    fused.bn1 = nn.Identity()
    fused.relu = nn.Identity()  # applied by conv1
    for stage in (fused.layer1, fused.layer2, fused.layer3, fused.layer4):
        for block in stage:
            block.fuse_()
    fused.fused = True
    return fused.requires_grad_(False)


def _checkpoint_state_dict(checkpoint, path) -> Mapping[str, Tensor]:
    """The state_dict inside what ``torch.load`` returned: the dict itself, or its
    ``"state_dict"`` or ``"model"`` entry (the layouts training scripts save)."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(checkpoint).__name__}")
    for entry in ("state_dict", "model"):
        if isinstance(checkpoint.get(entry), Mapping):
            return checkpoint[entry]
    return checkpoint


def _describe_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the local checkpoint file ``path`` into ``model`` (strict: every key and shape must
    match) and return ``model``. The file is a ``torch.save``-d state_dict, or a dict holding one
    under ``"state_dict"`` or ``"model"``. A mismatch raises a ValueError listing the missing
    keys, unexpected keys and shape mismatches."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights={str(path)!r} is not a file. fastdl downloads nothing: save a state_dict with "
            "torch.save(model.state_dict(), 'file.pt') (e.g. from torchvision.models.resnet18(weights=...)) "
            "and pass the file's path"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises several types for a damaged or foreign file
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(error).__name__}: {error})") from error
    state = _checkpoint_state_dict(checkpoint, path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in state and torch.is_tensor(state[k]) and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {_describe_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_describe_keys(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches: {_describe_keys(mismatched)}")
        hint = ""
        if any(m.startswith(("conv1.weight", "fc.")) for m in mismatched):
            hint = (
                " (conv1 differs with small_input/in_channels, fc with num_classes: build the model as the "
                "checkpoint was trained, load, then replace model.fc for a new number of classes)"
            )
        raise ValueError(f"{path}: checkpoint does not match the model: " + "; ".join(problems) + hint)
    model.load_state_dict(state, strict=True)
    return model


def _resnet(block, layers: list[int], weights: str | os.PathLike | None, **kwargs) -> ResNet:
    model = ResNet(block, layers, **kwargs)
    if weights is not None:
        load_checkpoint(model, weights)
    return model


def resnet18(weights: str | os.PathLike | None = None, **kwargs) -> ResNet:
    """ResNet-18: BasicBlock x [2, 2, 2, 2]. ``weights``: None (random init) or the path of a
    local checkpoint (:func:`load_checkpoint`); ``kwargs`` go to :class:`ResNet`."""
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, **kwargs)


def resnet34(weights: str | os.PathLike | None = None, **kwargs) -> ResNet:
    """ResNet-34: BasicBlock x [3, 4, 6, 3]. Arguments as :func:`resnet18`."""
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, **kwargs)


def resnet50(weights: str | os.PathLike | None = None, **kwargs) -> ResNet:
    """ResNet-50 (V1.5): Bottleneck x [3, 4, 6, 3]. Arguments as :func:`resnet18`."""
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, **kwargs)


def resnet101(weights: str | os.PathLike | None = None, **kwargs) -> ResNet:
    """ResNet-101 (V1.5): Bottleneck x [3, 4, 23, 3]. Arguments as :func:`resnet18`."""
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, **kwargs)


def resnet152(weights: str | os.PathLike | None = None, **kwargs) -> ResNet:
    """ResNet-152 (V1.5): Bottleneck x [3, 8, 36, 3]. Arguments as :func:`resnet18`."""
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, **kwargs)
