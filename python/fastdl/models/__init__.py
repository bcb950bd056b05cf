"""Model definitions laid out like ``torchvision.models``, running fastdl's kernels."""

from . import detection
from .gpt2 import GPT, GPTClassifier, GPTConfig, KVCache, sample_next_token
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
    "GPT",
    "GPTClassifier",
    "GPTConfig",
    "KVCache",
    "detection",
    "sample_next_token",
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
