"""What the Triton kernels share: the interpreter flag, autotuning candidates and matmul precision.

On a GPU each kernel is tuned over a short list of tiles. Under the Triton interpreter
(``TRITON_INTERPRET=1``, CPU tensors) it gets exactly one small tile instead: there is nothing to
tune there, and every extra candidate would run through the slow interpreter.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tile_configs(block_names, gpu_tiles, interpreter_tile, interpret: bool = INTERPRET) -> list[triton.Config]:
    """Configs from tiles written ``(*block sizes in block_names order, num_warps, num_stages)``:
    every one of ``gpu_tiles``, or only ``interpreter_tile`` when ``interpret``."""
    tiles = [interpreter_tile] if interpret else gpu_tiles
    return [
        triton.Config(dict(zip(block_names, tile[:-2], strict=True)), num_warps=tile[-2], num_stages=tile[-1])
        for tile in tiles
    ]


def precision(dtype) -> str:
    """The ``PREC`` argument of :func:`mm` for inputs of ``dtype``: float32 gets exact float32
    products (no TF32), matching the other implementations; 16-bit inputs use the tensor cores."""
    if dtype == torch.float32:
        return "ieee"
    if INTERPRET and dtype == torch.bfloat16:
        return "upcast"
    return "tf32"


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """a @ b with float32 accumulation. PREC "upcast" multiplies in float32: the interpreter's
    bfloat16 dot goes through float16 (the operands are bfloat16 values either way)."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)
