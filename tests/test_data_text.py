"""fastdl.data.text: corpora read and tokenised, the train/validation split, and the windows of
training and evaluation. Streams whose token at position i is i make every window's origin
readable from its content."""

from __future__ import annotations

import pytest
import torch

from fastdl.data import text
from fastdl.data.tokenizer import ByteTokenizer, END_OF_TEXT


def positions(n: int) -> torch.Tensor:
    """The stream 0, 1, ..., n - 1 (int32, so values past 65,535 stay exact)."""
    return torch.arange(n, dtype=torch.int32)


def windows(tokens, block_size=8, batch_size=4, seed=0, rank=0, world_size=1) -> text.TokenWindows:
    return text.TokenWindows(tokens, block_size, batch_size, torch.Generator().manual_seed(seed), rank, world_size)


def draw(sampler: text.TokenWindows, batches: int) -> list[torch.Tensor]:
    return [sampler.next_batch() for _ in range(batches)]


# ---------------------------------------------------------------------------------------------
# Windows


def test_windows_are_contiguous_slices_and_targets_are_the_next_tokens():
    tokens = positions(1000)
    # two samplers of one seed: one says where its windows start, the other gathers them
    where, sampler = windows(tokens, block_size=16, batch_size=5), windows(tokens, block_size=16, batch_size=5)
    for _ in range(30):  # several epochs: 61 windows, 12 batches each
        starts, batch = where.next_starts(), sampler.next_batch()
        assert batch.dtype == torch.int64 and batch.shape == (5, 17)
        assert 0 <= int(starts.min()) and int(starts.max()) + 17 <= tokens.numel()
        assert torch.equal(batch, starts[:, None] + torch.arange(17))  # tokens[s : s + T + 1]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        assert torch.equal(targets, inputs + 1)  # each target is the token after its input


def test_an_epoch_visits_every_window_once_and_no_target_twice():
    tokens = positions(1003)
    block, batch = 10, 7
    sampler = windows(tokens, block, batch)
    assert sampler.windows_per_epoch == (1003 - block) // block == 99
    assert sampler.batches_per_epoch == 99 // 7 == 14
    phases = set()
    for epoch in range(1, 6):
        starts = torch.cat([sampler.next_global_starts() for _ in range(sampler.batches_per_epoch)])
        assert sampler.epoch == epoch
        phases.add(sampler.phase)
        targets = (starts[:, None] + 1 + torch.arange(block)).flatten()
        assert targets.unique().numel() == targets.numel()  # no target token twice in an epoch
        assert ((starts - sampler.phase) % block == 0).all()
        assert starts.unique().numel() == 14 * 7  # 98 of the 99 windows: the last partial batch is dropped
    assert len(phases) > 1  # the cuts move between epochs


def test_windows_are_reproducible_from_the_seed():
    tokens = positions(500)
    first = torch.stack(draw(windows(tokens, seed=5), 40))
    assert torch.equal(first, torch.stack(draw(windows(tokens, seed=5), 40)))
    assert not torch.equal(first, torch.stack(draw(windows(tokens, seed=6), 40)))


def test_state_dict_continues_the_sequence_across_epochs():
    tokens = positions(300)
    reference = windows(tokens, block_size=8, batch_size=4)
    expected = draw(reference, 25)  # 36 windows, 9 batches an epoch: crosses two epoch boundaries
    for stop in (0, 3, 9, 13):
        first = windows(tokens, block_size=8, batch_size=4)
        draw(first, stop)
        state = first.state_dict()
        resumed = windows(tokens, block_size=8, batch_size=4, seed=99)  # its own seed is overwritten
        resumed.load_state_dict(state)
        for got, want in zip(draw(resumed, 25 - stop), expected[stop:]):
            assert torch.equal(got, want), stop
    other = windows(positions(400), block_size=8, batch_size=4)
    with pytest.raises(ValueError, match="the saved windows cut 36 per epoch, these 49"):
        other.load_state_dict(reference.state_dict())


@pytest.mark.parametrize("world_size, batch_size", [(2, 8), (2, 5), (3, 7)])
def test_ranks_take_disjoint_shares_of_the_global_batch(world_size, batch_size):
    tokens = positions(2000)
    single = windows(tokens, batch_size=batch_size, seed=1)
    ranks = [windows(tokens, batch_size=batch_size, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(60):
        whole = single.next_starts()
        shares = [sampler.next_starts() for sampler in ranks]
        assert torch.equal(torch.cat(shares), whole)  # together they are the one-process batch
        assert torch.cat(shares).unique().numel() == batch_size  # no window on two ranks
        sizes = [share.numel() for share in shares]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_evaluation_windows_cut_the_split_every_block_size_tokens():
    tokens = positions(105)
    every = text.evaluation_windows(tokens, block_size=10)
    assert every.shape == (10, 11)  # (105 - 1) // 10 windows
    assert torch.equal(every[:, 0], torch.arange(10) * 10)
    assert torch.equal(every, every[:, :1] + torch.arange(11))
    spread = text.evaluation_windows(tokens, block_size=10, max_windows=4)
    assert torch.equal(spread[:, 0], torch.tensor([0, 30, 60, 90]))
    assert torch.equal(text.evaluation_windows(tokens, 10, max_windows=50), every)


def test_train_and_validation_splits_are_disjoint():
    tokens = positions(1000)
    train, val = text.split_tokens(tokens, 0.1)
    assert (train.numel(), val.numel()) == (900, 100)
    assert torch.equal(torch.cat([train, val]), tokens)
    sampler = windows(train, block_size=16, batch_size=8)
    seen = torch.cat([sampler.next_batch().flatten() for _ in range(200)])
    assert int(seen.max()) < 900  # a training window never reads a validation token
    assert int(text.evaluation_windows(val, 16).min()) >= 900
    with pytest.raises(ValueError, match=r"val_fraction must lie in \(0, 1\), got 1.5"):
        text.split_tokens(tokens, 1.5)


def test_too_short_streams_and_bad_arguments_are_named():
    with pytest.raises(
        ValueError,
        match="the training split has 8 tokens, fewer than one window of block_size "
        r"\+ 1 = 9",
    ):
        windows(positions(8), block_size=8)
    with pytest.raises(
        ValueError,
        match=r"batch_size 5: the training split's 40 tokens make only 4 windows of "
        r"block_size \+ 1 = 9 tokens per epoch",
    ):
        windows(positions(40), block_size=8, batch_size=5)
    with pytest.raises(ValueError, match="batch_size 2 gives some of the 3 processes no window"):
        windows(positions(400), batch_size=2, rank=0, world_size=3)
    with pytest.raises(ValueError, match=r"expected a token stream Tensor\[N\], got shape \[2, 50\]"):
        windows(positions(100).view(2, 50))
    with pytest.raises(ValueError, match="the validation split has 5 tokens"):
        text.evaluation_windows(positions(5), block_size=8)
    # one window more than the block size is enough
    assert windows(positions(9), block_size=8, batch_size=1).next_batch().shape == (1, 9)


# ---------------------------------------------------------------------------------------------
# Corpora


def test_pydoc_corpus_loads_offline():
    from pydoc_data.topics import topics

    corpus = text.load_corpus("pydoc", ByteTokenizer())
    expected = [list(topics[name].encode("utf-8")) + [256] for name in sorted(topics)]
    assert corpus.documents == len(topics) and corpus.vocab_size == 257
    assert corpus.characters == sum(len(t) for t in topics.values()) > 300_000
    assert corpus.tokens.dtype == torch.uint16
    assert corpus.tokens.long().tolist() == [token for document in expected for token in document]


class CountingTokenizer:
    """A made-up tokenizer with a large vocabulary: a character's code point plus 66,000."""

    vocab_size, eot_token = 70_000, 0

    def encode(self, text, disallowed_special=()):
        return [66_000 + ord(c) for c in text]


def test_user_file_and_folder(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "2.md").write_text("second ", encoding="utf-8")
    (folder / "1.txt").write_text("first é", encoding="utf-8")
    (folder / "3.txt").write_text(f"mentions {END_OF_TEXT} as text", encoding="utf-8")
    (folder / "image.png").write_bytes(b"\x89PNG\x00\x01")
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (folder / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref", encoding="utf-8")

    corpus = text.load_corpus(folder, ByteTokenizer())
    assert corpus.documents == 3 and sorted(corpus.skipped) == ["image.png", "latin1.txt"]
    ordered = ["first é", f"mentions {END_OF_TEXT} as text", "second "]  # 1.txt, 3.txt, b/2.md
    assert corpus.tokens.long().tolist() == [t for d in ordered for t in list(d.encode("utf-8")) + [256]]
    assert corpus.characters == sum(len(d) for d in ordered)

    single = text.load_corpus(str(folder / "1.txt"), ByteTokenizer())
    assert single.documents == 1 and ByteTokenizer().decode(single.tokens.tolist()) == "first é" + END_OF_TEXT

    large = text.load_corpus(folder / "1.txt", CountingTokenizer())
    assert large.tokens.dtype == torch.int32  # ids past 65,535
    assert large.tokens.tolist() == [66_000 + ord(c) for c in "first é"] + [0]


def test_gpt2_corpus_is_uint16():
    from fastdl.data.tokenizer import get_tokenizer

    try:
        tokenizer = get_tokenizer("gpt2")
    except (ImportError, RuntimeError) as error:
        pytest.skip(f"GPT-2's BPE is not available here: {error}")
    from pydoc_data.topics import topics

    corpus = text.load_corpus("pydoc", tokenizer)
    assert corpus.tokens.dtype == torch.uint16
    tokens = corpus.tokens.long()
    assert int(tokens.max()) < 50257 and (tokens == tokenizer.eot_token).sum() == len(topics)
    assert tokens.numel() < corpus.characters / 2  # BPE: well under one token per character
    first_end = int((tokens == tokenizer.eot_token).nonzero()[0])
    assert tokenizer.decode(tokens[:first_end].tolist()) == topics[sorted(topics)[0]]


def test_empty_and_unreadable_corpora_give_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty.txt: the corpus is empty \(1 documents, 0 characters\)"):
        text.load_corpus(empty, ByteTokenizer())
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "a.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match=r"no UTF-8 text file in the folder \(1 binary or non-UTF-8 files skipped\)"):
        text.load_corpus(binary, ByteTokenizer())
    with pytest.raises(ValueError, match="a.bin: not a UTF-8 text file"):
        text.load_corpus(binary / "a.bin", ByteTokenizer())
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        text.load_corpus(tmp_path / "missing", ByteTokenizer())
