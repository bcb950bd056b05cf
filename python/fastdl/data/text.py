"""Text corpora for language models: one token stream, its train/validation split, and the
windows a training step reads.

- :func:`read_documents`: ``"pydoc"`` (the help topics CPython ships in ``pydoc_data.topics``,
  about 460 KB of English, always offline) or a UTF-8 file, or a folder of them.
- :func:`load_corpus`: the documents tokenised once into ``Tensor[N]`` (uint16 when the
  vocabulary fits in 65,536 ids, else int32), each document followed by the end-of-text token.
- :func:`split_tokens`: the first part of the stream for training, the rest for validation
  (contiguous, so no window of one split reads a token of the other).
- :class:`TokenWindows`: training windows ``Tensor[B, T + 1]`` in a seeded random order, a
  rank's share of them under DDP; :func:`evaluation_windows`: fixed windows of a split.

A window holds ``T + 1`` consecutive tokens: a model reads ``window[:, :-1]`` and predicts
``window[:, 1:]``, each target the token after its input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["PYDOC", "TextCorpus", "read_documents", "load_corpus", "split_tokens", "TokenWindows", "evaluation_windows"]

PYDOC = "pydoc"  # the bundled corpus: CPython's help topics


@dataclass
class TextCorpus:
    """A tokenised corpus.

    Attributes:
        tokens: ``Tensor[N]`` uint16 (vocabularies up to 65,536 ids) or int32: every document's
            tokens followed by ``eot_token``.
        vocab_size: the tokenizer's vocabulary size (every id is below it).
        documents: how many documents (files, or pydoc topics) the stream holds.
        characters: their total length in characters.
        skipped: files of a folder that were not read, being binary or not UTF-8.
    """

    tokens: Tensor
    vocab_size: int
    documents: int
    characters: int
    skipped: list[str] = field(default_factory=list)


def _pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is binary (a NUL byte) or not UTF-8."""
    raw = path.read_bytes()
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_documents(source: str | os.PathLike) -> tuple[list[str], list[str]]:
    """``(documents, skipped)``: the texts of ``source`` and the files of a folder left out.

    ``source`` is :data:`PYDOC` (one document per help topic, sorted by name), a text file (one
    document), or a folder: every file below it, in sorted path order, skipping hidden files and
    folders (names starting with ".") and files that are binary or not UTF-8.
    """
    if str(source) == PYDOC:
        return _pydoc_documents(), []
    path = Path(source).expanduser()
    if path.is_file():
        text = _read_text(path)
        if text is None:
            raise ValueError(f"{path}: not a UTF-8 text file")
        return [text], []
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    documents, skipped = [], []
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if not file.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        text = _read_text(file)
        if text is None:
            skipped.append(str(relative))
        else:
            documents.append(text)
    if not documents:
        raise ValueError(
            f"{path}: no UTF-8 text file in the folder"
            + (f" ({len(skipped)} binary or non-UTF-8 files skipped)" if skipped else "")
        )
    return documents, skipped


def load_corpus(source: str | os.PathLike, tokenizer) -> TextCorpus:
    """Read ``source`` (see :func:`read_documents`) and tokenise it once with ``tokenizer`` (a
    :mod:`fastdl.data.tokenizer` one, or anything with the same ``encode``, ``eot_token`` and
    ``vocab_size``). A document that contains the text ``<|endoftext|>`` keeps it as ordinary
    characters: only the separators are the special token. Raises ValueError for a corpus
    without a single character."""
    documents, skipped = read_documents(source)
    characters = sum(len(text) for text in documents)
    if characters == 0:
        raise ValueError(f"{source}: the corpus is empty ({len(documents)} documents, 0 characters)")
    vocab_size, eot = int(tokenizer.vocab_size), int(tokenizer.eot_token)
    dtype = np.uint16 if vocab_size <= 2**16 else np.int32
    pieces = []
    for text in documents:
        ids = np.asarray(tokenizer.encode(text, disallowed_special=()) + [eot], dtype=np.int64)
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(
                f"the tokenizer gave ids in [{ids.min()}, {ids.max()}], outside its vocab_size {vocab_size}"
            )
        pieces.append(ids.astype(dtype))
    tokens = torch.from_numpy(np.concatenate(pieces))
    return TextCorpus(tokens, vocab_size, len(documents), characters, skipped)


def split_tokens(tokens: Tensor, val_fraction: float) -> tuple[Tensor, Tensor]:
    """``(train, val)``: the first ``1 - val_fraction`` of ``tokens [N]`` and the rest (views)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    n_val = int(round(tokens.numel() * val_fraction))
    return tokens[: tokens.numel() - n_val], tokens[tokens.numel() - n_val :]


def _check_stream(tokens: Tensor, block_size: int, name: str) -> None:
    if tokens.dim() != 1:
        raise ValueError(f"{name}: expected a token stream Tensor[N], got shape {list(tokens.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if tokens.numel() < block_size + 1:
        raise ValueError(
            f"the {name} has {tokens.numel():,} tokens, fewer than one window of block_size + 1 = {block_size + 1:,}"
        )


def _gather(tokens: Tensor, starts: Tensor, length: int) -> Tensor:
    """``Tensor[len(starts), length]`` int64: ``tokens[s : s + length]`` for each start."""
    return tokens[starts[:, None] + torch.arange(length)].long()


class TokenWindows:
    """Training windows of a token stream ``tokens [N]``, ``batch_size`` at a time.

    Each epoch cuts the stream into ``n = max(1, (N - T) // T)`` windows of ``T + 1`` tokens
    (``T = block_size``), each starting ``T`` after the previous one from a random phase, and
    visits them in a random order: within an epoch no two windows share a target token, and
    the phase moves the cuts from epoch to epoch. A micro-batch is the next ``batch_size``
    windows of that order; the windows left over at the end of an epoch are dropped. The
    phase and the order come from ``generator`` alone, so a seed fixes the whole sequence.

    Under DDP every rank draws the same global micro-batch and keeps its contiguous share
    (``tensor_split`` into ``world_size`` parts: the shares differ by at most one window, the
    first ranks taking the larger ones). The windows a step trains on therefore do not depend
    on the number of processes.
    """

    def __init__(
        self,
        tokens: Tensor,
        block_size: int,
        batch_size: int,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_stream(tokens, block_size, "training split")
        if batch_size < world_size:
            raise ValueError(f"batch_size {batch_size} gives some of the {world_size} processes no window")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.generator, self.rank, self.world_size = generator, rank, world_size
        self.windows_per_epoch = max(1, (tokens.numel() - block_size) // block_size)
        if self.windows_per_epoch < batch_size:
            raise ValueError(
                f"batch_size {batch_size}: the training split's {tokens.numel():,} tokens make only "
                f"{self.windows_per_epoch} windows of block_size + 1 = {block_size + 1} tokens per epoch"
            )
        self.epoch = 0  # epochs begun
        self.position = 0  # windows of the current order already used
        self.phase = 0
        self.order: Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.windows_per_epoch // self.batch_size

    def _begin_epoch(self) -> None:
        slack = self.tokens.numel() - 1 - self.windows_per_epoch * self.block_size  # room for the phase
        self.phase = int(torch.randint(slack + 1, (1,), generator=self.generator))
        self.order = torch.randperm(self.windows_per_epoch, generator=self.generator)
        self.position = 0
        self.epoch += 1

    def next_global_starts(self) -> Tensor:
        """``Tensor[batch_size]`` int64: where the next micro-batch's windows start, over all ranks."""
        if self.order is None or self.position + self.batch_size > self.windows_per_epoch:
            self._begin_epoch()
        chosen = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.phase + chosen * self.block_size

    def next_starts(self) -> Tensor:
        """``Tensor[b]`` int64: this rank's share of :meth:`next_global_starts`."""
        return self.next_global_starts().tensor_split(self.world_size)[self.rank]

    def next_batch(self, device: torch.device | str | None = None) -> Tensor:
        """This rank's windows of the next micro-batch: ``Tensor[b, T + 1]`` int64 on ``device``."""
        return _gather(self.tokens, self.next_starts(), self.block_size + 1).to(device)

    def state_dict(self) -> dict:
        """Where the sequence stands (generator included): :meth:`load_state_dict` continues it."""
        return {
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "position": self.position,
            "phase": self.phase,
            "order": self.order,
            "windows_per_epoch": self.windows_per_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["windows_per_epoch"] != self.windows_per_epoch:
            raise ValueError(
                f"the saved windows cut {state['windows_per_epoch']} per epoch, these "
                f"{self.windows_per_epoch}: another corpus, split or block_size"
            )
        self.generator.set_state(state["generator"])
        self.epoch, self.position, self.phase, self.order = (
            state["epoch"],
            state["position"],
            state["phase"],
            state["order"],
        )


def evaluation_windows(tokens: Tensor, block_size: int, max_windows: int | None = None) -> Tensor:
    """Fixed windows of a split, ``Tensor[W, T + 1]`` int64: the stream cut every ``T`` tokens
    from its start (no two windows share a target token), or ``max_windows`` of those cuts
    spread evenly through it."""
    _check_stream(tokens, block_size, "validation split")
    count = (tokens.numel() - 1) // block_size
    starts = torch.arange(count) * block_size
    if max_windows is not None and max_windows < count:
        starts = starts[torch.linspace(0, count - 1, max_windows, dtype=torch.float64).round().long()]
    return _gather(tokens, starts, block_size + 1)
