"""fastdl train gpt: the command line end to end, exact resume, gradient accumulation against
one large batch and against plain PyTorch, the learning-rate schedule, the weight-decay groups,
convergence on the pydoc corpus, two-process DDP against one process, and the error messages.
Every run but the convergence one is a few steps of a tiny byte-level model."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdl.data import text
from fastdl.data.tokenizer import ByteTokenizer
from fastdl.models.gpt2 import GPT, GPTConfig
from fastdl.train import gpt, gpt_cli
from fastdl.train.distributed import Context
from fastdl.train.gpt import GPTTrainConfig, fit_gpt, learning_rate, parameter_groups
from fastdl.train.progress import TextBar

# Under an emulated CPU (.ci/emulated-cpus) a child process must run in the same emulator.
LAUNCHER = os.environ.get("FASTDL_TEST_LAUNCHER", "").split()

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# 6 steps of 4 windows of 32 bytes, evaluated (and saved) every 3 steps, with dropout so that
# an exact resume needs torch's random state too
SMALL = dict(
    data="pydoc",
    config="bytes-tiny",
    block_size=32,
    batch_size=4,
    max_steps=6,
    lr=3e-3,
    warmup_steps=2,
    dropout=0.1,
    eval_interval=3,
    eval_steps=2,
    sample_interval=3,
    sample_tokens=12,
    progress=False,
)


def small_args(out, **changes) -> list[str]:
    settings = {**SMALL, "out": str(out), **changes}
    args = []
    for name, value in settings.items():
        if name == "progress":
            args += [] if value else ["--no-progress"]
        elif value is True:
            args.append(gpt_cli.flag(name))
        elif value is not False:
            args += [gpt_cli.flag(name), str(value)]
    return args


def run_cli(args: list[str]) -> int:
    parser = gpt_cli.build_parser("fastdl train gpt")
    return gpt_cli.run(parser.parse_args(args), prog=parser.prog)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Six steps in one run: the reference of the resume test."""
    out = tmp_path_factory.mktemp("straight")
    result = fit_gpt(GPTTrainConfig(**SMALL, out=str(out)))
    return result, torch.load(out / "last.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
# The command line and resume


def test_cli_writes_the_files_then_resumes_exactly(straight, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    train_step = gpt._Run.train_step

    def dies_after_three(run):
        if run.step == 3:
            raise KeyboardInterrupt  # killed after the checkpoint of step 3
        return train_step(run)

    monkeypatch.setattr(gpt._Run, "train_step", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_cli(small_args(out))
    printed = capsys.readouterr().out
    assert "step 0/6  val loss" in printed and "step 3/6  val loss" in printed and "sample at step 3" in printed
    assert {p.name for p in out.iterdir()} >= {"last.pt", "best.pt", "metrics.json", "curves.png", "samples.txt"}
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 3

    monkeypatch.setattr(gpt._Run, "train_step", train_step)
    torch.rand(5), np.random.rand()  # what runs between the two must not matter
    assert run_cli(small_args(out, resume=True)) == 0
    printed = capsys.readouterr().out
    assert "resumed" in printed and "step 6/6" in printed and "step 3/6" not in printed

    # the interrupted run equals the straight one: bit for bit the same losses, weights and samples
    reference, reference_last = straight
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step_losses"] == reference.step_losses and len(reference.step_losses) == 6
    assert [e["step"] for e in metrics["evals"]] == [0, 3, 6]
    assert [e["val_loss"] for e in metrics["evals"]] == [e["val_loss"] for e in reference.evals]
    assert metrics["samples"] == reference.samples and [s["step"] for s in reference.samples] == [3, 6]
    last = torch.load(out / "last.pt", weights_only=True)
    assert_same_weights(last["model"], reference_last["model"])
    for state, expected in zip(last["optimizer"]["state"].values(), reference_last["optimizer"]["state"].values()):
        assert torch.equal(state["exp_avg_sq"], expected["exp_avg_sq"])
    assert (out / "samples.txt").read_text(encoding="utf-8").count("=== step") == 2

    # the recorded numbers are what they claim: the learning rates of the schedule, the tokens
    # per step, and best.pt's validation loss recomputed from its weights
    assert metrics["step_lrs"] == [learning_rate(s, 3e-3, 6e-5, 2, 6) for s in range(6)]
    assert metrics["tokens_per_step"] == 4 * 32 and metrics["evals"][-1]["tokens"] == 6 * 4 * 32
    assert all(np.isfinite(metrics["step_grad_norms"]))
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["step"] == metrics["best_step"] and best["val_loss"] == metrics["best_val_loss"]
    model = GPT(GPTConfig(**best["model_config"]))
    model.load_state_dict(best["model"])
    model.eval()
    val = text.split_tokens(text.load_corpus("pydoc", ByteTokenizer()).tokens, 0.1)[1]
    windows = text.evaluation_windows(val, 32, 2 * 4)
    with torch.no_grad():
        logits, _ = model(windows[:, :-1])
    recomputed = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert recomputed == pytest.approx(best["val_loss"], rel=1e-5)


def test_seed_fixes_the_run(straight, tmp_path):
    reference, _ = straight
    again = fit_gpt(GPTTrainConfig(**{**SMALL, "max_steps": 2}, out=str(tmp_path / "same")))
    assert again.step_losses[0] == reference.step_losses[0]  # warmup: independent of the length
    other = fit_gpt(GPTTrainConfig(**{**SMALL, "max_steps": 1}, seed=1, out=str(tmp_path / "other")))
    assert other.step_losses[0] != reference.step_losses[0]


def test_init_starts_from_a_hugging_face_folder(straight, tmp_path):
    """--init reads the folder save_pretrained wrote: the run's untrained validation loss is that
    of the saved weights, and the run's context may be shorter than the model's."""
    reference, _ = straight
    folder = tmp_path / "hf"
    reference.model.save_pretrained(folder)  # trained 6 steps, n_ctx 32
    result = fit_gpt(
        GPTTrainConfig(
            **{**SMALL, "max_steps": 1, "block_size": 16, "sample_interval": 0},
            init=str(folder),
            out=str(tmp_path / "run"),
        )
    )
    assert result.model.config.n_ctx == 32 and result.model.config.dropout == 0.1
    val = text.split_tokens(text.load_corpus("pydoc", ByteTokenizer()).tokens, 0.1)[1]
    windows = text.evaluation_windows(val, 16, 2 * 4)
    reference.model.eval()
    with torch.no_grad():
        _, expected = reference.model(windows[:, :-1], windows[:, 1:])
    assert result.evals[0]["val_loss"] == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The step: accumulation, the schedule, the groups


def make_run(tmp_path, **changes) -> gpt._Run:
    config = GPTTrainConfig(**{**SMALL, "dropout": 0.0, "out": str(tmp_path), **changes})
    return gpt._Run(config, config.check(), torch.device("cpu"), Context())


def gradients(model) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_grad_accumulation_equals_one_large_batch_and_plain_pytorch(tmp_path):
    """2 micro-batches of 4 windows and 1 batch of 8 read the same 8 windows: the same loss and
    gradient, and both those of F.cross_entropy on the full logits."""
    big = make_run(tmp_path / "big", batch_size=8, grad_accum=1, grad_clip=0.0)
    accumulated = make_run(tmp_path / "accumulated", batch_size=4, grad_accum=2, grad_clip=0.0)
    reference = copy.deepcopy(big.net)
    state = big.windows.state_dict()
    windows = big.windows.next_batch()
    big.windows.load_state_dict(state)

    big_loss, big_norm = big.train_step()
    accumulated_loss, accumulated_norm = accumulated.train_step()

    logits, _ = reference(windows[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    loss.backward()
    expected = gradients(reference)
    assert big_loss == pytest.approx(loss.item(), rel=1e-5)
    assert accumulated_loss == pytest.approx(loss.item(), rel=1e-5)
    for run in (big, accumulated):
        for name, grad in gradients(run.net).items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected.values()])).item()
    assert big_norm == pytest.approx(norm, rel=1e-4) and accumulated_norm == pytest.approx(norm, rel=1e-4)


def test_gradient_clipping_caps_the_norm(tmp_path):
    run = make_run(tmp_path, grad_clip=0.05)
    _, norm = run.train_step()
    assert norm > 0.05  # the norm before clipping is recorded...
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in run.net.parameters()])).item()
    assert clipped == pytest.approx(0.05, rel=1e-4)  # ...and the step used the clipped one


def test_learning_rate_schedule():
    lr, low = 1e-3, 1e-4
    values = [learning_rate(step, lr, low, 10, 110) for step in range(110)]
    assert values[0] == pytest.approx(lr / 10) and values[4] == pytest.approx(lr / 2)
    assert values[9] == pytest.approx(lr) and values[10] == pytest.approx(lr)  # warmup ends at the peak
    assert values[60] == pytest.approx((lr + low) / 2)  # half way through the cosine
    expected = [low + 0.5 * (lr - low) * (1 + math.cos(math.pi * (s - 10) / 100)) for s in range(10, 110)]
    assert values[10:] == pytest.approx(expected)
    assert all(a >= b for a, b in zip(values[10:], values[11:])) and values[-1] > low
    assert learning_rate(110, lr, low, 10, 110) == pytest.approx(low)
    assert learning_rate(0, lr, low, 0, 5) == pytest.approx(lr)  # no warmup: the peak at once
    assert learning_rate(500, lr, low, 10, 110) == pytest.approx(low)  # past the end (a longer resumed run)


def test_epochs_set_the_length_from_the_windows(tmp_path):
    run = make_run(tmp_path, max_steps=None, epochs=2, batch_size=8, grad_accum=3, block_size=64)
    # the training split's 419,576 bytes make 6,554 windows of 64 + 1: 819 batches of 8 an epoch
    assert run.windows.batches_per_epoch == (419_576 - 64) // 64 // 8 == 819
    assert run.max_steps == 2 * 819 // 3
    assert make_run(tmp_path, max_steps=None).max_steps == gpt_cli.DEFAULT_MAX_STEPS


def test_progress_bar_counts_tokens_without_an_accuracy():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = TextBar(2, "steps 1-2", stream, unit="tok")
    bar.update(128, 5.5)
    bar.update(128, 5.25)
    bar.close()
    drawn = stream.getvalue().split("\r")
    assert any(
        line.startswith("steps 1-2 [########################] 2/2  loss 5.2500  ")
        and " tok/s  ETA 0:00" in line
        and "acc" not in line
        for line in drawn
    ), drawn


def test_weight_decay_groups_follow_nanogpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("bytes-tiny"))
    decay, no_decay = parameter_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): name for name, p in model.named_parameters()}  # the tied head under wte's name
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert {
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.3.mlp.c_proj.weight",
    } <= decayed
    assert all(model.get_parameter(n).dim() >= 2 for n in decayed)
    assert all(n.endswith(".bias") or ".ln_" in n for n in kept) and "transformer.ln_f.weight" in kept
    assert all(model.get_parameter(n).dim() == 1 for n in kept)


# ---------------------------------------------------------------------------------------------
# Convergence


def test_tiny_byte_model_learns_the_pydoc_corpus(tmp_path):
    """From ln(257) = 5.55 nats per byte at the start to below 2.5 in 160 steps of 1,024 bytes
    (measured: 2.29 and 2.35 with seeds 0 and 1; a model of byte frequencies alone stays near 3.1)."""
    result = fit_gpt(
        GPTTrainConfig(
            data="pydoc",
            config="bytes-tiny",
            block_size=128,
            batch_size=8,
            max_steps=160,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=10,
            eval_interval=160,
            eval_steps=4,
            sample_interval=0,
            out=str(tmp_path),
            progress=False,
        )
    )
    first, last = result.evals[0]["val_loss"], result.evals[-1]["val_loss"]
    assert 5.0 < first < 5.8
    assert last < 2.5, [e["val_loss"] for e in result.evals]


# ---------------------------------------------------------------------------------------------
# Distributed


def test_two_process_ddp_equals_one_process(tmp_path):
    """torchrun with 2 CPU processes (Gloo) against one process: micro-batches of 5 windows
    split 3 + 2, accumulated twice per step, so both the uneven shares' weighting and DDP's
    skipped all-reduce on the first micro-batch are exercised."""
    settings = {
        **SMALL,
        "batch_size": 5,
        "grad_accum": 2,
        "max_steps": 3,
        "dropout": 0.0,
        "sample_interval": 0,
        "device": "cpu",
    }
    single = fit_gpt(GPTTrainConfig(**settings, out=str(tmp_path / "single")))
    out = tmp_path / "ddp"
    command = [
        *LAUNCHER,
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "fastdl.train.gpt_cli",
        *small_args(out, **settings),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("step 3/3") == 1, done.stdout  # only rank 0 prints
    assert "2 processes" in done.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    np.testing.assert_allclose(metrics["step_losses"], single.step_losses, rtol=1e-5)
    np.testing.assert_allclose(
        [e["val_loss"] for e in metrics["evals"]], [e["val_loss"] for e in single.evals], rtol=1e-5
    )
    np.testing.assert_allclose(metrics["step_grad_norms"], single.step_grad_norms, rtol=1e-4)
    # Adam divides by the root of the squared gradients, so a near-zero gradient's rounding
    # difference moves its weight by up to about lr * 2e-2: a few of the 0.8M differ by ~1e-4
    weights = torch.load(out / "last.pt", weights_only=True)["model"]
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(weights[key], value, rtol=1e-3, atol=2e-4, msg=key)


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "books"], r"--data books: expected text=PATH \(a UTF-8 file or a folder of them\) or pydoc"),
        (["--data", "text=/no/such/file"], r"--data text=/no/such/file: the path '/no/such/file' does not exist"),
        (["--tokenizer", "sentencepiece"], r"--tokenizer: unknown tokenizer 'sentencepiece'; expected bytes or gpt2"),
        (["--max-steps", "5", "--epochs", "1"], r"--max-steps 5 and --epochs 1: give one of them, not both"),
        (["--block-size", "0"], r"--block-size: must be a positive integer, got 0"),
        (["--lr", "1e-4", "--min-lr", "1e-3"], r"--min-lr: must be at most --lr 0.0001, got 0.001"),
        (["--beta2", "1"], r"--beta2: must lie in \[0, 1\), got 1.0"),
        (["--grad-clip", "nan"], r"--grad-clip: must be a finite number >= 0, got nan"),
        (["--device", "tpu"], r"--device: unknown device 'tpu'; expected one of auto"),
        (["--resume", "--out", "/no/such/run"], r"--resume: no checkpoint '/no/such/run/last.pt'"),
    ],
)
def test_bad_settings_fail_before_torch_is_imported(args, message):
    """Checked in a fresh interpreter: the error comes before torch is imported."""
    program = (
        "import sys; from fastdl.train import gpt_cli\n"
        "code = gpt_cli.run(gpt_cli.build_parser().parse_args(sys.argv[1:]), prog='fastdl train gpt')\n"
        "assert 'torch' not in sys.modules\n"
        "sys.exit(code)"
    )
    done = subprocess.run([*LAUNCHER, sys.executable, "-c", program, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("fastdl train gpt: error: ")
    assert re.search(message, done.stderr), done.stderr


def test_errors_found_while_loading(tmp_path, capsys, straight):
    short = tmp_path / "short.txt"
    short.write_text("only a few bytes", encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    cases = [
        (
            ["--data", f"text={short}", "--block-size", "32"],
            f"--data text={short} with --block-size 32 and --batch-size 4: the training split has 15 tokens, fewer "
            "than one window of block_size + 1 = 33; lower them or use a longer text",
        ),
        (["--data", f"text={empty}"], f"--data text={empty}: {empty}: the corpus is empty"),
        (["--config", "gpt5"], "--config gpt5: unknown GPT preset 'gpt5'; presets: gpt2, gpt2-medium"),
        (["--init", str(tmp_path)], f"--init {tmp_path}: {tmp_path} is not a Hugging Face model folder"),
    ]
    for changes, message in cases:
        args = small_args(tmp_path / "out", max_steps=1) + changes
        assert run_cli(args) == 2, changes
        error = capsys.readouterr().err
        assert f"fastdl train gpt: error: {message}" in error, error

    # resuming with settings that change the trajectory, or with nothing left to train
    _, last = straight
    saved = tmp_path / "saved"
    saved.mkdir()
    torch.save(last, saved / "last.pt")
    assert run_cli(small_args(saved, resume=True, lr=1e-3)) == 2
    error = capsys.readouterr().err
    assert "saved/last.pt was trained with other settings (--lr 0.003 -> 0.001)" in error, error
    assert run_cli(small_args(saved, resume=True)) == 2
    assert "has already trained 6 of 6 steps; raise --max-steps" in capsys.readouterr().err
