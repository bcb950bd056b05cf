"""Datasets read from files users already have (no downloads, no torchvision) and batched
image transforms.

- :class:`CIFAR10`, :class:`CIFAR100`: the python-pickle batches; :class:`MNIST`,
  :class:`FashionMNIST`: IDX files (raw or ``.gz``); :func:`digits`: scikit-learn's bundled
  8x8 digits. These hold ``images: Tensor[N, C, H, W]`` uint8 and ``labels: Tensor[N]`` int64.
- :class:`ImageFolder`, :class:`TinyImageNet`: image files decoded on access (Pillow);
  ``.load()`` brings them into memory.
- :class:`TensorBatches`: shuffled mini-batches of an in-memory dataset, transformed per batch.
- :mod:`fastdl.data.transforms`: crop, flip, normalise and resize whole batches.
- :mod:`fastdl.data.voc`, :mod:`.coco`, :mod:`.shapes`: detection sets (Pascal VOC, COCO json, a
  seeded synthetic set); :mod:`.text` and :mod:`.tokenizer`: text corpora and tokenizers for GPT.
"""

from . import transforms
from .batches import TensorBatches
from .cifar import CIFAR10, CIFAR100
from .dataset import ImageTensorDataset
from .digits import digits
from .folder import ImageFiles, ImageFolder, TinyImageNet, read_image
from .mnist import MNIST, FashionMNIST, read_idx
from .tokenizer import ByteTokenizer, GPT2Tokenizer, get_tokenizer

__all__ = [
    "ByteTokenizer",
    "GPT2Tokenizer",
    "get_tokenizer",
    "CIFAR10",
    "CIFAR100",
    "FashionMNIST",
    "ImageFiles",
    "ImageFolder",
    "ImageTensorDataset",
    "MNIST",
    "TensorBatches",
    "TinyImageNet",
    "digits",
    "read_idx",
    "read_image",
    "transforms",
]
