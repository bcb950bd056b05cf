"""attention against a float64 reference written straight from the definition."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import fastdl.ops
from fastdl.ops import _library

attention_module = sys.modules["fastdl.ops.attention"]
from harness import assert_close, check_compiled, composite_serves_mps, fresh_seed, non_contiguous, run_opcheck
from optester import OpTester, Sample, dtype_name

# The C++ kernels take other paths per CPU capability: every test runs on each one the CPU has.
pytestmark = pytest.mark.usefixtures("every_cpu_capability")

OP = torch.ops.fastdl.attention.default
BACKWARD = torch.ops.fastdl._attention_backward.default


# ---- the reference --------------------------------------------------------------------------


def reference(q, k, v, causal=False, mask=None, scale=None):
    """(out, lse) in float64 on the CPU: softmax(q k^T * scale + mask) v, empty rows -> 0."""
    q, k, v = (t.double().cpu() for t in (q, k, v))
    b, h, nq, d = q.shape
    nk = k.size(2)
    g = h // k.size(1)
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scale = 1 / math.sqrt(d) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    visible = torch.ones(b, h, nq, nk, dtype=torch.bool)
    if mask is not None:
        mask = mask.cpu()
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            s = s + mask.double()
    if causal:
        visible = visible & torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    s = s.masked_fill(~visible, float("-inf"))
    empty = torch.isinf(s.detach()).all(dim=-1, keepdim=True)  # rows with no visible key
    s = s.masked_fill(empty, 0.0)  # keeps NaN out of the gradient of those rows
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(empty[..., 0], float("-inf"))
    return p @ v, lse


def reference_grads(q, k, v, grad, causal=False, mask=None, scale=None, grad_lse=None):
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    out, lse = reference(*leaves, causal=causal, mask=mask, scale=scale)
    loss = (out * grad.double().cpu()).sum()
    if grad_lse is not None:
        loss = loss + (torch.where(torch.isinf(lse), 0.0, lse) * grad_lse.double().cpu()).sum()
    return torch.autograd.grad(loss, leaves)


# ---- input makers ---------------------------------------------------------------------------


def make_qkv(b, h, hkv, nq, nk, d, dtype=torch.float32, requires_grad=False):
    q = torch.randn(b, h, nq, d, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def make_mask(kind, b, h, nq, nk):
    """Masks of every kind; the boolean ones hide some rows entirely."""
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(b, h, nq, nk) > 0.3
        m[..., 0, :] = False  # a row with no visible key
        return m
    if kind == "bool-broadcast":  # [Nq, Nk], shared by batch and heads
        m = torch.rand(nq, nk) > 0.5
        m[-1] = False
        return m
    if kind == "key-padding":  # [B, 1, 1, Nk]
        m = torch.ones(b, 1, 1, nk, dtype=torch.bool)
        m[0, ..., nk // 2 :] = False
        return m
    if kind == "float":
        m = torch.randn(b, h, nq, nk)
        m[..., 1, :] = float("-inf")
        return m
    if kind == "float-broadcast":  # [H, 1, Nk] (ALiBi-like per-head key bias)
        return torch.randn(h, 1, nk)
    raise ValueError(kind)


# (B, H, Hkv, Nq, Nk, D, causal, mask)
CASES = [
    (2, 4, 4, 7, 7, 24, False, None),
    (1, 4, 2, 129, 129, 40, True, None),
    (2, 2, 1, 1, 5, 8, False, "bool"),
    (1, 2, 2, 33, 70, 64, True, "float"),
    (1, 3, 1, 16, 40, 16, True, "bool-broadcast"),
    (2, 2, 2, 20, 20, 128, False, "float-broadcast"),
    (2, 2, 1, 30, 65, 32, False, "key-padding"),
    (1, 2, 2, 40, 10, 32, True, None),  # Nq > Nk: the first 30 queries see nothing
    (1, 1, 1, 5, 200, 256, True, None),  # Nq < Nk: queries are the last 5 positions
    (1, 2, 2, 70, 150, 48, True, "bool"),  # several query and key blocks, with a mask
]


def case_id(c):
    b, h, hkv, nq, nk, d, causal, mask = c
    return f"B{b}H{h}kv{hkv}-{nq}x{nk}-D{d}{'-causal' if causal else ''}{'-' + mask if mask else ''}"


def attention_args(case, dtype):
    b, h, hkv, nq, nk, d, causal, mask_kind = case
    q, k, v = make_qkv(b, h, hkv, nq, nk, d, dtype)
    return (q, k, v, make_mask(mask_kind, b, h, nq, nk), causal, 1 / math.sqrt(d), 0.0, 0)


class TestAttention(OpTester):
    op = OP
    differentiable = (0, 1, 2)  # q, k, v
    autocast_dtype = torch.bfloat16  # the "lower" rule, as scaled_dot_product_attention
    autocast_output_dtypes = (torch.bfloat16, torch.float32)  # the log-sum-exp stays in float32

    def samples(self):
        for dtype in (torch.float32, torch.float64):
            for case in CASES:
                yield Sample(attention_args(case, dtype), name=f"{dtype_name(dtype)}-{case_id(case)}")
        yield Sample(attention_args((1, 2, 1, 40, 70, 64, True, None), torch.bfloat16), name="bfloat16")
        q, k, v = make_qkv(2, 4, 2, 17, 23, 32)
        # [B, N, H, D] storage seen as [B, H, N, D] (what attention layers produce), and strided
        transposed, strided = q.transpose(1, 2).contiguous().transpose(1, 2), non_contiguous(k)
        assert not transposed.is_contiguous() and not strided.is_contiguous()
        yield Sample((transposed, strided, non_contiguous(v), None, True, 0.2, 0.0, 0), name="non_contiguous")
        yield Sample((*make_qkv(0, 2, 2, 5, 5, 16), None, False, 0.25, 0.0, 0), name="no_batch")
        # no keys at all: every row is empty
        yield Sample((*make_qkv(1, 2, 2, 5, 0, 16), None, False, 0.25, 0.0, 0), name="no_keys")

    def reference(self, q, k, v, mask, causal, scale, dropout_p, seed):
        return reference(q, k, v, causal, mask, scale)

    def assert_matches(self, sample, result, expected):
        (out, lse), (ref_out, ref_lse) = result, expected
        q, _, v = sample.args[:3]
        dtype = sample.dtype
        assert out.dtype == dtype and out.shape == (*q.shape[:3], v.size(-1))
        assert lse.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype) and lse.shape == q.shape[:3]
        assert_close(out, ref_out, dtype)
        empty = torch.isinf(ref_lse)
        assert torch.equal(torch.isinf(lse), empty), "empty rows must have lse = -inf"
        assert torch.equal(out[empty], torch.zeros_like(out[empty])), "empty rows must give zeros"
        assert_close(lse[~empty], ref_lse[~empty], dtype)

    def gradcheck_samples(self):
        """Small ones with no empty row (its log-sum-exp, -inf, has no finite difference), and one
        with dropout (the same seed draws the same mask at every evaluation)."""
        for causal, hkv in ((False, 2), (True, 1)):
            yield Sample(
                (*make_qkv(1, 2, hkv, 5, 7, 8, torch.float64), None, causal, 0.35, 0.0, 0),
                name=f"kv{hkv}" + ("-causal" if causal else ""),
            )
        yield Sample((*make_qkv(1, 1, 1, 7, 9, 8, torch.float64), None, True, 0.35, 0.4, 42), name="dropout")

    def opcheck_samples(self):
        # opcheck traces each sample several times: three small ones
        for causal, mask_kind, hkv in ((False, None, 2), (True, "bool", 1), (False, "float-broadcast", 2)):
            yield Sample(
                (*make_qkv(2, 2, hkv, 6, 9, 16), make_mask(mask_kind, 2, 2, 6, 9), causal, 0.25, 0.0, 0),
                name=f"kv{hkv}" + ("-causal" if causal else "") + (f"-{mask_kind}" if mask_kind else ""),
            )

    def compile_sample(self):
        return Sample((*make_qkv(1, 2, 1, 16, 24, 16), None, True, 0.25, 0.0, 0))

    def bad_inputs(self):
        return [(args + (False, 0.25, 0.0, 0), {}, RuntimeError, pattern) for args, pattern in _bad_inputs()]


def test_long_sequence_n1000():
    fresh_seed()
    q, k, v = make_qkv(1, 2, 1, 1000, 1000, 32)
    for causal in (False, True):
        out = fastdl.ops.attention(q, k, v, causal=causal)
        assert_close(out, reference(q, k, v, causal)[0], atol=2e-5, rtol=2e-5)


def test_fully_masked_rows_give_zeros_and_zero_grad():
    fresh_seed()
    q, k, v = make_qkv(1, 2, 2, 6, 9, 16, requires_grad=True)
    mask = torch.ones(6, 9, dtype=torch.bool)
    mask[2] = False
    out = fastdl.ops.attention(q, k, v, attn_mask=mask)
    assert not out.isnan().any()
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    out.sum().backward()
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))
    assert not q.grad.isnan().any() and not k.grad.isnan().any() and not v.grad.isnan().any()


def test_default_and_custom_scale():
    fresh_seed()
    q, k, v = make_qkv(1, 2, 2, 9, 11, 24)
    assert_close(fastdl.ops.attention(q, k, v), reference(q, k, v)[0])
    assert_close(fastdl.ops.attention(q, k, v, scale=0.3), reference(q, k, v, scale=0.3)[0])


def test_matches_torch_sdpa():
    fresh_seed()
    q, k, v = make_qkv(2, 4, 2, 50, 50, 32)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(fastdl.ops.attention(q, k, v, causal=True), expected)


def test_empty_batch_backward():
    q, k, v = make_qkv(0, 2, 1, 5, 7, 16, requires_grad=True)
    fastdl.ops.attention(q, k, v, causal=True).sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_bfloat16_backward():
    fresh_seed()
    q, k, v = make_qkv(1, 2, 2, 33, 33, 32, torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, 2, 33, 32, dtype=torch.bfloat16)
    fastdl.ops.attention(q, k, v, causal=True).backward(grad)
    for actual, expected in zip((q.grad, k.grad, v.grad), reference_grads(q, k, v, grad, causal=True)):
        assert actual.dtype == torch.bfloat16
        assert_close(actual, expected, atol=6e-2, rtol=6e-2)


def test_float16_composite():
    fresh_seed()
    q, k, v = make_qkv(1, 2, 2, 9, 9, 16, torch.float16)
    out, _ = _library.composite("attention")(q, k, v, None, False, 0.25, 0.0, 0)
    assert out.dtype == torch.float16
    assert_close(out, reference(q, k, v, scale=0.25)[0])


# ---- backward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backward_matches_reference(dtype, case):
    fresh_seed()
    b, h, hkv, nq, nk, d, causal, mask_kind = case
    q, k, v = make_qkv(b, h, hkv, nq, nk, d, dtype, requires_grad=True)
    mask = make_mask(mask_kind, b, h, nq, nk)
    grad = torch.randn(b, h, nq, d, dtype=dtype)
    fastdl.ops.attention(q, k, v, causal=causal, attn_mask=mask).backward(grad)
    expected = reference_grads(q, k, v, grad, causal, mask)
    for actual, exp in zip((q.grad, k.grad, v.grad), expected):
        assert_close(actual, exp, atol=5e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("case", CASES[:6], ids=case_id)
def test_composite_backward_matches_reference(case):
    fresh_seed()
    b, h, hkv, nq, nk, d, causal, mask_kind = case
    q, k, v = make_qkv(b, h, hkv, nq, nk, d, torch.float64)
    mask = make_mask(mask_kind, b, h, nq, nk)
    grad, scale = torch.randn(b, h, nq, d, dtype=torch.float64), 1 / math.sqrt(d)
    out, lse = _library.composite("attention")(q, k, v, mask, causal, scale, 0.0, 0)
    grad_lse = torch.randn_like(lse)
    actual = _library.composite("_attention_backward")(grad, q, k, v, mask, out, lse, grad_lse, causal, scale, 0.0, 0)
    for a, e in zip(actual, reference_grads(q, k, v, grad, causal, mask, grad_lse=grad_lse)):
        assert_close(a, e)


def test_gradient_through_lse():
    fresh_seed()
    q, k, v = make_qkv(2, 2, 1, 12, 19, 16, torch.float64, requires_grad=True)
    mask = make_mask("bool", 2, 2, 12, 19)
    out, lse = fastdl.ops.attention(q, k, v, attn_mask=mask, causal=True, return_lse=True)
    grad, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    actual = torch.autograd.grad(
        (out * grad).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * grad_lse).sum(), (q, k, v)
    )
    for a, e in zip(actual, reference_grads(q, k, v, grad, True, mask, grad_lse=grad_lse)):
        assert_close(a, e)


@pytest.mark.parametrize("causal,mask_kind,hkv", [(False, "float", 2), (True, "bool", 2)])
def test_wrapper_gradcheck_with_empty_rows(causal, mask_kind, hkv):
    """The output alone: the log-sum-exp of an empty row is -inf, which has no finite difference."""
    fresh_seed()
    q, k, v = make_qkv(1, 2, hkv, 5, 7, 8, torch.float64, requires_grad=True)
    mask = make_mask(mask_kind, 1, 2, 5, 7)
    torch.autograd.gradcheck(lambda q, k, v: fastdl.ops.attention(q, k, v, causal=causal, attn_mask=mask), (q, k, v))


# ---- dropout ----------------------------------------------------------------------------------


def test_dropout_reproducible_and_matches_composite():
    fresh_seed()
    q, k, v = make_qkv(2, 2, 1, 33, 47, 16)
    torch.manual_seed(7)
    a = fastdl.ops.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(7)
    b = fastdl.ops.attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b)
    assert not torch.allclose(a, fastdl.ops.attention(q, k, v, dropout_p=0.3))
    # the native kernel and the composite draw the same mask from the same seed
    native, _ = OP(q, k, v, None, True, 0.25, 0.3, 1234)
    comp, _ = _library.composite("attention")(q, k, v, None, True, 0.25, 0.3, 1234)
    assert_close(native, comp)


def test_dropout_rate_and_scaling():
    # uniform attention over 256 keys with v = 1: each output is (kept keys / 256) / (1 - p)
    q, k = torch.zeros(1, 1, 200, 8), torch.zeros(1, 1, 256, 8)
    v = torch.ones(1, 1, 256, 8)
    native, _ = OP(q, k, v, None, False, 1.0, 0.25, 99)
    assert abs(native.mean().item() - 1.0) < 0.01
    assert native.std().item() > 0.01
    counter = torch.arange(200 * 256).view(200, 256)
    keep = attention_module.dropout_keep(99, counter, 0.25)
    assert abs(keep.float().mean().item() - 0.75) < 0.01


def test_dropout_backward_matches_composite():
    fresh_seed()
    q, k, v = make_qkv(1, 2, 1, 9, 13, 8, torch.float64)
    out, lse = OP(q, k, v, None, True, 0.35, 0.4, 42)
    grad = torch.randn_like(out)
    native = BACKWARD(grad, q, k, v, None, out, lse, None, True, 0.35, 0.4, 42)
    comp = _library.composite("_attention_backward")(grad, q, k, v, None, out, lse, None, True, 0.35, 0.4, 42)
    for a, e in zip(native, comp):
        assert_close(a, e)


# ---- dispatcher-level checks ----------------------------------------------------------------


def test_opcheck_backward():
    fresh_seed()
    q, k, v = make_qkv(1, 2, 1, 6, 9, 16)
    out, lse = OP(q, k, v, None, True, 0.25, 0.0, 0)
    run_opcheck(BACKWARD, (torch.randn_like(out), q, k, v, None, out, lse, None, True, 0.25, 0.0, 0))


def test_wrapper_under_torch_compile():
    fresh_seed()
    q, k, v = make_qkv(1, 2, 1, 16, 24, 16, requires_grad=True)
    check_compiled(lambda q, k, v: fastdl.ops.attention(q, k, v, causal=True) * 2, q, k, v)


def test_implementations_registered():
    assert _library.implementation("attention", "cpu") == "C++"
    assert _library.implementation("_attention_backward", "cpu") == "C++"
    assert composite_serves_mps("attention")
    assert _library._OPS["attention"].cuda_kernel == "Triton"


# ---- bad input --------------------------------------------------------------------------------


def _bad_inputs():
    """(args, message) pairs: the arguments up to the mask, each wrong in one way."""
    q, k, v = make_qkv(2, 4, 2, 5, 6, 16)
    yield (q[0], k, v, None), r"expected q to be a 4-D tensor .*\[4, 5, 16\]"
    yield (q, k[..., :8], v, None), r"head dims differ: q has D=16, k has D=8"
    yield (q[:, :3], k, v, None), r"H=3 must be a multiple of the key/value heads Hkv=2"
    yield (q[..., :12], k[..., :12], v[..., :12], None), r"unsupported head dim D=12"
    yield (q, k, v[:, :, :4], None), r"k and v must have the same \[Hkv, Nk\]"
    yield (q, k[:1], v[:1], None), r"batch sizes differ: q has B=2, k has B=1"
    yield (q, k.double(), v, None), r"q has dtype .*(Float|float32) but k has dtype .*(Double|float64)"
    yield (q.int(), k.int(), v.int(), None), r"q has unsupported dtype"
    yield (
        (q, k, v, torch.ones(5, 7, dtype=torch.bool)),
        r"attn_mask of shape .*5, 7.* is not broadcastable to \[B, H, Nq, Nk\] = \[2, 4, 5, 6\]",
    )
    yield (q, k, v, torch.ones(5, 6, dtype=torch.int64)), r"attn_mask must be boolean or floating"


def test_float16_rejected_on_cpu():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16, torch.float16)
    with pytest.raises(RuntimeError, match=r"unsupported dtype Half on cpu; supported: float32, float64, bfloat16"):
        fastdl.ops.attention(q, k, v)


def test_bad_dropout():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\), got 1"):
        fastdl.ops.attention(q, k, v, dropout_p=1.0)


# ---- fastdl.nn.MultiheadAttention against torch.nn.MultiheadAttention ---------------------------


def _mha_pair(embed, heads, kdim=None, vdim=None, bias=True):
    import fastdl.nn

    ours = fastdl.nn.MultiheadAttention(embed, heads, bias=bias, kdim=kdim, vdim=vdim, batch_first=True)
    theirs = torch.nn.MultiheadAttention(embed, heads, bias=bias, kdim=kdim, vdim=vdim, batch_first=True)
    if bias:  # non-zero biases so that they are exercised
        with torch.no_grad():
            theirs.in_proj_bias.normal_()
            theirs.out_proj.bias.normal_()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


MHA_CASES = ["self", "self-causal", "key-padding", "bool-mask", "float-mask-3d", "cross-kdim", "no-bias"]


@pytest.mark.parametrize("case", MHA_CASES)
def test_multihead_attention_matches_torch(case):
    fresh_seed()
    b, nq, nk, embed, heads = 2, 9, 9, 32, 4
    kdim = vdim = None
    if case == "cross-kdim":
        nk, kdim, vdim = 13, 24, 16
    ours, theirs = _mha_pair(embed, heads, kdim, vdim, bias=case != "no-bias")
    x = torch.randn(b, nq, embed, requires_grad=True)
    if case == "cross-kdim":
        key, value = torch.randn(b, nk, kdim, requires_grad=True), torch.randn(b, nk, vdim, requires_grad=True)
    else:
        key = value = x
    kwargs = {}
    if case == "self-causal":
        kwargs = dict(attn_mask=torch.ones(nq, nk, dtype=torch.bool).triu(1), is_causal=True)
    elif case == "key-padding":
        pad = torch.zeros(b, nk, dtype=torch.bool)
        pad[1, -3:] = True
        kwargs = dict(key_padding_mask=pad)
    elif case == "bool-mask":
        m = torch.rand(nq, nk) > 0.7
        m[:, 0] = False  # every query keeps at least one key (torch gives NaN otherwise)
        kwargs = dict(attn_mask=m)
    elif case == "float-mask-3d":
        kwargs = dict(attn_mask=torch.randn(b * heads, nq, nk))
    expected, _ = theirs(x, key, value, need_weights=False, **kwargs)
    ours_kwargs = dict(kwargs)
    if case == "self-causal":  # fastdl takes the causal flag alone
        ours_kwargs.pop("attn_mask")
    actual, weights = ours(x, key, value, need_weights=False, **ours_kwargs)
    assert weights is None
    assert_close(actual, expected, atol=2e-5, rtol=2e-5)
    grad = torch.randn_like(expected)
    inputs = [x] + ([key, value] if case == "cross-kdim" else [])
    got = torch.autograd.grad(actual, inputs + list(ours.parameters()), grad)
    want = torch.autograd.grad(expected, inputs + list(theirs.parameters()), grad)
    for a, e in zip(got, want):
        assert_close(a, e, atol=5e-5, rtol=5e-5)


def test_multihead_attention_unbatched():
    fresh_seed()
    ours, theirs = _mha_pair(16, 2)
    x = torch.randn(5, 16)
    assert_close(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0], atol=2e-5, rtol=2e-5)
    out, weights = ours(x, x, x, need_weights=True)
    expected, expected_weights = theirs(x, x, x, need_weights=True)
    assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert_close(weights, expected_weights, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("masks", ["none", "key-padding+bool", "float-3d"])
def test_multihead_attention_need_weights(masks, average):
    fresh_seed()
    b, n, embed, heads = 3, 7, 32, 4
    ours, theirs = _mha_pair(embed, heads)
    x = torch.randn(b, n, embed, requires_grad=True)
    kwargs = {}
    if masks == "key-padding+bool":
        pad = torch.zeros(b, n, dtype=torch.bool)
        pad[0, -2:] = True
        kwargs = dict(key_padding_mask=pad, attn_mask=torch.ones(n, n, dtype=torch.bool).triu(1))
    elif masks == "float-3d":
        kwargs = dict(attn_mask=torch.randn(b * heads, n, n))
    out, weights = ours(x, x, x, need_weights=True, average_attn_weights=average, **kwargs)
    expected, expected_weights = theirs(x, x, x, need_weights=True, average_attn_weights=average, **kwargs)
    assert weights.shape == expected_weights.shape == ((b, n, n) if average else (b, heads, n, n))
    assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert_close(weights, expected_weights, atol=2e-6, rtol=2e-5)
    got = torch.autograd.grad((out.square().sum() + weights.sum()), [x, *ours.parameters()])
    want = torch.autograd.grad((expected.square().sum() + expected_weights.sum()), [x, *theirs.parameters()])
    for a, e in zip(got, want):
        assert_close(a, e, atol=5e-5, rtol=5e-5)
    # the fused path (need_weights=False) gives the same output
    assert_close(ours(x, x, x, need_weights=False, **kwargs)[0], expected, atol=2e-5, rtol=2e-5)


def _compare_outputs_and_grads(ours, theirs, inputs, call):
    """``call(module, *inputs)`` -> (out, weights-or-None) on both modules: outputs, weights and
    the gradients of inputs and parameters match."""
    mine = [t.detach().clone().requires_grad_() for t in inputs]
    reference = [t.detach().clone().requires_grad_() for t in inputs]
    out, weights = call(ours, *mine)
    expected, expected_weights = call(theirs, *reference)
    assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert (weights is None) == (expected_weights is None)
    loss = out.square().sum() + (0 if weights is None else weights.square().sum())
    expected_loss = expected.square().sum() + (0 if expected_weights is None else expected_weights.square().sum())
    if weights is not None:
        assert_close(weights, expected_weights, atol=2e-6, rtol=2e-5)
    got = torch.autograd.grad(loss, mine + list(ours.parameters()))
    want = torch.autograd.grad(expected_loss, reference + list(theirs.parameters()))
    for a, e in zip(got, want):
        assert_close(a, e, atol=5e-5, rtol=5e-5)


def test_multihead_attention_torch_defaults():
    """Constructed and called with torch's defaults: sequence-first inputs, weights returned."""
    import fastdl.nn

    fresh_seed()
    theirs = torch.nn.MultiheadAttention(32, 4)
    ours = fastdl.nn.MultiheadAttention(32, 4)
    assert not ours.batch_first
    with torch.no_grad():
        theirs.in_proj_bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(11, 3, 32)  # [N, B, E]
    _compare_outputs_and_grads(ours, theirs, [x], lambda m, x: m(x, x, x))


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("extra", ["bias_kv", "zero_attn", "both"])
def test_multihead_attention_extra_keys(extra, batch_first, need_weights):
    """``add_bias_kv`` and ``add_zero_attn``, with a key-padding mask and an attention mask that
    must be widened for the added keys."""
    import fastdl.nn

    fresh_seed()
    kwargs = dict(
        add_bias_kv=extra in ("bias_kv", "both"), add_zero_attn=extra in ("zero_attn", "both"), batch_first=batch_first
    )
    theirs = torch.nn.MultiheadAttention(24, 3, kdim=16, vdim=20, **kwargs)
    ours = fastdl.nn.MultiheadAttention(24, 3, kdim=16, vdim=20, **kwargs)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    b, nq, nk = 2, 5, 7
    shape = (lambda n, e: (b, n, e)) if batch_first else (lambda n, e: (n, b, e))
    query, key, value = torch.randn(shape(nq, 24)), torch.randn(shape(nk, 16)), torch.randn(shape(nk, 20))
    pad = torch.zeros(b, nk)  # floating, like attn_mask (torch deprecates mixing the two)
    pad[1, -2:] = -math.inf
    mask = torch.randn(b * 3, nq, nk)
    _compare_outputs_and_grads(
        ours,
        theirs,
        [query, key, value],
        lambda m, q, k, v: m(q, k, v, key_padding_mask=pad, attn_mask=mask, need_weights=need_weights),
    )


def test_multihead_attention_swapped_into_transformer_layer():
    """Swapped into ``nn.TransformerEncoderLayer`` in place of its ``self_attn`` with the same
    state_dict, the layer's outputs and gradients are unchanged (default, sequence-first layout)."""
    import copy

    import fastdl.nn

    fresh_seed()
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0)
    swapped = copy.deepcopy(layer)
    swapped.self_attn = fastdl.nn.MultiheadAttention(32, 4, dropout=0.0)
    swapped.self_attn.load_state_dict(layer.self_attn.state_dict())
    x = torch.randn(9, 2, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, -3:] = True
    _compare_outputs_and_grads(swapped, layer, [x], lambda m, x: (m(x, src_key_padding_mask=pad), None))


def test_functional_sdpa_matches_torch():
    import fastdl.nn.functional as FA

    fresh_seed()
    q, k, v = make_qkv(2, 4, 4, 10, 12, 16)
    mask = torch.rand(10, 12) > 0.3
    mask[:, 0] = True
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(FA.scaled_dot_product_attention(q, k, v, attn_mask=mask), expected)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2)
    assert_close(FA.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2), expected)
