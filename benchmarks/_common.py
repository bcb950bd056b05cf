"""Helpers shared by the benchmark modules."""

from __future__ import annotations

import torch


def record(benchmark, *, op: str, case: str, impl: str, result, reference) -> None:
    """Attach what ``fastdl bench`` reports beside the timing."""
    err = (result.double() - reference.double()).abs().max().item() if result.numel() else 0.0
    benchmark.extra_info.update(op=op, case=case, impl=impl, max_abs_err=err, threads=torch.get_num_threads())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
