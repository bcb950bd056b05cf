"""The network of a run, and its wrapping for the device: synchronized BatchNorm, channels-last,
DDP and ``torch.compile``."""

from __future__ import annotations

import torch
from torch import nn

from .. import models
from .config import ConfigError
from .distributed import Context
from .sync_batchnorm import convert_batchnorm

__all__ = ["build_model", "wrap_model"]

_DEPTHS = {
    "resnet10": (models.BasicBlock, [1, 1, 1, 1]),
    "resnet18": (models.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (models.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (models.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (models.Bottleneck, [3, 4, 23, 3]),
    "resnet152": (models.Bottleneck, [3, 8, 36, 3]),
}


def build_model(name: str, num_classes: int, in_channels: int, small_input: bool) -> models.ResNet:
    """A freshly initialised ResNet (from torch's global generator: seed it first)."""
    if name not in _DEPTHS:
        raise ConfigError(f"MODEL: unknown model {name!r}; expected one of {', '.join(_DEPTHS)}")
    block, layers = _DEPTHS[name]
    return models.ResNet(block, layers, num_classes=num_classes, in_channels=in_channels, small_input=small_input)


def wrap_model(
    net: nn.Module, device: torch.device, context: Context, sync_bn: bool, channels_last: bool, compile: bool
) -> tuple[nn.Module, nn.Module]:
    """``(net, model)``: ``net`` on ``device`` (what checkpoints save and evaluation runs) and
    ``model``, the module a training step calls (``net``, or DDP around it, compiled or not).

    ``sync_bn`` turns every BatchNorm2d into one over the global batch: torch's SyncBatchNorm
    on CUDA, :class:`~fastdl.train.sync_batchnorm.GlobalBatchNorm2d` elsewhere (also for one
    process, so single and distributed runs share the arithmetic).
    """
    if sync_bn:
        if device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        else:
            net = convert_batchnorm(net)
    net = net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = net
    if context.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        model = torch.compile(model)
    return net, model
