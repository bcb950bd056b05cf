"""Tokenizers for the GPT models: UTF-8 bytes, and GPT-2's byte-level BPE (through tiktoken).

- :class:`ByteTokenizer`: every UTF-8 byte is a token (ids 0..255) plus ``<|endoftext|>`` (256).
  It needs no files, so a model can be trained from scratch on any text offline.
- :class:`GPT2Tokenizer`: GPT-2's 50,257-token BPE, ``<|endoftext|>`` = 50256, run by tiktoken.
  Its ranks are read from a local file; nothing is downloaded unless tiktoken itself does so.
- :func:`get_tokenizer`: ``"bytes"``, ``"gpt2"`` or the path of a vocabulary.

Both follow tiktoken's ``encode(text, allowed_special=..., disallowed_special=...)``: by default
text that contains ``<|endoftext|>`` is refused, because a document that merely mentions the
marker would otherwise end early; ``allowed_special={"<|endoftext|>"}`` (or ``"all"``) encodes it
as the special id, ``disallowed_special=()`` as ordinary characters.
"""

from __future__ import annotations

import base64
import importlib.util
import json
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Literal

__all__ = ["ByteTokenizer", "GPT2Tokenizer", "get_tokenizer", "END_OF_TEXT"]

END_OF_TEXT = "<|endoftext|>"

# GPT-2's pre-tokenizer (tiktoken's "r50k_base" pattern): contractions, letters, digits and other
# symbols, each optionally after one space, then runs of whitespace. BPE runs inside each piece.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

Special = Literal["all"] | Collection[str]


def _special_tokens_to_allow(
    text: str, specials: Iterable[str], allowed_special: Special, disallowed_special: Special
) -> set[str]:
    """tiktoken's rule: the specials that ``text`` may contain as specials; a ValueError for a
    disallowed one that it contains."""
    specials = set(specials)
    allowed = specials if allowed_special == "all" else set(allowed_special)
    disallowed = specials - allowed if disallowed_special == "all" else set(disallowed_special)
    for token in disallowed:
        if token in text:
            raise ValueError(
                f"the text contains the special token {token!r}; pass allowed_special={{{token!r}}} to encode it "
                "as its special id, or disallowed_special=() to encode it as ordinary text"
            )
    return allowed & specials


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``vocab_size`` 257, ids 0..255 are bytes, 256 is ``<|endoftext|>``.

    ``decode`` replaces bytes that are not valid UTF-8 (a model's output may split a character)
    with U+FFFD, like tiktoken does.
    """

    name = "bytes"
    eot_token = 256
    vocab_size = 257
    special_tokens = {END_OF_TEXT: 256}

    def encode(self, text: str, *, allowed_special: Special = (), disallowed_special: Special = "all") -> list[int]:
        """``text`` as a list of ids."""
        allowed = _special_tokens_to_allow(text, self.special_tokens, allowed_special, disallowed_special)
        if not allowed:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for i, part in enumerate(text.split(END_OF_TEXT)):
            if i > 0:
                ids.append(self.eot_token)
            ids.extend(part.encode("utf-8"))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids`` (``<|endoftext|>`` as its text)."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i == self.eot_token:
                out += END_OF_TEXT.encode()
            else:
                raise ValueError(f"token id {i} is out of range for the byte tokenizer (vocab_size {self.vocab_size})")
        return bytes(out)

    def decode(self, ids: Iterable[int]) -> str:
        """``ids`` back to text."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257)"


def _gpt2_byte_to_char() -> dict[int, str]:
    """GPT-2's ``vocab.json`` spells every byte as one printable character: the printable Latin-1
    bytes stand for themselves and the other 68 (control codes, space, ...) take the code points
    from 256 upwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _ranks_from_hf_vocab(vocab_path: Path, merges_path: Path | None) -> tuple[dict[bytes, int], dict[str, int]]:
    """A Hugging Face byte-level BPE (``vocab.json``, optional ``merges.txt``) as tiktoken ranks
    and special tokens.

    tiktoken merges the adjacent pair whose concatenation has the lowest id, and Hugging Face's
    BPE the pair listed first in ``merges.txt``; the two agree when the merged tokens' ids grow in
    the order of the merges, as GPT-2's do. That is checked when ``merges.txt`` is given.
    """
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    char_to_byte = {c: b for b, c in _gpt2_byte_to_char().items()}
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for token, index in vocab.items():
        if token.startswith("<|") and token.endswith("|>"):
            specials[token] = index
        elif all(c in char_to_byte for c in token):
            ranks[bytes(char_to_byte[c] for c in token)] = index
        else:
            raise ValueError(f"{vocab_path}: token {token!r} (id {index}) is not spelled in GPT-2's byte alphabet")
    if merges_path is not None:
        previous = -1
        for line_number, line in enumerate(merges_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or parts[0] + parts[1] not in vocab:
                raise ValueError(
                    f"{merges_path}:{line_number}: merge {line!r} does not make a token of {vocab_path.name}"
                )
            merged = vocab[parts[0] + parts[1]]
            if merged <= previous:
                raise ValueError(
                    f"{merges_path}:{line_number}: the ids of merged tokens must grow in merge order (got {merged} "
                    f"after {previous}); this vocabulary cannot be run by tiktoken"
                )
            previous = merged
    return ranks, specials


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A ``.tiktoken`` file: one ``base64(token bytes) rank`` per line."""
    ranks = {}
    for line_number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{line_number}: expected 'base64-token rank', got {line[:60]!r}") from None
    return ranks


def _whisper_gpt2_ranks() -> Path | None:
    """The GPT-2 ranks file that the ``openai-whisper`` package ships, if it is installed (found
    without importing whisper, which would import its own heavy dependencies)."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / "gpt2.tiktoken"
    return path if path.is_file() else None


class GPT2Tokenizer:
    """GPT-2's byte-level BPE: ``vocab_size`` 50257, ``eot_token`` = 50256 (``<|endoftext|>``).

    Wraps a ``tiktoken.Encoding`` (``.encoding``). Build one with:

    - ``GPT2Tokenizer.from_file(path)``: a ``.tiktoken`` ranks file, a Hugging Face ``vocab.json``
      (with ``merges.txt`` beside it, checked when present), or a folder holding either (a
      downloaded Hugging Face model folder works);
    - ``GPT2Tokenizer.default()``: GPT-2's ranks from the ``openai-whisper`` package when it is
      installed (no network), else ``tiktoken.get_encoding("gpt2")``, which reads tiktoken's
      cache or downloads the files once.
    """

    name = "gpt2"

    def __init__(self, encoding):
        self.encoding = encoding
        self.eot_token = encoding.eot_token
        self.vocab_size = encoding.n_vocab
        self.special_tokens = {token: encoding.encode_single_token(token) for token in encoding.special_tokens_set}

    @classmethod
    def from_ranks(
        cls, ranks: dict[bytes, int], special_tokens: dict[str, int] | None = None, name: str = "gpt2"
    ) -> GPT2Tokenizer:
        """From tiktoken ranks (token bytes -> id) with GPT-2's pre-tokenizer. ``special_tokens``
        defaults to ``<|endoftext|>`` = the next free id (50256 for GPT-2's ranks)."""
        tiktoken = _import_tiktoken()
        if special_tokens is None:
            special_tokens = {END_OF_TEXT: max(ranks.values()) + 1}
        if END_OF_TEXT not in special_tokens:
            raise ValueError(f"the vocabulary has no {END_OF_TEXT!r} token; specials seen: {sorted(special_tokens)}")
        return cls(
            tiktoken.Encoding(
                name=name, pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special_tokens
            )
        )

    @classmethod
    def from_file(cls, path: str | Path) -> GPT2Tokenizer:
        """From a ``.tiktoken`` file, a ``vocab.json`` (+ ``merges.txt``), or a folder with one."""
        path = Path(path)
        if path.is_dir():
            candidates = [path / "vocab.json", *sorted(path.glob("*.tiktoken"))]
            found = [p for p in candidates if p.is_file()]
            if not found:
                raise FileNotFoundError(f"{path} holds neither vocab.json nor a .tiktoken file")
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        if path.suffix == ".json":
            merges = path.with_name("merges.txt")
            ranks, specials = _ranks_from_hf_vocab(path, merges if merges.is_file() else None)
            return cls.from_ranks(ranks, specials or None, name=path.parent.name or "gpt2")
        return cls.from_ranks(_read_tiktoken_ranks(path), name=path.stem)

    @classmethod
    def default(cls) -> GPT2Tokenizer:
        """GPT-2's tokenizer from the first source that has it (see the class docstring)."""
        ranks_file = _whisper_gpt2_ranks()
        if ranks_file is not None:
            return cls.from_file(ranks_file)
        tiktoken = _import_tiktoken()
        try:
            return cls(tiktoken.get_encoding("gpt2"))
        except Exception as error:  # tiktoken raises whatever its HTTP client raises when offline
            raise RuntimeError(
                "GPT-2's BPE files are not available: tiktoken could not load them "
                f"({type(error).__name__}: {str(error)[:200]}). Offline, install the package that ships them "
                "(pip install --no-deps openai-whisper) or pass a local vocab.json / .tiktoken file "
                "(GPT2Tokenizer.from_file(path), --tokenizer PATH)"
            ) from error

    def encode(self, text: str, *, allowed_special: Special = (), disallowed_special: Special = "all") -> list[int]:
        """``text`` as a list of ids (see the module docstring for the special-token rule)."""
        allowed = _special_tokens_to_allow(text, self.special_tokens, allowed_special, disallowed_special)
        return self.encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes of ``ids``; for streaming, where one character may span two steps."""
        return self.encoding.decode_bytes([int(i) for i in ids])

    def decode(self, ids: Sequence[int]) -> str:
        """``ids`` back to text (invalid UTF-8 becomes U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"GPT2Tokenizer({self.encoding.name!r}, vocab_size={self.vocab_size})"


def _import_tiktoken():
    try:
        import tiktoken
    except ImportError:
        raise ImportError("GPT2Tokenizer runs on tiktoken: pip install tiktoken") from None
    return tiktoken


def get_tokenizer(name: str | Path) -> ByteTokenizer | GPT2Tokenizer:
    """``"bytes"`` -> :class:`ByteTokenizer`; ``"gpt2"`` -> :meth:`GPT2Tokenizer.default`;
    anything else is a path for :meth:`GPT2Tokenizer.from_file`."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer.default()
    if not Path(name).exists():
        raise ValueError(f"unknown tokenizer {str(name)!r}: expected 'bytes', 'gpt2' or the path of a vocabulary file")
    return GPT2Tokenizer.from_file(name)
