"""fastdl.models.gpt2 against Hugging Face transformers' GPT-2 (logits, losses, gradients, greedy
generation, checkpoints both ways), against itself without a KV cache, and against a plain-torch
GPT-2 (SDPA, F.layer_norm, F.cross_entropy) over a few AdamW steps; plus the classifier head,
sampling, and the ``fastdl generate`` command."""

from __future__ import annotations

import argparse
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from harness import fresh_seed

from fastdl import generate as generate_cli
from fastdl.benchmarks._reference_gpt import PlainGPT
from fastdl.models.gpt2 import GPT, GPTClassifier, GPTConfig, sample_next_token

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB, N_CTX, EMBD, LAYERS, HEADS = 101, 48, 64, 2, 4
EOT = VOCAB - 1


def tiny_config(**overrides) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=VOCAB, n_ctx=N_CTX, n_embd=EMBD, n_layer=LAYERS, n_head=HEADS), **overrides})


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides)).eval()


def greedy_without_cache(model: GPT, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The textbook loop: rerun the whole sequence for every new token."""
    idx = prompt
    for _ in range(steps):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


# ---------------------------------------------------------------------------------------------
# Hugging Face parity


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed (a test-only dependency)")


@pytest.fixture(scope="module")
def hf_model(transformers, one_thread):
    """A random Hugging Face GPT-2, its weights spread wider than GPT-2's 0.02 so that a wrong
    transpose or a swapped q/k/v shows in the logits."""
    pytest.importorskip("safetensors", reason="safetensors is not installed")
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=N_CTX,
        n_embd=EMBD,
        n_layer=LAYERS,
        n_head=HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=EOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
    )
    torch.manual_seed(1234)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_folder(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-gpt2")
    hf_model.save_pretrained(path)
    return path


def test_logits_loss_and_gradients_match_transformers(hf_model, hf_folder):
    fresh_seed()
    model = GPT.from_pretrained(hf_folder).eval()
    assert model.config.dropout == 0.0 and model.config.activation == "gelu_tanh"
    idx = torch.randint(0, VOCAB, (3, 37))
    with torch.no_grad():
        expected = hf_model(idx).logits
        logits, loss = model(idx)
    assert loss is None
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

    labels = idx.clone()
    labels[0, 5:9] = -100
    hf_loss = hf_model(idx, labels=labels).loss  # shifts the labels itself
    logits, loss = model(idx[:, :-1], targets=labels[:, 1:], return_logits=True)
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, hf_model(idx).logits[:, :-1], rtol=1e-5, atol=1e-5)

    hf_loss.backward()
    loss.backward()
    torch.testing.assert_close(
        model.transformer.wte.weight.grad, hf_model.transformer.wte.weight.grad, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        model.transformer.h[0].attn.c_attn.weight.grad,
        hf_model.transformer.h[0].attn.c_attn.weight.grad.t(),
        rtol=1e-4,
        atol=1e-6,
    )
    torch.testing.assert_close(
        model.transformer.h[1].ln_2.weight.grad, hf_model.transformer.h[1].ln_2.weight.grad, rtol=1e-4, atol=1e-6
    )
    hf_model.zero_grad()


def test_greedy_generation_matches_transformers(hf_model, hf_folder):
    fresh_seed()
    model = GPT.from_pretrained(hf_folder)
    prompt = torch.randint(0, VOCAB - 1, (2, 7))
    expected = hf_model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=12,
        do_sample=False,
        min_new_tokens=12,
        pad_token_id=EOT,
    )
    assert torch.equal(model.generate(prompt, 12, temperature=0), expected)


def test_hf_checkpoint_layouts(hf_model, tmp_path):
    """GPT2Model keys without the ``transformer.`` prefix and the causal-mask buffers of older
    checkpoints (pytorch_model.bin), and a sharded safetensors checkpoint."""
    reference = GPT(tiny_config())
    reference.load_hf_state_dict(hf_model.state_dict())
    idx = torch.randint(0, VOCAB, (1, 11))

    old = tmp_path / "old"
    old.mkdir()
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    for i in range(LAYERS):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(N_CTX, N_CTX)).view(1, 1, N_CTX, N_CTX)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, old / "pytorch_model.bin")
    (old / "config.json").write_text(json.dumps(hf_model.config.to_dict()))

    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()

    for folder in (old, sharded):
        model = GPT.from_pretrained(folder)
        torch.testing.assert_close(model(idx)[0], reference(idx)[0], rtol=0, atol=0)


def test_to_hf_state_dict_and_save_pretrained_load_in_transformers(transformers, tmp_path):
    fresh_seed()
    model = tiny_model(seed=7, activation="gelu")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**model.config.to_hf_config())).eval()
    hf.load_state_dict(model.to_hf_state_dict(), strict=True)
    idx = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, model(idx)[0], rtol=1e-5, atol=1e-5)
    again = GPT.from_pretrained(tmp_path).eval()
    assert again.config == model.config
    torch.testing.assert_close(again(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_bad_checkpoints_give_clear_errors(hf_model, hf_folder, tmp_path, monkeypatch):
    model = GPT(tiny_config())
    state = dict(hf_model.state_dict())
    state["transformer.h.1.mlp.c_fc.weight"] = state["transformer.h.1.mlp.c_fc.weight"].t()  # already nn.Linear
    del state["transformer.ln_f.bias"]
    state["transformer.h.0.attn.q_proj.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as error:
        model.load_hf_state_dict(state, source="ckpt")
    message = str(error.value)
    # a weight saved in nn.Linear's layout: the shapes as seen, and which layout each side uses
    assert (
        f"transformer.h.1.mlp.c_fc.weight: checkpoint [{4 * EMBD}, {EMBD}] (Conv1D, in x out) vs model "
        f"[{4 * EMBD}, {EMBD}] (nn.Linear, out x in)" in message
    )
    assert "missing key transformer.ln_f.bias (shape [64])" in message
    assert "unexpected key transformer.h.0.attn.q_proj.weight" in message

    wider = GPT(tiny_config(n_embd=96))
    with pytest.raises(ValueError, match=r"transformer.wte.weight: checkpoint \[101, 64\] vs model \[101, 96\]"):
        wider.load_hf_state_dict(hf_model.state_dict())

    untied = dict(hf_model.state_dict())
    untied["lm_head.weight"] = untied["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight differs from transformer.wte.weight"):
        model.load_hf_state_dict(untied)

    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        GPT.from_pretrained(tmp_path)

    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install safetensors"):
        GPT.from_pretrained(hf_folder)


# ---------------------------------------------------------------------------------------------
# Generation with the KV cache


def test_cached_generation_equals_uncached():
    fresh_seed()
    model = tiny_model(seed=3)
    prompt = torch.randint(0, VOCAB, (1, 9))
    assert torch.equal(model.generate(prompt, 20, temperature=0), greedy_without_cache(model, prompt, 20))


def test_left_padded_batch_generates_each_prompt_alone():
    fresh_seed()
    model = tiny_model(seed=4)
    lengths = [5, 11, 1, 8]
    prompts = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    width = max(lengths)
    batch = torch.full((len(prompts), width), EOT)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    out = model.generate(batch, 15, temperature=0, attention_mask=mask)
    assert out.shape == (4, width + 15)
    for row, p in enumerate(prompts):
        alone = greedy_without_cache(model, p[None], 15)
        assert torch.equal(out[row, width:], alone[0, len(p) :]), f"row {row} (prompt of {len(p)} tokens)"
        # the padded forward pass agrees with the row alone at the real positions too
        logits, _ = model(batch[row : row + 1], attention_mask=mask[row : row + 1])
        torch.testing.assert_close(logits[0, width - len(p) :], model(p[None])[0][0], rtol=1e-5, atol=1e-5)


def test_sampling_is_reproducible_and_streams_each_step():
    fresh_seed()
    model = tiny_model(seed=5)
    prompt = torch.randint(0, VOCAB, (3, 4))
    for kwargs in (dict(temperature=0.8), dict(top_k=5), dict(top_p=0.7, temperature=1.3)):
        steps = []
        first = model.generate(prompt, 10, generator=torch.Generator().manual_seed(11), stream=steps.append, **kwargs)
        again = model.generate(prompt, 10, generator=torch.Generator().manual_seed(11), **kwargs)
        other = model.generate(prompt, 10, generator=torch.Generator().manual_seed(12), **kwargs)
        assert torch.equal(first, again) and not torch.equal(first, other), kwargs
        assert torch.equal(torch.stack(steps, dim=1), first[:, 4:])
    greedy = model.generate(prompt, 10, temperature=0)
    assert torch.equal(model.generate(prompt, 10, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)


def test_sample_next_token_distribution():
    """Frequencies over many rows follow softmax(logits / T), restricted by top-k / top-p."""
    fresh_seed()
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 40_000
    batch = logits.expand(rows, -1)

    def frequencies(**kwargs):
        tokens = sample_next_token(batch, generator=torch.Generator().manual_seed(1), **kwargs)
        return torch.bincount(tokens, minlength=logits.numel()).float() / rows

    torch.testing.assert_close(frequencies(temperature=0.7), (logits / 0.7).softmax(-1), rtol=0, atol=0.01)
    top3 = torch.where(torch.arange(6) < 3, logits, -math.inf).softmax(-1)
    torch.testing.assert_close(frequencies(top_k=3), top3, rtol=0, atol=0.01)
    # probabilities 0.561, 0.206, 0.125, 0.076, ...: 0.561 + 0.206 < 0.8 <= 0.561 + 0.206 + 0.125, so three stay
    torch.testing.assert_close(frequencies(top_p=0.8), top3, rtol=0, atol=0.01)
    assert torch.equal(sample_next_token(batch[:3], temperature=0), torch.zeros(3, dtype=torch.long))


def test_eos_stops_rows():
    fresh_seed()
    model = tiny_model(seed=6)
    prompt = torch.randint(0, VOCAB, (2, 5))
    free = model.generate(prompt, 12, temperature=0)
    eos = int(free[0, 5 + 3])  # row 0 emits it at step 3
    out = model.generate(prompt, 12, temperature=0, eos_token_id=eos)
    first_eos = [int((row[5:] == eos).nonzero()[0]) if (row[5:] == eos).any() else None for row in free]
    for row in range(2):
        stop = first_eos[row]
        if stop is None:
            assert torch.equal(out[row], free[row, : out.size(1)])
        else:
            assert torch.equal(out[row, : 5 + stop + 1], free[row, : 5 + stop + 1])
            assert (out[row, 5 + stop :] == eos).all()
    expected_length = 5 + (max(first_eos) + 1 if None not in first_eos else 12)
    assert out.size(1) == expected_length


def test_generate_bad_arguments():
    model = tiny_model()
    prompt = torch.randint(0, VOCAB, (2, 10))
    with pytest.raises(
        ValueError,
        match=rf"prompt of 10 tokens \+ max_new_tokens=39 = 49 exceeds the model's context "
        rf"n_ctx = {N_CTX}",
    ):
        model.generate(prompt, 39)
    assert model.generate(prompt, 38, temperature=0).shape == (2, N_CTX)
    right_padded = torch.ones(2, 10, dtype=torch.long)
    right_padded[1, 7:] = 0
    with pytest.raises(ValueError, match="LEFT-padded"):
        model.generate(prompt, 3, attention_mask=right_padded)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.generate(prompt, 3, temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        model.generate(prompt, 3, top_p=0)
    with pytest.raises(ValueError, match="idx to be integer token ids of shape"):
        model.generate(prompt[0], 3)
    model.train()
    model.generate(prompt, 2)
    assert model.training  # restored after generating in eval mode


def test_forward_bad_arguments():
    model = tiny_model()
    idx = torch.randint(0, VOCAB, (2, 10))
    with pytest.raises(ValueError, match=rf"sequence of {N_CTX + 1} tokens is longer than the model's context"):
        model(torch.zeros(1, N_CTX + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected targets of idx's shape \[2, 10\], got \[2, 9\]"):
        model(idx, targets=idx[:, 1:])
    with pytest.raises(ValueError, match=r"attention_mask of shape \[B, past \+ T\] = \[2, 10\], got \[2, 9\]"):
        model(idx, attention_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match="idx to be integer token ids"):
        model(idx.float())
    with pytest.raises(ValueError, match="head dim n_embd / n_head = 12 is not supported"):
        GPTConfig(n_embd=48, n_head=4)
    with pytest.raises(ValueError, match="not divisible by n_head"):
        GPTConfig(n_embd=100, n_head=8)
    with pytest.raises(ValueError, match="unknown GPT preset 'gpt3'"):
        GPTConfig.from_name("gpt3")


def test_presets_and_parameter_count():
    config = GPTConfig.from_name("gpt2")
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size) == (
        12,
        12,
        768,
        1024,
        50257,
    )
    assert GPTConfig.from_name("gpt2-xl").head_dim == 64
    assert GPTConfig.from_name("bytes-tiny").vocab_size == 257
    with torch.device("meta"):
        gpt2 = GPT(config)
    assert gpt2.num_parameters() == 124_439_808  # GPT-2 small, the tied head counted once
    assert gpt2.num_parameters(non_embedding=True) == 124_439_808 - (50257 + 1024) * 768


def test_padding_positions_are_ignored_by_the_loss():
    fresh_seed()
    model = tiny_model(seed=8)
    idx = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones_like(idx)
    mask[1, 9:] = 0
    _, loss = model(idx[:, :-1], idx[:, 1:], attention_mask=mask[:, :-1])
    targets = idx[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    logits, _ = model(idx[:, :-1], attention_mask=mask[:, :-1])
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The classifier head


def test_classifier_uses_the_last_token_and_ignores_padding():
    fresh_seed()
    torch.manual_seed(9)
    classifier = GPTClassifier(tiny_config(), num_labels=3).eval()
    lengths = [6, 10, 3]
    rows = [torch.randint(0, VOCAB - 1, (n,)) for n in lengths]
    labels = torch.tensor([2, 0, 1])
    single = torch.cat([classifier(r[None])[0] for r in rows])
    manual = torch.cat([classifier.score(classifier.gpt.hidden_states(r[None])[:, -1]) for r in rows])
    torch.testing.assert_close(single, manual, rtol=0, atol=0)
    for side in ("right", "left"):
        batch = torch.full((3, 10), EOT)
        mask = torch.zeros(3, 10, dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(0, len(r)) if side == "right" else slice(10 - len(r), 10)
            batch[i, span], mask[i, span] = r, 1
        logits, loss = classifier(batch, labels=labels, attention_mask=mask)
        torch.testing.assert_close(logits, single, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, F.cross_entropy(single, labels), rtol=1e-5, atol=1e-6)
    pretrained = tiny_model(seed=10)
    assert GPTClassifier(pretrained, 2).gpt is pretrained


# ---------------------------------------------------------------------------------------------
# Training: the same steps as a plain-torch GPT-2


def test_training_steps_match_plain_torch():
    fresh_seed()
    model = tiny_model(seed=11).train()
    reference = PlainGPT(model.config)
    reference.load_state_dict(model.state_dict())
    text = torch.randint(0, VOCAB, (4, N_CTX + 1))
    batches = [text[:, i : i + 33] for i in range(0, 16, 2)] + [text[:, :33]] * 4
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1) for m in (model, reference)]
    losses, ref_losses = [], []
    for batch in batches:
        targets = batch[:, 1:].clone()
        targets[0, :4] = -100
        for net, optimizer, record in ((model, optimizers[0], losses), (reference, optimizers[1], ref_losses)):
            optimizer.zero_grad()
            loss = net(batch[:, :-1], targets)[1] if net is model else net(batch[:, :-1], targets)
            loss.backward()
            optimizer.step()
            record.append(loss.item())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-5, atol=0)
    assert losses[-1] < losses[0] - 0.5  # it learns (the last four steps repeat one batch)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if name.endswith("c_attn.bias"):
            # the key bias adds the same score to every key of a query: its true gradient is 0, so
            # AdamW turns rounding noise into lr-sized steps; compare the query and value biases
            p, q = p[[*range(EMBD), *range(2 * EMBD, 3 * EMBD)]], q[[*range(EMBD), *range(2 * EMBD, 3 * EMBD)]]
        # AdamW's steps are lr-sized (3e-3) whatever the gradient's size, so a weight whose gradient
        # is near 0 moves by up to lr per step on rounding differences alone: 1e-4 is 1/30 of a step
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_dropout_is_active_in_training_only():
    fresh_seed()
    model = tiny_model(seed=12, dropout=0.2)
    idx = torch.randint(0, VOCAB, (2, 16))
    eval_logits = model(idx)[0]
    torch.testing.assert_close(model(idx)[0], eval_logits, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(idx)[0], eval_logits)


# ---------------------------------------------------------------------------------------------
# fastdl generate


def run_cli(*argv):
    parser = argparse.ArgumentParser()
    generate_cli.add_arguments(parser)
    return generate_cli.run(parser.parse_args(list(argv)))


def test_generate_command(tmp_path, capsys):
    assert run_cli("--model", "bytes-tiny", "--prompt", "hi", "--max-new-tokens", "3", "--seed", "2") == 0
    out, err = capsys.readouterr()
    assert out.startswith("hi") and "bytes-tiny: random weights (seed 2)" in err
    assert run_cli("--model", "gpt5", "--prompt", "x") == 2
    assert "neither a folder nor a preset" in capsys.readouterr().err

    pytest.importorskip("safetensors", reason="safetensors is not installed")
    torch.manual_seed(13)
    model = GPT(GPTConfig.from_name("bytes-tiny", n_layer=1, n_ctx=64))
    model.save_pretrained(tmp_path)
    assert run_cli("--model", str(tmp_path), "--prompt", "héllo", "--max-new-tokens", "20", "--temperature", "0") == 0
    out, err = capsys.readouterr()
    prompt = torch.tensor([list("héllo".encode())])
    expected = model.generate(prompt, 20, temperature=0, eos_token_id=256)[0, prompt.size(1) :].tolist()
    expected_bytes = bytes(t for t in expected if t != 256)
    assert out == "héllo" + expected_bytes.decode("utf-8", errors="replace") + "\n"
    assert "first token after" in err and "(prefill)" in err
    assert run_cli("--model", str(tmp_path), "--prompt", "x" * 60, "--max-new-tokens", "5") == 2
    out, err = capsys.readouterr()
    assert out == "" and "exceeds the model's context n_ctx = 64" in err
