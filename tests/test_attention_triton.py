"""The Triton attention kernels (fastdl.kernels.attention) against the float64 composite.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET
before anything imports them) on CPU tensors, so the sizes here are small. The checks marked
``cuda`` compare the registered CUDA op with the composite at realistic sizes on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from harness import require_triton

triton = require_triton("attention")

import fastdl.ops  # noqa: E402,F401  (registers the ops)
from fastdl.kernels import attention as triton_attention  # noqa: E402
from fastdl.ops import _library  # noqa: E402

FORWARD = triton_attention.attention_forward_op
BACKWARD = triton_attention.attention_backward_op
COMPOSITE = _library.composite("attention")
COMPOSITE_BACKWARD = _library.composite("_attention_backward")

TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}


def make_qkv(b, h, hkv, nq, nk, d, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(1000 * nq + 10 * nk + d + h + hkv)
    q = torch.randn(b, h, nq, d, generator=gen)
    k = torch.randn(b, hkv, nk, d, generator=gen)
    v = torch.randn(b, hkv, nk, d, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def make_mask(kind, b, h, nq, nk):
    gen = torch.Generator().manual_seed(7 * nq + nk)
    if kind is None:
        return None
    if kind == "bool":  # full shape, one row with no visible key
        m = torch.rand(b, h, nq, nk, generator=gen) > 0.3
        m[:, :, 0, :] = False
        return m
    if kind == "bool-2d":  # [Nq, Nk], broadcast over batch and heads
        return torch.rand(nq, nk, generator=gen) > 0.5
    if kind == "float-keys":  # [1, H, 1, Nk] additive, -inf on some keys
        m = torch.randn(1, h, 1, nk, generator=gen)
        m[..., ::3] = float("-inf")
        return m
    if kind == "float-full":  # [B, 1, Nq, Nk] additive, one row entirely -inf
        m = torch.randn(b, 1, nq, nk, generator=gen) * 2
        m[:, :, -1, :] = float("-inf")
        return m
    if kind == "float-transposed":  # [Nq, Nk] view of a [Nk, Nq] tensor: non-unit inner stride
        return torch.randn(nk, nq, generator=gen).t()
    raise ValueError(kind)


def expected(q, k, v, mask, causal, scale, dropout_p=0.0, seed=0, grad_out=None, grad_lse=None):
    """(out, lse, dq, dk, dv) of the float64 composite."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    out, lse = COMPOSITE(q64, k64, v64, mask, causal, scale, dropout_p, seed)
    grads = None
    if grad_out is not None:
        grads = COMPOSITE_BACKWARD(
            grad_out.double(),
            q64,
            k64,
            v64,
            mask,
            out,
            lse,
            None if grad_lse is None else grad_lse.double(),
            causal,
            scale,
            dropout_p,
            seed,
        )
    return out, lse, grads


def check_all(q, k, v, mask=None, causal=False, scale=None, dropout_p=0.0, seed=0, grad_lse=False, tol=None):
    d = q.size(-1)
    scale = d**-0.5 if scale is None else scale
    tol = tol or TOL[q.dtype]
    out, lse = FORWARD(q, k, v, mask, causal, scale, dropout_p, seed)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    gen = torch.Generator().manual_seed(3)
    grad_out = torch.randn(q.shape, generator=gen).to(q.dtype)
    glse = torch.randn(q.shape[:3], generator=gen) if grad_lse else None
    ref_out, ref_lse, ref_grads = expected(q, k, v, mask, causal, scale, dropout_p, seed, grad_out, glse)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    # same -inf positions (rows with no visible key) and the same natural-log values elsewhere
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)
    grads = BACKWARD(grad_out, q, k, v, mask, out, lse, glse, causal, scale, dropout_p, seed)
    for name, actual, exp, inp in zip("qkv", grads, ref_grads, (q, k, v)):
        assert actual.dtype == inp.dtype and actual.shape == inp.shape, name
        assert not actual.isnan().any(), f"NaN in d{name}"
        torch.testing.assert_close(actual.double(), exp, **tol, msg=lambda m, n=name: f"d{n}: {m}")
    return out, lse, grads


# (H, Hkv, Nq, Nk, D, causal, mask kind)
CASES = [
    (2, 2, 33, 33, 16, False, None),
    (2, 2, 33, 33, 16, True, None),
    (2, 2, 32, 32, 16, True, None),  # block-aligned
    (2, 2, 1, 1, 16, False, None),
    (2, 2, 1, 70, 16, True, None),  # one query at the end of a long key sequence
    (2, 2, 7, 70, 24, True, None),  # Nq < Nk causal: aligned to the end; D padded 24 -> 32
    (2, 2, 70, 7, 16, True, None),  # Nq > Nk causal: leading rows see nothing
    (2, 2, 70, 70, 64, True, None),
    (4, 2, 33, 40, 16, True, None),  # grouped-query
    (4, 1, 33, 40, 24, False, None),  # multi-query
    (2, 2, 33, 40, 8, False, None),  # D = 8 padded to 16
    (2, 2, 33, 40, 40, True, None),  # D = 40 padded to 64
    (2, 2, 33, 40, 16, False, "bool"),
    (2, 2, 33, 40, 16, True, "bool-2d"),
    (4, 2, 33, 40, 16, False, "float-keys"),
    (2, 2, 33, 40, 16, True, "float-full"),
    (2, 2, 33, 40, 16, False, "float-transposed"),
]


def case_id(c):
    h, hkv, nq, nk, d, causal, mask = c
    return f"H{h}kv{hkv}-Nq{nq}-Nk{nk}-D{d}" + ("-causal" if causal else "") + (f"-{mask}" if mask else "")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_composite(case):
    h, hkv, nq, nk, d, causal, mask_kind = case
    q, k, v = make_qkv(1, h, hkv, nq, nk, d)
    check_all(q, k, v, make_mask(mask_kind, 1, h, nq, nk), causal)


def test_non_causal_backward_is_not_causal():
    """The non-causal backward must see every key (a kernel that always masks causally fails)."""
    q, k, v = make_qkv(1, 2, 2, 33, 33, 16)
    out, lse, grads = check_all(q, k, v, causal=False)
    c_out, c_lse = FORWARD(q, k, v, None, True, 0.25, 0.0, 0)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    c_grads = BACKWARD(grad, q, k, v, None, c_out, c_lse, None, True, 0.25, 0.0, 0)
    # under causal the last key is seen by the last query only; without causal by all of them
    assert (grads[1][:, :, -1] - c_grads[1][:, :, -1]).abs().max() > 1e-2
    assert (grads[0] - c_grads[0]).abs().max() > 1e-2


def test_batch_and_custom_scale():
    q, k, v = make_qkv(2, 2, 1, 17, 20, 16)
    check_all(q, k, v, causal=True, scale=0.7)


def test_gradient_through_lse():
    q, k, v = make_qkv(1, 2, 2, 20, 33, 16)
    check_all(q, k, v, make_mask("bool", 1, 2, 20, 33), causal=True, grad_lse=True)


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_composite(causal):
    """Same hash, same dropped elements: forward and backward equal the composite's."""
    q, k, v = make_qkv(1, 4, 2, 33, 40, 16)
    out, _, _ = check_all(q, k, v, causal=causal, dropout_p=0.3, seed=1234)
    plain, _ = FORWARD(q, k, v, None, causal, 0.25, 0.0, 0)
    assert not torch.allclose(out, plain, atol=1e-3)  # something was dropped
    other, _ = FORWARD(q, k, v, None, causal, 0.25, 0.3, 99)
    assert not torch.allclose(out, other, atol=1e-3)  # the seed matters


def test_dropout_large_seed():
    q, k, v = make_qkv(1, 2, 2, 17, 17, 16)
    check_all(q, k, v, causal=False, dropout_p=0.5, seed=2**40 + 12345)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision(dtype, causal):
    q, k, v = make_qkv(1, 2, 2, 33, 40, 24, dtype=dtype)
    check_all(q, k, v, make_mask("float-keys", 1, 2, 33, 40), causal)


def test_non_contiguous_inputs():
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, H, D] memory
    kt = torch.stack([k, torch.zeros_like(k)], dim=-1)[..., 0]  # every other element of a wider tensor
    assert not qt.is_contiguous() and not kt.is_contiguous()
    out, lse = FORWARD(qt, kt, v, None, True, 0.25, 0.0, 0)
    ref_out, ref_lse, _ = expected(q, k, v, None, True, 0.25)
    torch.testing.assert_close(out.double(), ref_out, **TOL[torch.float32])
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)


def test_empty_inputs():
    q, k, v = make_qkv(1, 2, 2, 5, 0, 16)
    out, lse = FORWARD(q, k, v, None, False, 0.25, 0.0, 0)
    assert out.shape == q.shape and (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv = BACKWARD(torch.ones_like(out), q, k, v, None, out, lse, None, False, 0.25, 0.0, 0)
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape


def test_float64_uses_composite():
    q, k, v = make_qkv(1, 2, 2, 9, 9, 16, dtype=torch.float64)
    out, lse = FORWARD(q, k, v, None, True, 0.25, 0.0, 0)
    ref_out, ref_lse, _ = expected(q, k, v, None, True, 0.25)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_bad_inputs_rejected():
    q, k, v = make_qkv(1, 3, 2, 8, 8, 16)
    with pytest.raises(RuntimeError, match="multiple of the key/value heads"):
        FORWARD(q, k, v, None, False, 0.25, 0.0, 0)


def test_head_dim_padding():
    for d in range(8, 257, 8):
        bd = triton_attention._block_d(d)
        assert bd >= d and bd & (bd - 1) == 0 and bd >= 16


KERNELS = {"fwd": "_fwd_kernel", "dkdv": "_bwd_dkdv", "dq": "_bwd_dq"}


@pytest.mark.parametrize("interpret", [False, True])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_tile_configs_are_valid(kernel, interpret):
    """Power-of-two tiles >= 16 (tl.dot); one tile in the interpreter, several on a GPU; the pruning
    keeps at least one, never more shared memory than the budget, and several for long sequences."""
    configs = triton_attention._tile_configs(kernel, interpret)
    assert len(configs) == 1 if interpret else len(configs) > 1
    for cfg in configs:
        for block in ("BM", "BN"):
            size = cfg.kwargs[block]
            assert size >= 16 and size & (size - 1) == 0, cfg
    if interpret == triton_attention._INTERPRET:  # what the kernels were decorated with
        assert getattr(triton_attention, KERNELS[kernel]).configs == configs
    if interpret:
        return
    bucket = triton_attention._length_bucket
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        elem_size = dtype.itemsize
        for d in (16, 64, 128, 256):
            block_d = triton_attention._block_d(d)
            for nq, nk in ((1, 1), (1, 5000), (20, 33), (4096, 4096)):
                kept = triton_attention._usable_tiles(kernel, configs, block_d, elem_size, bucket(nq), bucket(nk))
                assert kept and all(c in configs for c in kept), (d, dtype, nq, nk)
                for c in kept:
                    bm, bn = c.kwargs["BM"], c.kwargs["BN"]
                    smem = triton_attention._shared_memory(kernel, bm, bn, block_d, elem_size, c.num_stages)
                    assert smem <= triton_attention._SHARED_MEMORY_BUDGET, (d, dtype, c)
                    # no tile that is mostly padding (the smallest GPU tiles are 32 long)
                    assert bm < 2 * max(32, nq) and bn < 2 * max(32, nk), (nq, nk, c)
                    if d == 256 and dtype == torch.float32:
                        assert bm * bn <= 32 * 32, c
                if d <= 128 and elem_size == 2 and nq == 4096:
                    assert len(kept) > 1, (d, dtype)  # something left to tune


def test_autotuner_prunes_with_kernel_arguments(monkeypatch):
    """The pruning hook reads the launch arguments (Q, the length buckets, BLOCK_D): a tile longer
    than both sequences is dropped before anything is benchmarked."""
    kernel = triton_attention._fwd_kernel
    small = triton.Config({"BM": 32, "BN": 16}, num_warps=1, num_stages=1)
    monkeypatch.setattr(kernel, "configs", [triton.Config({"BM": 64, "BN": 64}, num_warps=1, num_stages=1), small])
    monkeypatch.setattr(kernel, "cache", {})
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16)
    out, _ = FORWARD(q, k, v, None, True, 0.25, 0.0, 0)
    assert kernel.best_config == small
    torch.testing.assert_close(out.double(), expected(q, k, v, None, True, 0.25)[0], **TOL[torch.float32])


def force_tiles(monkeypatch, fwd, dkdv, dq):
    """Make every kernel run the given (BM, BN) tile, as if the autotuner had picked it."""
    for kernel, (bm, bn) in zip(KERNELS.values(), (fwd, dkdv, dq)):
        config = triton.Config({"BM": bm, "BN": bn}, num_warps=1, num_stages=1)
        monkeypatch.setattr(getattr(triton_attention, kernel), "configs", [config])


# (fwd, dkdv, dq) tiles: the interpreter's own, the transposed shapes, and tiles longer than Nq
TILE_SETS = [None, ((16, 32), (32, 16), (16, 32)), ((64, 32), (64, 64), (64, 16))]


def test_results_do_not_depend_on_tiles(monkeypatch):
    """Whatever tiles the autotuner picks, outputs match the composite and each other, and dropout
    drops the same elements (it hashes absolute (row, column) indices, not block indices)."""
    h, hkv, nq, nk, d = 4, 2, 33, 40, 40
    q, k, _ = make_qkv(1, h, hkv, nq, nk, d)
    v = torch.eye(nk, d).expand(1, hkv, nk, d).contiguous()  # out[..., i, j] = dropped probability p[i, j]
    mask = make_mask("bool", 1, h, nq, nk)
    results = []
    for tiles in TILE_SETS:
        with monkeypatch.context() as patch:
            if tiles is not None:
                force_tiles(patch, *tiles)
            results.append(check_all(q, k, v, mask, causal=True, dropout_p=0.3, seed=1234))
    (out, lse, grads), others = results[0], results[1:]
    assert (out == 0).any() and not (out == 0).all()
    for other_out, other_lse, other_grads in others:
        assert torch.equal(other_out == 0, out == 0)  # the same dropped (and hidden) elements
        torch.testing.assert_close(other_out, out, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(other_lse, lse, atol=1e-6, rtol=1e-6)
        for actual, exp in zip(other_grads, grads):
            torch.testing.assert_close(actual, exp, atol=1e-5, rtol=1e-5)


# ---- GPU: the registered CUDA op at realistic sizes ---------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_op_matches_composite(d, dtype, causal):
    assert _library.implementation("attention", "cuda") == "Triton"
    b, h, n = 2, 4, 1024
    q, k, v = (t.requires_grad_() for t in make_qkv(b, h, h, n, n, d, dtype=dtype, device="cuda"))
    out, lse = fastdl.ops.attention(q, k, v, causal=causal, return_lse=True)
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    ref_out, ref_lse, ref_grads = expected(q.detach(), k.detach(), v.detach(), None, causal, d**-0.5, grad_out=grad)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.float16 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-3)
    for actual, exp in zip((dq, dk, dv), ref_grads):
        torch.testing.assert_close(actual.double(), exp, **tol)


@pytest.mark.cuda
@needs_cuda
def test_cuda_gqa_mask_dropout_float32():
    b, h, hkv, nq, nk, d = 1, 8, 2, 300, 513, 72
    q, k, v = make_qkv(b, h, hkv, nq, nk, d, device="cuda")
    mask = make_mask("bool", b, h, nq, nk).cuda()
    out, lse = FORWARD(q, k, v, mask, True, d**-0.5, 0.2, 77)
    grad = torch.randn_like(out)
    grads = BACKWARD(grad, q, k, v, mask, out, lse, None, True, d**-0.5, 0.2, 77)
    ref_out, ref_lse, ref_grads = expected(q, k, v, mask, True, d**-0.5, 0.2, 77, grad_out=grad)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    for actual, exp in zip(grads, ref_grads):
        torch.testing.assert_close(actual.double(), exp, atol=1e-4, rtol=1e-4)
