"""The fastdl 2048 engine: exact game rules and a fast multi-threaded expectimax search.

The core is C++ (:mod:`fastdl.game2048._engine`, no torch); this module wraps it with input
validation and friendlier types. See docs/game2048.md for the rules, the search variants and
the precise definitions of the ``snake`` and ``notes`` heuristics.
"""

from __future__ import annotations

import enum
import os
import random
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, field

from . import _engine
from ._engine import Rng, SearchCancelled
from .ntuple import NTupleNetwork

__all__ = [
    "Board",
    "Direction",
    "Engine",
    "GameResult",
    "IllegalMoveError",
    "NTupleNetwork",
    "Rng",
    "SearchCancelled",
    "SearchResult",
    "play_game",
    "play_games",
]

MAX_TILE = 1 << _engine.MAX_RANK  # 32768: the largest tile one 4-bit cell can hold


class Direction(enum.IntEnum):
    UP = 0
    DOWN = 1
    LEFT = 2
    RIGHT = 3

    @classmethod
    def parse(cls, direction) -> Direction:
        """A Direction from a Direction, its name ("up", any case) or its integer value."""
        if isinstance(direction, str):
            try:
                return cls[direction.strip().upper()]
            except KeyError:
                pass
        elif isinstance(direction, int) and not isinstance(direction, bool) and 0 <= direction < 4:
            return cls(direction)
        raise ValueError(f"unknown direction {direction!r}: expected 'up', 'down', 'left', 'right' or a Direction")

    def __str__(self) -> str:
        return self.name.lower()


class IllegalMoveError(ValueError):
    """The move does not change the board."""


def _rank_of(tile) -> int:
    if isinstance(tile, bool) or not isinstance(tile, int):
        raise ValueError(f"tile {tile!r} is not an integer")
    if tile == 0:
        return 0
    if tile < 2 or tile & (tile - 1):
        raise ValueError(f"tile {tile} is not 0 or a power of two >= 2")
    if tile > MAX_TILE:
        raise ValueError(f"tile {tile} is larger than {MAX_TILE}, the largest tile a board cell can hold")
    return tile.bit_length() - 1


class Board:
    """An immutable 4x4 board plus the score accumulated by the moves that led to it.

    ``Board([[0, 2, 0, 0], ...])`` takes four rows of four tile values (0 = empty, top row first);
    ``Board(bits)`` takes the 64-bit encoding (cell (r, c) = bits 16r+4c..16r+4c+3, log2 of the tile).
    """

    __slots__ = ("_bits", "_score")

    def __init__(self, tiles=0, *, score: int = 0):
        if isinstance(tiles, Board):
            bits = tiles._bits
        elif isinstance(tiles, int) and not isinstance(tiles, bool):
            if not 0 <= tiles < 1 << 64:
                raise ValueError(f"board integer {tiles} is outside [0, 2**64)")
            bits = tiles
        elif isinstance(tiles, (list, tuple)):
            bits = self._encode(tiles)
        else:
            raise ValueError(f"cannot make a board from {type(tiles).__name__}: expected 4x4 nested lists or an int")
        if isinstance(score, bool) or not isinstance(score, int) or score < 0:
            raise ValueError(f"score must be a non-negative integer, got {score!r}")
        self._bits = bits
        self._score = score

    @staticmethod
    def _encode(rows) -> int:
        if len(rows) != 4 or any(not isinstance(row, (list, tuple)) or len(row) != 4 for row in rows):
            shape = [len(row) if isinstance(row, (list, tuple)) else "?" for row in rows]
            raise ValueError(f"a board is 4 rows of 4 tiles, got rows of lengths {shape}")
        bits = 0
        for r, row in enumerate(rows):
            for c, tile in enumerate(row):
                bits |= _rank_of(tile) << (16 * r + 4 * c)
        return bits

    # ---- views ------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self._bits

    def __int__(self) -> int:
        return self._bits

    @property
    def score(self) -> int:
        """Sum of the tiles created by merges on the way to this board."""
        return self._score

    def ranks(self) -> list[list[int]]:
        return [[(self._bits >> (16 * r + 4 * c)) & 0xF for c in range(4)] for r in range(4)]

    def to_list(self) -> list[list[int]]:
        return [[1 << rank if rank else 0 for rank in row] for row in self.ranks()]

    @property
    def max_tile(self) -> int:
        return max(max(row) for row in self.to_list())

    @property
    def empty_cells(self) -> int:
        return _engine.count_empty(self._bits)

    # ---- rules ------------------------------------------------------------------------------
    def move(self, direction) -> Board:
        """The board after sliding; raises IllegalMoveError when nothing changes and
        OverflowError when two 32768 tiles would merge (65536 does not fit in a cell)."""
        direction = Direction.parse(direction)
        bits, gain, overflow = _engine.move(self._bits, int(direction))
        if overflow:
            raise OverflowError("this move merges two 32768 tiles into 65536, beyond the 4-bit cell limit")
        if bits == self._bits:
            raise IllegalMoveError(f"moving {direction} does not change the board")
        return Board(bits, score=self._score + gain)

    def legal_moves(self) -> list[Direction]:
        """Directions that change the board (including one that would overflow past 32768)."""
        legal = []
        for direction in Direction:
            bits, _, overflow = _engine.move(self._bits, int(direction))
            if bits != self._bits or overflow:
                legal.append(direction)
        return legal

    def is_over(self) -> bool:
        return not self.legal_moves()

    def spawn(self, rng) -> Board:
        """A 2 (p=0.9) or 4 (p=0.1) on a uniformly chosen empty cell. ``rng`` is a
        :class:`Rng` (reproducible across platforms) or a :class:`random.Random`."""
        if self.empty_cells == 0:
            raise ValueError("cannot spawn a tile: the board is full")
        if isinstance(rng, Rng):
            return Board(_engine.spawn(self._bits, rng), score=self._score)
        if isinstance(rng, random.Random):
            empty = [cell for cell in range(16) if not (self._bits >> (4 * cell)) & 0xF]
            cell = empty[rng.randrange(len(empty))]
            rank = 2 if rng.random() < 0.1 else 1
            return Board(self._bits | rank << (4 * cell), score=self._score)
        raise ValueError(f"rng must be a fastdl.game2048.Rng or a random.Random, got {type(rng).__name__}")

    @classmethod
    def new_game(cls, rng) -> Board:
        """An empty board with the two starting tiles."""
        return cls().spawn(rng).spawn(rng)

    # ---- python protocol --------------------------------------------------------------------
    def __eq__(self, other) -> bool:
        return isinstance(other, Board) and other._bits == self._bits

    def __hash__(self) -> int:
        return hash(self._bits)

    def __repr__(self) -> str:
        return f"Board({self.to_list()!r}, score={self._score})"

    def __str__(self) -> str:
        rows = self.to_list()
        width = max(4, len(str(self.max_tile)))
        border = "+" + "+".join("-" * (width + 2) for _ in range(4)) + "+"
        lines = [border]
        for row in rows:
            lines.append("|" + "|".join(f" {tile if tile else '.':>{width}} " for tile in row) + "|")
            lines.append(border)
        lines.append(f"score {self._score}")
        return "\n".join(lines)


@dataclass(frozen=True)
class SearchResult:
    move: Direction | None  # None: no move is possible
    values: dict[Direction, float]  # expectimax value of every available root move
    depth: int  # root depth of the values: the deepest completed search
    nodes: int  # every node visited, an interrupted last depth included
    evaluations: int
    cache_hits: int
    seconds: float
    target_depth: int = 0  # the configured or adaptive depth
    budget_exhausted: bool = False  # the budget stopped the search before target_depth
    threads: int = 1  # threads that searched (0: nothing to search; small trees: 1)


@dataclass
class GameResult:
    seed: int
    max_tile: int
    score: int
    moves: int
    seconds: float
    nodes: int
    final_board: Board
    hit_65536_limit: bool
    move_log: list[Direction] | None = field(default=None, repr=False)
    budget_stops: int = 0  # decisions whose search the budget cut short

    @property
    def moves_per_second(self) -> float:
        return self.moves / self.seconds if self.seconds else float("inf")


class Engine:
    """Expectimax search. Every setting is checked by the C++ engine: a bad value raises
    ValueError naming it (ranges in docs/game2048.md).

    heuristic: "default" (strong, per-line tables, probability cutoff, transposition table),
        "snake" or "notes" (the course notes' evaluations and plain searches, see the docs), or
        "ntuple" (a trained n-tuple network, given as ``weights``; depth 1 = the greedy policy).
    depth: root depth, 1..max_depth(heuristic) (default 16, snake 6, notes 12, ntuple 8); None or
        0 = the heuristic's policy (default: max(3, distinct tiles - 2); snake: 3; notes: 4/5/6 by
        the number of empty cells; ntuple: 2).
    threads: search threads, 1..256 (None or 0 = all cores); a decision uses at most 4 (one per
        root move), and small trees stay on the calling thread (see the docs). Results do not
        depend on it.
    prob_cutoff: default and ntuple heuristics (checked but unused otherwise), in [1e-6, 1): chance nodes
        reached with a lower probability are evaluated instead of expanded.
    cache: use the transposition table.
    weights: default-heuristic weights to override (see DEFAULT_WEIGHTS): coefficients finite in
        [-1e9, 1e9], the two powers in [0, 8]. For "ntuple": the network, a path to a weights file
        (see NTupleNetwork.load) or an NTupleNetwork.
    max_nodes, time_limit: the default budget of every decision (None = no limit): at most
        max_nodes search nodes (a positive integer) and time_limit seconds (in (0, 86400]). With a
        budget the search deepens iteratively and returns the deepest completed depth.
    """

    DEFAULT_WEIGHTS = {
        "lost_penalty": 200000.0,
        "empty": 270.0,
        "merges": 700.0,
        "monotonicity": 47.0,
        "monotonicity_power": 4.0,
        "sum": 11.0,
        "sum_power": 3.5,
    }

    def __init__(
        self,
        depth: int | None = None,
        threads: int | None = None,
        heuristic: str = "default",
        prob_cutoff: float = 1e-4,
        cache: bool = True,
        weights: dict | None = None,
        max_nodes: int | None = None,
        time_limit: float | None = None,
    ):
        if heuristic == "ntuple":
            weights = _network_from(weights)
        elif weights is not None and not isinstance(weights, dict):
            raise ValueError(f"weights must be None or a dict, got {weights!r}")
        else:
            weights = dict(weights or {})
        self.depth, self.threads, self.heuristic = depth, threads, heuristic
        self.prob_cutoff, self.cache, self.weights = prob_cutoff, cache, weights
        self.max_nodes, self.time_limit = max_nodes, time_limit
        self._core = self._make_core(threads)

    def _make_core(self, threads):
        weights = self.weights._core if isinstance(self.weights, NTupleNetwork) else self.weights
        return _engine.Engine(
            self.heuristic,
            0 if self.depth is None else self.depth,
            self.prob_cutoff,
            self.cache,
            0 if threads is None else threads,
            weights,
            self.max_nodes,
            self.time_limit,
        )

    @staticmethod
    def max_depth(heuristic: str = "default") -> int:
        """The deepest explicit ``depth`` a heuristic accepts."""
        return _engine.max_depth(heuristic)

    @classmethod
    def fast(cls, threads: int | None = None) -> Engine:
        """A quick preset: default heuristic at depth 2 (thousands of moves per second)."""
        return cls(depth=2, threads=threads)

    def __repr__(self) -> str:
        budget = "".join(
            f", {name}={getattr(self, name)!r}"
            for name in ("max_nodes", "time_limit")
            if getattr(self, name) is not None
        )
        return (
            f"Engine(depth={self.depth}, threads={self.threads}, heuristic={self.heuristic!r}, "
            f"prob_cutoff={self.prob_cutoff}, cache={self.cache}{budget})"
        )

    def evaluate(self, board) -> float:
        """The heuristic value of a position."""
        return self._core.evaluate(Board(board).bits)

    def root_depth(self, board) -> int:
        return self._core.root_depth(Board(board).bits)

    def best_move(self, board, *, max_nodes=..., time_limit=...) -> SearchResult:
        """The search's move. ``max_nodes`` / ``time_limit`` override the engine's budget for this
        call (None = no limit; omitted = the engine's). Ctrl-C (on the main thread) interrupts
        the search within about 20 ms with KeyboardInterrupt."""
        raw = self._core.best_move(Board(board).bits, max_nodes, time_limit)
        return _search_result(raw)

    def _play(self, seed: int, record_moves: bool, core=None, cancel=None) -> GameResult:
        raw = (core or self._core).play_game(seed, record_moves, cancel)
        return GameResult(
            seed=seed,
            max_tile=raw["max_tile"],
            score=raw["score"],
            moves=raw["moves"],
            seconds=raw["seconds"],
            nodes=raw["stats"]["nodes"],
            final_board=Board(raw["final_board"], score=raw["score"]),
            hit_65536_limit=raw["hit_65536_limit"],
            move_log=[Direction(m) for m in raw["move_log"]] if record_moves else None,
            budget_stops=raw["budget_stops"],
        )


def _network_from(weights) -> NTupleNetwork:
    if isinstance(weights, NTupleNetwork):
        return weights
    if isinstance(weights, (str, os.PathLike)):
        return NTupleNetwork.load(weights)
    if weights is None:
        raise ValueError(
            "weights must name the network of the ntuple heuristic (a weights file or an "
            "NTupleNetwork); none ships with fastdl: train one with `fastdl 2048 train`"
        )
    raise ValueError(
        f"weights must be a weights file path or an NTupleNetwork for the ntuple heuristic, got {weights!r}"
    )


def _search_result(raw) -> SearchResult:
    values = {d: v for d, v in zip(Direction, raw["values"]) if v == v}  # drop NaN (unavailable)
    stats = raw["stats"]
    return SearchResult(
        move=Direction(raw["move"]) if raw["move"] >= 0 else None,
        values=values,
        depth=raw["depth"],
        nodes=stats["nodes"],
        evaluations=stats["evaluations"],
        cache_hits=stats["cache_hits"],
        seconds=raw["seconds"],
        target_depth=raw["target_depth"],
        budget_exhausted=raw["budget_exhausted"],
        threads=raw["threads"],
    )


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return seed


def play_game(seed: int = 0, engine: Engine | None = None, record_moves: bool = False) -> GameResult:
    """One self-play game from an empty board (two spawned tiles), tiles drawn from Rng(seed).
    Every decision uses the engine's budget. Interruptible with Ctrl-C on the main thread."""
    return (engine or Engine())._play(_check_seed(seed), record_moves)


def game_seeds(n: int, seed: int = 0) -> list[int]:
    """The seeds play_games uses: the first n outputs of Rng(seed)."""
    rng = Rng(_check_seed(seed))
    return [rng.next() for _ in range(n)]


def play_games(
    n: int,
    seed: int = 0,
    engine: Engine | None = None,
    threads: int | None = None,
    record_moves: bool = False,
    progress=None,
) -> list[GameResult]:
    """n games in parallel, one search thread per game, ``threads`` games at a time (None = all
    cores, else 1..256). Game i is play_game(game_seeds(n, seed)[i]), so results do not depend on
    ``threads``. ``progress(result)`` is called as each game ends. An exception in the calling
    thread (Ctrl-C: KeyboardInterrupt) stops the running games promptly and is re-raised."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= _engine.MAX_THREADS
    ):
        raise ValueError(f"threads must be None or an integer in [1, {_engine.MAX_THREADS}], got {threads!r}")
    seeds = game_seeds(n, seed)
    engine = engine or Engine()
    single_threaded = engine._make_core(1)  # games are the unit of parallelism here
    workers = threads or os.cpu_count() or 1
    cancel = _engine.CancelToken()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(engine._play, s, record_moves, single_threaded, cancel) for s in seeds]
        results = []
        try:
            for future in futures:
                while not future.done():  # short waits: the main thread handles signals in between
                    wait_for_futures([future], timeout=0.1)
                results.append(future.result())
                if progress:
                    progress(results[-1])
        except BaseException:
            cancel.cancel()  # the running games raise SearchCancelled, the queued ones never start
            for future in futures:
                future.cancel()
            raise
    return results
