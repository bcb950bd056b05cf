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


def make_run(fn, args, mode: str, device: str, grad=None):
    """The closure a benchmark times: ``fn(*args)`` alone (``"forward"``, under no_grad), or followed
    by the gradient w.r.t. every argument that requires grad (``"forward+backward"``). The output
    gradient (``grad``, default ones) is made once, outside the timed region."""
    if mode == "forward":

        def run():
            with torch.no_grad():
                out = fn(*args)
            sync(device)
            return out

        return run
    wrt = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    if grad is None:
        with torch.no_grad():
            grad = torch.ones_like(fn(*args))

    def run():
        out = fn(*args)
        torch.autograd.grad(out, wrt, grad)
        sync(device)
        return out

    return run


def peak_mb(fn) -> float | None:
    """Peak extra CPU memory of one call of ``fn``, in MB, from torch's memory profiler.

    An op's ``cpu_memory_usage`` includes its children's, so only each op's own (``self``)
    allocations count: placed at the op's start, and its own frees (the temporaries of its
    children it lets go) at its end.
    """
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        changes = []
        for e in prof.profiler.function_events:
            usage = e.self_cpu_memory_usage
            if usage:
                changes.append((e.time_range.start if usage > 0 else e.time_range.end, usage))
        current = peak = 0
        for _, usage in sorted(changes):
            current += usage
            peak = max(peak, current)
        return peak / 2**20
    except Exception:  # the profiler is optional: the table leaves the column empty
        return None


def torchvision_ops():
    """``torchvision.ops`` when torchvision imports and its compiled ops load (it needs the torch it
    was built for), else None: the benchmarks then add it as a named peer."""
    try:
        import torchvision.ops

        torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    except Exception:  # missing, or built for another torch: the peer is left out
        return None
    return torchvision.ops
