"""Property-based fuzzing of every op, each case isolated in a child process.

Hypothesis draws cases (plain dicts, see tests/fuzz_cases.py): valid ones, which must equal the
op's reference, and valid ones with one argument broken, which must raise an error whose
message names that argument. A child process runs the cases; one that crashes it or hangs
fails with its case printed, and the child is restarted for the next.

Profiles: the quick one (CI) draws ``FASTDL_FUZZ_EXAMPLES`` cases per test (default 20) from a
fixed seed; a release check runs e.g. ``FASTDL_FUZZ_EXAMPLES=2000 python -m pytest
tests/test_fuzz.py`` (about an hour on two cores), which with ``FASTDL_FUZZ_RANDOM=1`` also
draws new cases every run.
"""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_cases

EXAMPLES = int(os.environ.get("FASTDL_FUZZ_EXAMPLES", "20"))
CASE_TIMEOUT_S = 60.0  # the first case also pays for the child's start-up

fuzz_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("FASTDL_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)


class IsolatedRunner:
    """Runs cases in a spawned child; reports a crash or hang as an outcome, then restarts it."""

    def __init__(self):
        self._context = multiprocessing.get_context("spawn")
        self._start()

    def _start(self):
        self._connection, child_end = self._context.Pipe()
        self._process = self._context.Process(target=fuzz_cases.serve, args=(child_end,), daemon=True)
        self._process.start()
        child_end.close()

    def __call__(self, case) -> tuple[str, str]:
        self._connection.send(case)
        hung = False
        try:
            if self._connection.poll(CASE_TIMEOUT_S):
                return self._connection.recv()
            hung = True
        except (EOFError, ConnectionResetError):  # the child died: its end of the pipe closed
            pass
        self._process.kill()
        self._process.join()
        outcome = (
            ("hang", f"no answer in {CASE_TIMEOUT_S:.0f} s")
            if hung
            else ("crash", f"exit code {self._process.exitcode}")
        )
        self._start()
        return outcome

    def close(self):
        if self._process.is_alive():
            self._connection.send(None)
            self._process.join(10)
        self._process.kill()


@pytest.fixture(scope="module")
def runner():
    r = IsolatedRunner()
    yield r
    r.close()


def check_valid(runner, case):
    outcome, details = runner(case)
    assert outcome == "ok", f"{outcome}: {details}\ncase: {case}"


def check_invalid(runner, case):
    outcome, details = runner(case)
    assert outcome == "error", f"expected an error naming {case['expect']!r}, got {outcome}: {details}\ncase: {case}"
    assert case["expect"].lower() in details.lower(), (
        f"the message does not name {case['expect']!r}: {details}\ncase: {case}"
    )


# ---- strategies: valid cases per op, and the mutations that break one argument ----------------

seeds = st.integers(0, 2**31 - 1)
float_dtypes = st.sampled_from([torch.float32, torch.float64])
NAN, INF = float("nan"), float("inf")


@st.composite
def roi_cases(draw, op):
    dtype = draw(float_dtypes)
    case = dict(
        op=op,
        seed=draw(seeds),
        dtype=dtype,
        batch=draw(st.integers(1, 2)),
        channels=draw(st.integers(1, 4)),
        height=draw(st.integers(0, 10)),
        width=draw(st.integers(0, 10)),
        boxes=draw(st.integers(0, 5)),
        # huge boxes only in float64, where sample positions still mean something
        box_range=draw(st.sampled_from([4.0, 20.0, 1e3] + ([1e7, 1e19] if dtype == torch.float64 else []))),
        spatial_scale=draw(st.sampled_from([1.0, 0.5, 0.25])),
        output_size=(draw(st.integers(1, 4)), draw(st.integers(1, 4))),
        channels_last=draw(st.booleans()),
        expect=None,
    )
    if op == "roi_align":
        case.update(sampling_ratio=draw(st.sampled_from([-1, 0, 1, 2, 3])), aligned=draw(st.booleans()))
    return case


ROI_MUTATIONS = [
    (dict(spatial_scale=NAN), "spatial_scale"),
    (dict(spatial_scale=-1.0), "spatial_scale"),
    (dict(output_size=(0, 2)), "output_size"),
    (dict(poison_rois=[(0, 1, NAN)], boxes=2), "rois"),
    (dict(poison_rois=[(0, 3, INF)], boxes=2), "rois"),
    (dict(poison_rois=[(1, 0, 7.0)], boxes=2), "batch index"),
    (dict(poison_rois=[(0, 0, 0.5)], boxes=2), "batch index"),
]
ROI_ALIGN_MUTATIONS = ROI_MUTATIONS + [
    (dict(sampling_ratio=2**31), "sampling_ratio"),
    (dict(sampling_ratio=2**32 + 2), "sampling_ratio"),
]


def mutated(cases, mutations):
    return st.tuples(cases, st.sampled_from(mutations)).map(
        lambda pair: {**pair[0], **pair[1][0], "expect": pair[1][1]}
    )


@st.composite
def nms_cases(draw):
    dtype = draw(float_dtypes)
    return dict(
        op="nms",
        seed=draw(seeds),
        dtype=dtype,
        count=draw(st.integers(0, 40)),
        distinct_scores=draw(st.integers(1, 50)),
        coordinate_scale=draw(st.sampled_from([1.0, 1e-3, 1e20, 1e30] + ([1e200] if dtype == torch.float64 else []))),
        iou_threshold=draw(st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0])),
        batched=draw(st.booleans()),
        classes=draw(st.integers(1, 4)),
        expect=None,
    )


NMS_MUTATIONS = [
    (dict(iou_threshold=NAN), "iou_threshold"),
    (dict(iou_threshold=1.5), "iou_threshold"),
    (dict(score_threshold=NAN), "score_threshold"),
    (dict(poison_boxes=[(0, 0, NAN)], count=3), "boxes"),
    (dict(poison_boxes=[(0, 2, -1e9)], count=3), "x1 <= x2"),
    (dict(poison_scores=[(1, NAN)], count=3), "scores"),
]


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 2]))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    spans = [d * (k - 1) + 1 - 2 * p for d, k, p in zip(dilation, kernel, padding)]
    return dict(
        op="conv2d",
        seed=draw(seeds),
        dtype=draw(float_dtypes),
        batch=draw(st.integers(0, 2)),
        in_channels=groups * draw(st.integers(0 if groups == 1 else 1, 3)),
        out_channels=groups * draw(st.integers(1, 3)),
        height=max(spans[0], draw(st.integers(1, 9))),
        width=max(spans[1], draw(st.integers(1, 9))),
        kernel=kernel,
        stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        channels_last=draw(st.booleans()),
        expect=None,
    )


CONV_MUTATIONS = [
    (dict(padding=(2**62, 0)), "padd"),
    (dict(dilation=(2**62, 1), kernel=(3, 3)), "dilat"),
    (dict(stride=(0, 1)), "stride"),
    (dict(stride=1.5), "stride"),
    (dict(padding=(-1, 0)), "padding"),
    (dict(groups=0), "groups"),
    (dict(groups=4, in_channels=2), "groups"),
    (dict(height=1, width=1, kernel=(3, 3), padding=(0, 0), dilation=(1, 1)), "kernel"),
]


@st.composite
def attention_cases(draw):
    mask = draw(st.sampled_from([None, "bool", "float"]))
    case = dict(
        op="attention",
        seed=draw(seeds),
        dtype=draw(float_dtypes),
        batch=draw(st.integers(1, 2)),
        heads=draw(st.integers(1, 2)),
        queries=draw(st.integers(0, 70)),
        keys=draw(st.integers(0, 70)),
        head_dim=draw(st.sampled_from([8, 16, 32, 64])),
        causal=draw(st.booleans()),
        mask=mask,
        expect=None,
    )
    if draw(st.booleans()):  # NaN in, NaN out: the places must match the reference's
        case["poison"] = [(draw(st.sampled_from(["q", "k", "v"])), draw(st.integers(0, 10**6)), NAN)]
    if mask == "float" and draw(st.booleans()):
        special = st.sampled_from([NAN, INF, -INF, torch.finfo(case["dtype"]).min, torch.finfo(case["dtype"]).max])
        case["mask_values"] = draw(st.lists(st.tuples(st.integers(0, 10**6), special), max_size=4))
    return case


ATTENTION_MUTATIONS = [
    (dict(scale=NAN), "scale"),
    (dict(scale=INF), "scale"),
    (dict(head_dim=7), "head dim"),
]


@st.composite
def lstm_cases(draw):
    input_size = draw(st.integers(1, 6))
    return dict(
        op="lstm",
        seed=draw(seeds),
        input_size=input_size,
        feature_size=input_size,
        hidden=draw(st.integers(1, 6)),
        layers=draw(st.integers(1, 2)),
        batch=draw(st.integers(0, 3)),
        steps=draw(st.integers(1, 4)),
        batch_first=draw(st.booleans()),
        expect=None,
    )


@st.composite
def layer_norm_cases(draw):
    features = draw(st.integers(1, 40))
    return dict(
        op="layer_norm",
        seed=draw(seeds),
        dtype=draw(float_dtypes),
        rows=draw(st.integers(0, 5)),
        features=features,
        weight_size=features,
        eps=draw(st.sampled_from([1e-5, 0.0, 1e-2])),
        expect=None,
    )


@st.composite
def linear_cases(draw):
    features, outputs = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    return dict(
        op="linear",
        seed=draw(seeds),
        dtype=draw(float_dtypes),
        rows=draw(st.integers(0, 20)),
        features=features,
        outputs=outputs,
        weight_features=features,
        bias_size=draw(st.sampled_from([None, outputs])),
        expect=None,
    )


@st.composite
def lce_cases(draw):
    vocab = draw(st.integers(1, 40))
    return dict(
        op="linear_cross_entropy",
        seed=draw(seeds),
        rows=draw(st.integers(1, 8)),
        width=draw(st.integers(1, 16)),
        vocab=vocab,
        weight_rows=vocab,
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        expect=None,
    )


@st.composite
def box_cases(draw):
    return dict(
        op="boxes",
        seed=draw(seeds),
        dtype=draw(float_dtypes),
        count=draw(st.integers(0, 6)),
        size=(draw(st.integers(0, 60)), draw(st.integers(0, 60))),
        min_size=draw(st.sampled_from([0.0, 1.5, 10.0, INF])),
        expect=None,
    )


CASES = {
    "roi_align": (roi_cases("roi_align"), ROI_ALIGN_MUTATIONS),
    "roi_pool": (roi_cases("roi_pool"), ROI_MUTATIONS),
    "nms": (nms_cases(), NMS_MUTATIONS),
    "conv2d": (conv_cases(), CONV_MUTATIONS),
    "attention": (attention_cases(), ATTENTION_MUTATIONS),
    "lstm": (lstm_cases(), [(dict(feature_size=99), "input")]),
    "layer_norm": (
        layer_norm_cases(),
        [(dict(eps=NAN), "eps"), (dict(eps=-1.0), "eps"), (dict(weight_size=99), "weight")],
    ),
    "linear": (linear_cases(), [(dict(weight_features=99), "features"), (dict(bias_size=99), "bias")]),
    "linear_cross_entropy": (
        lce_cases(),
        [
            (dict(poison_target=[(0, 10**6)]), "target"),
            (dict(poison_target=[(0, -5)]), "target"),
            (dict(reduction="avg"), "reduction"),
        ],
    ),
    "boxes": (
        box_cases(),
        [(dict(size=(NAN, 4)), "size"), (dict(min_size=NAN), "min_size"), (dict(min_size=-1.0), "min_size")],
    ),
}


@pytest.mark.parametrize("op", sorted(CASES))
def test_valid_input_matches_reference(runner, op):
    @fuzz_settings
    @given(CASES[op][0])
    def check(case):
        check_valid(runner, case)

    check()


@pytest.mark.parametrize("op", sorted(CASES))
def test_invalid_input_names_the_argument(runner, op):
    valid, mutations = CASES[op]

    @fuzz_settings
    @given(mutated(valid, mutations))
    def check(case):
        check_invalid(runner, case)

    check()


def test_runner_reports_crashes(runner):
    """The isolation itself: a case that kills the child is reported, and the next one runs."""
    outcome, _ = runner({"op": "__crash__"})
    assert outcome == "crash"
    assert runner(dict(CASES_FOR_SELF_TEST))[0] == "ok"


CASES_FOR_SELF_TEST = dict(op="boxes", seed=0, dtype=torch.float32, count=3, size=(10, 10), min_size=1.0, expect=None)
