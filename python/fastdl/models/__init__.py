"""Model definitions laid out like ``torchvision.models``, running fastdl's kernels."""

from .resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    fuse_for_inference,
    load_checkpoint,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "fuse_for_inference",
    "load_checkpoint",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]
