"""fastdl.data.tokenizer: the byte tokenizer from its definition; GPT-2-style BPE vocabularies
(vocab.json + merges.txt, .tiktoken) against Hugging Face ``tokenizers`` on a vocabulary trained
here; GPT-2's own ranks, when a local copy exists, against known GPT-2 ids and tiktoken's."""

from __future__ import annotations

import base64
import json
import random

import pytest
from pydoc_data.topics import topics  # CPython's bundled help texts: real English offline

from fastdl.data import tokenizer as tokenizer_module
from fastdl.data.tokenizer import END_OF_TEXT, ByteTokenizer, GPT2Tokenizer, get_tokenizer

TEXTS = list(topics.values())
SAMPLES = [
    "Hello world",
    " Hello world",
    "It's 2024: we'll see, they've said.\n\n  Indented\tand\ttabbed  ",
    "naïve café — 東京 🙂 ü",
    "x = [1, 22, 333]  # comment",
    "",
    " ",
    "\n\n\n",
]


def random_text(rng: random.Random, n: int = 300) -> str:
    """Words from the corpus mixed with digits, punctuation, odd whitespace and non-ASCII."""
    words = " ".join(TEXTS[rng.randrange(len(TEXTS))].split()[:50]).split()
    pieces = [rng.choice(words) for _ in range(n // 5)]
    pieces += [str(rng.randrange(10**6)), "   ", "\t", "\n\n", "'re", "ñ", "日本", "🙂", "!!", "--"]
    rng.shuffle(pieces)
    return "".join(p + rng.choice([" ", "", "  ", "\n"]) for p in pieces)


# ---------------------------------------------------------------------------------------------
# ByteTokenizer


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eot_token) == (257, 256)
    rng = random.Random(0)
    for text in SAMPLES + [random_text(rng) for _ in range(5)]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    text = f"one{END_OF_TEXT}two"
    with pytest.raises(ValueError, match="contains the special token '<\\|endoftext\\|>'"):
        tok.encode(text)
    assert tok.encode(text, allowed_special={END_OF_TEXT}) == [*b"one", 256, *b"two"]
    assert tok.encode(text, allowed_special="all") == [*b"one", 256, *b"two"]
    assert tok.encode(text, disallowed_special=()) == list(text.encode())
    assert tok.decode([*b"one", 256]) == f"one{END_OF_TEXT}"
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # a character cut in half
    assert tok.decode_bytes([0xE6, 0x97]) == b"\xe6\x97"
    with pytest.raises(ValueError, match="token id 300 is out of range for the byte tokenizer"):
        tok.decode([300])


# ---------------------------------------------------------------------------------------------
# BPE vocabularies in Hugging Face's and tiktoken's formats, against Hugging Face tokenizers


@pytest.fixture(scope="module")
def trained_vocab(tmp_path_factory):
    """A 600-token byte-level BPE trained by Hugging Face ``tokenizers`` on the corpus and numbers, saved as
    vocab.json + merges.txt (+ <|endoftext|>), and the trained tokenizer as the reference."""
    pytest.importorskip("tiktoken", reason="tiktoken is not installed")
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers (Hugging Face) is not installed")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    reference = tokenizers.Tokenizer(models.BPE())
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    numbers = random.Random(4)  # so that multi-digit tokens exist: digit runs are pre-tokenized together
    number_lines = [
        " ".join(str(numbers.randrange(10 ** numbers.randrange(1, 6))) for _ in range(200)) for _ in range(20)
    ]
    reference.train_from_iterator(TEXTS[::2] + number_lines, trainer)
    folder = tmp_path_factory.mktemp("bpe")
    reference.model.save(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab[END_OF_TEXT] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return folder, reference


def test_hf_vocab_encodes_like_hf_tokenizers(trained_vocab):
    folder, reference = trained_vocab
    tok = GPT2Tokenizer.from_file(folder / "vocab.json")
    assert tok.vocab_size == 601 and tok.eot_token == 600
    rng = random.Random(1)
    for text in SAMPLES + [random_text(rng) for _ in range(20)] + TEXTS[1:40:2]:
        ids = tok.encode(text)
        assert ids == reference.encode(text).ids, text[:80]
        assert tok.decode(ids) == text
    assert tok.encode(f"a{END_OF_TEXT}", allowed_special="all")[-1] == 600
    assert GPT2Tokenizer.from_file(folder).encode(TEXTS[3]) == reference.encode(TEXTS[3]).ids  # the folder
    assert get_tokenizer(str(folder)).encode(TEXTS[5]) == reference.encode(TEXTS[5]).ids


def test_tiktoken_file_equals_hf_vocab(trained_vocab, tmp_path):
    folder, _ = trained_vocab
    from_json = GPT2Tokenizer.from_file(folder / "vocab.json")
    ranks = from_json.encoding._mergeable_ranks
    in_rank_order = sorted(ranks.items(), key=lambda item: item[1])
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in in_rank_order]
    (tmp_path / "small.tiktoken").write_text("\n".join(lines) + "\n")
    from_ranks = GPT2Tokenizer.from_file(tmp_path / "small.tiktoken")
    assert from_ranks.eot_token == from_json.eot_token
    for text in TEXTS[:30]:
        assert from_ranks.encode(text) == from_json.encode(text)


def test_bad_vocabularies_give_clear_errors(trained_vocab, tmp_path):
    folder, _ = trained_vocab
    merges = (folder / "merges.txt").read_text().splitlines()
    body = [m for m in merges if m and not m.startswith("#")]
    (tmp_path / "vocab.json").write_text((folder / "vocab.json").read_text())
    (tmp_path / "merges.txt").write_text("\n".join([body[1], body[0], *body[2:]]) + "\n")
    with pytest.raises(ValueError, match="ids of merged tokens must grow in merge order"):
        GPT2Tokenizer.from_file(tmp_path)
    (tmp_path / "merges.txt").write_text("q zzzz\n")
    with pytest.raises(ValueError, match=r"merges.txt:1: merge 'q zzzz' does not make a token"):
        GPT2Tokenizer.from_file(tmp_path / "vocab.json")
    (tmp_path / "merges.txt").unlink()
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b c": 1, END_OF_TEXT: 2}))
    with pytest.raises(ValueError, match="token 'b c' \\(id 1\\) is not spelled in GPT-2's byte alphabet"):
        GPT2Tokenizer.from_file(tmp_path / "vocab.json")
    (tmp_path / "bad.tiktoken").write_text("YQ== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2: expected 'base64-token rank'"):
        GPT2Tokenizer.from_file(tmp_path / "bad.tiktoken")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither vocab.json nor a .tiktoken file"):
        GPT2Tokenizer.from_file(empty)
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt-4'"):
        get_tokenizer("gpt-4")
    assert isinstance(get_tokenizer("bytes"), ByteTokenizer)


def test_default_source_without_files_explains_what_to_install(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is not installed")
    monkeypatch.setattr(tokenizer_module, "_whisper_gpt2_ranks", lambda: None)

    def offline(name):
        raise ConnectionError(f"cannot download the files of {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(
        RuntimeError,
        match=r"tiktoken could not load them \(ConnectionError: cannot download.*"
        r"pip install --no-deps openai-whisper",
    ):
        GPT2Tokenizer.default()


# ---------------------------------------------------------------------------------------------
# GPT-2's own BPE (needs a local copy of its ranks)


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    pytest.importorskip("tiktoken", reason="tiktoken is not installed")
    try:
        return GPT2Tokenizer.default()
    except RuntimeError as error:
        pytest.skip(
            f"GPT-2's BPE ranks are not available offline ({str(error)[:80]}...): "
            "pip install --no-deps openai-whisper to run these tests"
        )


def test_gpt2_ids(gpt2_tokenizer):
    tok = gpt2_tokenizer
    assert (tok.vocab_size, tok.eot_token) == (50257, 50256)
    # ids from Hugging Face's GPT2Tokenizer documentation
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello world") == [18435, 995]
    assert tok.encode(END_OF_TEXT, allowed_special={END_OF_TEXT}) == [50256]
    with pytest.raises(ValueError, match="contains the special token"):
        tok.encode(f"a {END_OF_TEXT}")
    rng = random.Random(2)
    for text in SAMPLES + [random_text(rng) for _ in range(10)]:
        assert tok.decode(tok.encode(text)) == text
    # BPE compresses English: about 4 characters per token
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0]) / 3


def test_gpt2_equals_tiktokens_own_encoding(gpt2_tokenizer):
    import tiktoken

    try:
        reference = tiktoken.get_encoding("gpt2")
    except Exception as error:
        pytest.skip(f"tiktoken cannot load its own GPT-2 files offline ({type(error).__name__})")
    rng = random.Random(3)
    for text in SAMPLES + [random_text(rng) for _ in range(10)]:
        assert gpt2_tokenizer.encode(text) == reference.encode(text)
