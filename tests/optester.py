"""``OpTester``: the tests every fastdl op needs, generated from what the op supplies.

How to add an op's tester (in ``tests/test_<op>.py``)::

    class TestRoiPool(OpTester):          # the name must start with "Test" for pytest to collect it
        op = torch.ops.fastdl.roi_pool.default   # the composite is found from the overload's name
        differentiable = (0,)                    # gradcheck differentiates args[0]; () for none
        autocast_dtype = torch.bfloat16          # the output's dtype under CPU bfloat16 autocast

        def samples(self):                       # every case, each with a unique name
            for dtype in (torch.float32, torch.float64):
                yield Sample((x, rois, 1.0, 3, 2), name=f"{dtype}-...")

        def reference(self, x, rois, scale, ph, pw):   # plain PyTorch / Python, in float64
            ...

        def bad_inputs(self):                    # (args, kwargs, exception type, message regex)
            return [((x[0], rois, 1.0, 2, 2), {}, RuntimeError, "4-D tensor")]

From those the base generates, for each implementation (``native``: ``op``; ``composite``: the
plain-PyTorch composite of ``fastdl.ops._library``, when the op has one):

* ``test_matches_reference``: every sample against ``reference`` (``assert_matches``, with the
  per-dtype tolerance of ``harness.TOLERANCE`` and the overrides of ``tolerance``);
* ``test_gradcheck``: ``torch.autograd.gradcheck`` (and ``gradgradcheck`` if ``gradgradcheck``)
  over ``gradcheck_samples()``, by default the small float64 samples, when ``differentiable``;
* ``test_bad_input``: each of ``bad_inputs()`` raises its exception with its message;

and, for the op itself:

* ``test_opcheck``: ``torch.library.opcheck`` over ``opcheck_samples()``, by default every sample
  (only when ``op`` is a ``torch.ops`` overload: plain Python functions such as the box utilities
  have no schema);
* ``test_torch_compile``: ``torch.compile(fullgraph=True)`` against eager, forward and backward,
  on ``compile_sample()`` (the first float32 CPU sample unless overridden);
* ``test_autocast``: under CPU bfloat16 autocast ``autocast_sample()`` runs, its first output
  (and any other floating one) has dtype ``autocast_dtype``, or every output the dtype
  ``autocast_output_dtypes`` gives it, and the first matches the reference (when
  ``autocast_dtype`` is set).

A bug the tests find in the native op that cannot be fixed at once goes into ``known_failures``:
those cases run as strict xfails, so that they pass again, loudly, once it is fixed.

Samples are drawn inside each test after ``harness.fresh_seed()``: collection only reads their
names, so a test's inputs depend on its id (and ``--seed``) alone and a failure reproduces on
rerun. ``samples()`` must therefore yield the same names, in the same order, on every call.
Cases that do not fit (CUDA-only ones, modules, regressions) stay plain test functions next to
the tester class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import pytest
import torch

from fastdl.ops import _library
from harness import assert_close, check_compiled, fresh_seed, run_opcheck


@dataclasses.dataclass
class Sample:
    """One call of the op: ``op(*args, **kwargs)``; ``name`` is the test id's suffix."""

    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    name: str = ""

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [a for a in (*self.args, *self.kwargs.values()) if torch.is_tensor(a)]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the tolerance is chosen for: the first floating tensor's (else the first's)."""
        tensors = self.tensors
        return next((t.dtype for t in tensors if t.is_floating_point()), tensors[0].dtype)

    @property
    def device(self) -> str:
        return self.tensors[0].device.type


def as_tuple(result) -> tuple:
    """An op's outputs as a tuple, whether it returns one tensor or several."""
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def assert_output(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, **tolerance) -> None:
    """A floating output within ``dtype``'s tolerance of the reference's; any other exactly equal."""
    if got.is_floating_point():
        assert_close(got, want, dtype, **tolerance)
    else:
        assert torch.equal(got.cpu(), want.cpu())


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``, for sample names."""
    return str(dtype).removeprefix("torch.")


class OpTester:
    """Base of an op's test class; see the module docstring for what a subclass supplies."""

    op: Callable
    # the plain-PyTorch composite; filled in from ``op``'s name when ``op`` is a torch.ops overload
    composite: Callable | None = None
    differentiable: tuple[int, ...] = ()
    gradgradcheck = False
    autocast_dtype: torch.dtype | None = None
    # every output's dtype under autocast, where the others are not all autocast_dtype (an op that
    # keeps a float32 log-sum-exp beside a lower-precision result)
    autocast_output_dtypes: tuple[torch.dtype, ...] = ()
    # {(test name, sample name): reason}: bugs of the native op not fixed yet, run as strict xfails
    known_failures: dict[tuple[str, str], str] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        op = cls.__dict__.get("op")
        if op is None:  # a base shared by several testers
            return
        if isinstance(op, torch._ops.OpOverload):
            if "composite" not in cls.__dict__:
                cls.composite = staticmethod(_library.composite(op._schema.name.split("::", 1)[1]))
        else:
            # a plain function stored on the class would otherwise be bound as a method
            cls.op = staticmethod(op)

    # ---- what a subclass supplies -------------------------------------------------------------

    def samples(self) -> Iterable[Sample]:
        raise NotImplementedError

    def reference(self, *args, **kwargs):
        raise NotImplementedError

    def bad_inputs(self) -> list[tuple[tuple, dict, type, str]]:
        return []

    def tolerance(self, sample: Sample) -> dict:
        """Overrides of ``harness.TOLERANCE[sample.dtype]`` for ``sample``."""
        return {}

    def assert_matches(self, sample: Sample, result, expected) -> None:
        """``result`` (the op's output) agrees with ``expected`` (the reference's), output by output."""
        results, expecteds = as_tuple(result), as_tuple(expected)
        assert len(results) == len(expecteds), f"{len(results)} outputs, the reference gives {len(expecteds)}"
        for got, want in zip(results, expecteds):
            assert_output(got, want, sample.dtype, **self.tolerance(sample))

    def gradcheck_samples(self) -> Iterable[Sample]:
        """The float64 samples with at most 500 elements to differentiate (none if the op is not
        differentiable)."""
        if not self.differentiable:
            return
        for sample in self.samples():
            inputs = [sample.args[i] for i in self.differentiable if torch.is_tensor(sample.args[i])]
            if sample.dtype == torch.float64 and sum(t.numel() for t in inputs) <= 500:
                yield sample

    def opcheck_samples(self) -> Iterable[Sample]:
        """Every sample; an op whose samples are many or large checks a few small ones instead."""
        return self.samples()

    def compile_sample(self) -> Sample:
        return next(s for s in self.samples() if s.dtype == torch.float32 and s.device == "cpu")

    def autocast_sample(self) -> Sample:
        return self.compile_sample()

    # ---- collection ---------------------------------------------------------------------------

    def pytest_generate_tests(self, metafunc):
        """Parametrise by names only; the tests draw the inputs after seeding."""
        test, fixtures = metafunc.function.__name__, metafunc.fixturenames
        impls = ["native"] + (["composite"] if self.composite is not None else [])
        if "bad_input" in fixtures:
            metafunc.parametrize("impl", impls)
            messages = [message for *_, message in self.bad_inputs()]
            metafunc.parametrize("bad_input", range(len(messages)), ids=messages)
        elif "sample_name" in fixtures:
            names = [s.name for s in self._samples_for(test)()]
            assert len(set(names)) == len(names), f"{type(self).__name__}: sample names repeat"
            argnames = ["impl", "sample_name"] if "impl" in fixtures else ["sample_name"]
            if not names:  # one skipped test that says why, rather than pytest's "empty parameter set"
                skip = pytest.mark.skip(reason=self._why_no_samples(test))
                metafunc.parametrize(argnames, [pytest.param(*[""] * len(argnames), marks=skip, id="none")])
                return
            impls_here = impls if "impl" in fixtures else [None]
            cases = [self._case(test, impl, name) for impl in impls_here for name in names]
            metafunc.parametrize(argnames, cases)

    def _case(self, test: str, impl: str | None, name: str):
        """One parameter set; a known failure of the native op is a strict xfail (its fix shows up)."""
        values = (name,) if impl is None else (impl, name)
        reason = self.known_failures.get((test, name)) if impl in (None, "native") else None
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        return pytest.param(*values, marks=marks, id="-".join(values))

    def _samples_for(self, test: str) -> Callable[[], Iterable[Sample]]:
        if test == "test_gradcheck":
            return self.gradcheck_samples
        if test == "test_opcheck":
            return self.opcheck_samples if isinstance(self.op, torch._ops.OpOverload) else lambda: ()
        return self.samples

    def _why_no_samples(self, test: str) -> str:
        if test == "test_gradcheck":
            return "not differentiable" if not self.differentiable else "no float64 sample small enough"
        if test == "test_opcheck" and not isinstance(self.op, torch._ops.OpOverload):
            return "a plain Python function: no operator schema to check"
        return "no samples"

    def implementation(self, impl: str) -> Callable:
        return self.op if impl == "native" else self.composite

    def _sample(self, test: str, name: str) -> Sample:
        return next(s for s in self._samples_for(test)() if s.name == name)

    # ---- the generated tests ------------------------------------------------------------------

    def test_matches_reference(self, impl, sample_name):
        fresh_seed()
        sample = self._sample("test_matches_reference", sample_name)
        result = self.implementation(impl)(*sample.args, **sample.kwargs)
        self.assert_matches(sample, result, self.reference(*sample.args, **sample.kwargs))

    def test_gradcheck(self, impl, sample_name):
        fresh_seed()
        sample = self._sample("test_gradcheck", sample_name)
        args = list(sample.args)
        positions = [i for i in self.differentiable if torch.is_tensor(args[i])]
        fn = self.implementation(impl)

        def differentiated(*inputs):
            for i, t in zip(positions, inputs):
                args[i] = t
            return fn(*args, **sample.kwargs)

        inputs = tuple(args[i].detach().requires_grad_() for i in positions)
        assert torch.autograd.gradcheck(differentiated, inputs)
        if self.gradgradcheck:
            assert torch.autograd.gradgradcheck(differentiated, inputs)

    def test_opcheck(self, sample_name):
        fresh_seed()
        sample = self._sample("test_opcheck", sample_name)
        run_opcheck(self.op, self._with_grad(sample), sample.kwargs)

    def test_torch_compile(self):
        fresh_seed()
        sample = self.compile_sample()
        # every tester compiles the same code object below: without a reset, the testers after the
        # first eight would hit dynamo's recompile limit
        torch._dynamo.reset()

        def outputs(*args):
            results = as_tuple(self.op(*args, **sample.kwargs))
            if not self.differentiable:
                return results
            # one tensor of every floating output, for check_compiled to differentiate
            return torch.cat([r.flatten() for r in results if r.is_floating_point()])

        check_compiled(outputs, *self._with_grad(sample), grad=bool(self.differentiable))

    def test_autocast(self):
        if self.autocast_dtype is None:
            pytest.skip("no autocast rule")
        fresh_seed()
        sample = self.autocast_sample()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results = as_tuple(self.op(*sample.args, **sample.kwargs))
        first, expected = results[0], as_tuple(self.reference(*sample.args, **sample.kwargs))[0]
        assert first.dtype == self.autocast_dtype
        if self.autocast_output_dtypes:
            assert tuple(r.dtype for r in results) == self.autocast_output_dtypes
        else:
            for r in results[1:]:
                assert not r.is_floating_point() or r.dtype == self.autocast_dtype, r.dtype
        assert_output(first, expected, self.autocast_dtype)

    def test_bad_input(self, impl, bad_input):
        fresh_seed()
        args, kwargs, error, message = self.bad_inputs()[bad_input]
        with pytest.raises(error, match=message):
            self.implementation(impl)(*args, **kwargs)

    def _with_grad(self, sample: Sample) -> tuple[Any, ...]:
        """``sample.args`` with the differentiable floating tensors requiring grad."""

        def wants_grad(i, a):
            return i in self.differentiable and torch.is_tensor(a) and a.is_floating_point()

        return tuple(a.detach().requires_grad_() if wants_grad(i, a) else a for i, a in enumerate(sample.args))
