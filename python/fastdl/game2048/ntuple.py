"""n-tuple networks for 2048: an evaluation learned by TD(0) afterstate learning.

The network and its training are C++ (:class:`fastdl.game2048._engine.NTupleNetwork`); this
module adds the weights file format, checked loading and the training loop behind
``fastdl 2048 train``. See docs/game2048.md, "n-tuple network".
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from . import _engine

__all__ = ["DEFAULT_TUPLES", "NTupleNetwork", "TrainingGame"]

# Two 2x3 rectangles and two "row + two cells" shapes (cells are 4 * row + column), each applied
# under the 8 symmetries of the board: docs/game2048.md says why.
DEFAULT_TUPLES = ((0, 1, 2, 3, 4, 5), (4, 5, 6, 7, 8, 9), (0, 1, 2, 4, 5, 6), (4, 5, 6, 8, 9, 10))

# File layout (little-endian): magic, version, tuple count, games trained, training seed, then per
# tuple its length (one byte) and its cells (one byte each), then one zlib stream holding every
# tuple's 16^length float32 weights, tuple after tuple.
MAGIC = b"FDL2048N"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")


@dataclass(frozen=True)
class TrainingGame:
    score: int
    max_tile: int
    moves: int


class NTupleNetwork:
    """``tuples`` x 8 symmetries; tuple i owns ``weights(i)``, 16^len(tuples[i]) float32 weights
    (zero at first). ``seed`` fixes the training games: game g of the network's training draws
    its tiles from ``Rng(seed + g)``."""

    def __init__(self, tuples=DEFAULT_TUPLES, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self._core = _engine.NTupleNetwork(tuples)
        self.seed = seed

    @property
    def tuples(self) -> list[list[int]]:
        return self._core.tuples

    @property
    def games_trained(self) -> int:
        return self._core.games_trained

    def weights(self, tuple_index: int) -> np.ndarray:
        """A writable float32 view of one tuple's weights."""
        return self._core.weights(tuple_index)

    def value(self, board) -> float:
        """The network's value of an afterstate: the score it expects still to come."""
        from . import Board

        return self._core.value(Board(board).bits)

    def train(self, games: int, *, threads: int = 1, alpha: float = 0.1) -> list[TrainingGame]:
        """Trains on the next ``games`` greedy self-play games (TD(0), step ``alpha`` for the value
        as a whole, i.e. alpha / (8 * tuples) per weight). One thread: bit-reproducible; more:
        lock-free shared updates (see the docs). Releases the GIL."""
        if isinstance(games, bool) or not isinstance(games, int) or games < 0:
            raise ValueError(f"games must be a non-negative integer, got {games!r}")
        raw = self._core.train(self.seed, games, threads, alpha)
        return [TrainingGame(*game) for game in raw]

    # ---- files --------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Writes the network to ``path`` atomically (a temporary file, then a rename)."""
        tuples = self.tuples
        parts = [_HEADER.pack(MAGIC, VERSION, len(tuples), self.games_trained, self.seed)]
        parts += [bytes([len(t), *t]) for t in tuples]
        compressor = zlib.compressobj(level=1)  # mostly zeros: level 1 already shrinks it well
        data = [compressor.compress(self.weights(i).astype("<f4", copy=False).tobytes()) for i in range(len(tuples))]
        parts += data + [compressor.flush()]
        temporary = f"{os.fspath(path)}.tmp"
        with open(temporary, "wb") as f:
            for part in parts:
                f.write(part)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path) -> NTupleNetwork:
        """Reads a network written by :meth:`save`. Anything wrong (not such a file, another
        version, bad tuples, truncated or extra data, NaN or infinite weights) raises ValueError
        naming the file and the problem."""
        name = os.fspath(path)
        with open(name, "rb") as f:
            blob = f.read()

        def fail(problem: str):
            raise ValueError(f"{name}: {problem}")

        if len(blob) < _HEADER.size:
            fail(f"too short for an n-tuple network file ({len(blob)} bytes)")
        magic, version, count, games_trained, seed = _HEADER.unpack_from(blob)
        if magic != MAGIC:
            fail(f"not an n-tuple network file (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            fail(f"unsupported version {version} (this fastdl reads version {VERSION})")
        if not 1 <= count <= _engine.MAX_TUPLES:
            fail(f"tuple count {count} is outside [1, {_engine.MAX_TUPLES}]")
        offset, tuples = _HEADER.size, []
        for i in range(count):
            if offset >= len(blob):
                fail(f"truncated in the shape of tuple {i}")
            length = blob[offset]
            cells = list(blob[offset + 1 : offset + 1 + length])
            if len(cells) != length:
                fail(f"truncated in the shape of tuple {i}")
            tuples.append(cells)
            offset += 1 + length
        try:
            network = cls(tuples, seed=seed)
        except ValueError as error:
            fail(f"bad tuple shapes: {error}")
        decompressor = zlib.decompressobj()
        sizes = [1 << (4 * len(t)) for t in tuples]
        expected = 4 * sum(sizes)
        try:
            # max_length bounds the memory a corrupt stream could ask for.
            data = decompressor.decompress(blob[offset:], expected + 1)
        except zlib.error as error:
            fail(f"corrupt weight data ({error})")
        if not decompressor.eof:
            fail(f"weight data truncated or too long: expected {expected} bytes of float32 weights")
        if len(data) != expected:
            fail(f"weight data has {len(data)} bytes, expected {expected} for tuples {tuples}")
        if decompressor.unused_data:
            fail(f"{len(decompressor.unused_data)} unexpected bytes after the weight data")
        start = 0
        for i, size in enumerate(sizes):
            table = np.frombuffer(data, dtype="<f4", count=size, offset=4 * start)
            if not np.isfinite(table).all():
                bad = int(np.flatnonzero(~np.isfinite(table))[0])
                fail(f"tuple {i} has a non-finite weight ({table[bad]} at index {bad})")
            network.weights(i)[:] = table
            start += size
        network._core.games_trained = games_trained
        return network

    def __repr__(self) -> str:
        return f"NTupleNetwork(tuples={self.tuples}, seed={self.seed}, games_trained={self.games_trained})"


def rates(games, tiles=(2048, 8192, 16384)) -> dict[int, float]:
    """The share of ``games`` (TrainingGame or GameResult) whose max tile reached each tile."""
    n = max(len(games), 1)
    return {tile: sum(g.max_tile >= tile for g in games) / n for tile in tiles}
