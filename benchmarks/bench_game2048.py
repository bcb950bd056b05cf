"""2048 engine speed (pytest-benchmark).

* snake / notes: one decision of fastdl's search against the straightforward pure-Python search
  (fastdl.game2048.reference) on the same positions; ``extra_info["speedup"]`` is the ratio.
* default heuristic: search nodes per second on one thread.
* small decisions: the time of one shallow decision (fast preset, snake depth 3) on a few boards
  with one thread and with all threads; equal when small trees stay on the calling thread.
* n-tuple network (the default four 6-tuples, briefly trained): TD training moves and games per
  second on one thread, and evaluations per second of a depth-2 search.

    pytest benchmarks/bench_game2048.py --benchmark-only
"""

import time

import pytest

from fastdl.game2048 import Board, Engine, NTupleNetwork, Rng, play_game
from fastdl.game2048 import reference


def positions_from_a_game(count, min_empty, max_empty, seed=2):
    """Positions along one fast-preset game whose empty-cell count is in [min_empty, max_empty]
    (few empty cells keep the Python search affordable)."""
    game = play_game(seed=seed, engine=Engine.fast(threads=1), record_moves=True)
    rng = Rng(seed)
    board = Board.new_game(rng)
    found = []
    for move in game.move_log:
        if min_empty <= board.empty_cells <= max_empty and board.legal_moves() and len(found) < count:
            found.append(board)
        board = board.move(move).spawn(rng)
    return found[:: max(1, len(found) // count)][:count] if len(found) > count else found


SEARCHES = {
    "snake": (lambda grid: reference.snake_best_move(grid), {"heuristic": "snake"}),
    "notes": (lambda grid: reference.notes_best_move(grid), {"heuristic": "notes"}),
}


@pytest.fixture(scope="module")
def positions():
    # Sampled once along a game; late-game positions with 3-5 empty cells.
    return positions_from_a_game(count=40, min_empty=3, max_empty=5)[-4:]


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_decision_fastdl_vs_python(benchmark, positions, name):
    python_search, engine_kwargs = SEARCHES[name]
    engine = Engine(threads=1, **engine_kwargs)
    grids = [board.to_list() for board in positions]

    start = time.perf_counter()
    python_moves = [python_search(grid)[0] for grid in grids]
    python_per_decision = (time.perf_counter() - start) / len(grids)

    results = benchmark(lambda: [engine.best_move(board) for board in positions])
    assert [str(r.move) for r in results] == python_moves  # same search, same decisions
    fastdl_per_decision = benchmark.stats.stats.mean / len(positions)
    benchmark.extra_info.update(
        python_seconds_per_decision=python_per_decision,
        fastdl_seconds_per_decision=fastdl_per_decision,
        speedup=python_per_decision / fastdl_per_decision,
    )
    print(
        f"\n{name}: python {python_per_decision * 1e3:.1f} ms, fastdl {fastdl_per_decision * 1e6:.1f} us "
        f"per decision: {python_per_decision / fastdl_per_decision:.0f}x"
    )


def test_default_nodes_per_second(benchmark):
    positions = positions_from_a_game(count=8, min_empty=2, max_empty=8, seed=5)
    engine = Engine(threads=1)
    totals = {}

    def search_all():
        totals["nodes"] = sum(engine.best_move(board).nodes for board in positions)

    benchmark.pedantic(search_all, rounds=3, iterations=1)
    nodes_per_second = totals["nodes"] / benchmark.stats.stats.mean
    benchmark.extra_info["nodes_per_second"] = nodes_per_second
    print(f"\ndefault heuristic: {nodes_per_second / 1e6:.1f} M nodes/s on one thread")


SMALL_BOARDS = {
    "open": 16777217,
    "8 tiles": 2305860601970168338,
    "11 tiles": 9376902421432766464,
    "12 tiles": 9223499787488272658,
    "13 tiles": 9525521277823098880,
    "14 tiles": 9597578871877738752,
}


@pytest.mark.parametrize("threads", [1, None])
@pytest.mark.parametrize("settings", ["fast", "snake"])
def test_small_decisions(benchmark, settings, threads):
    engine = Engine.fast(threads=threads) if settings == "fast" else Engine(heuristic="snake", threads=threads)
    boards = [Board(bits) for bits in SMALL_BOARDS.values()]
    for board in boards:
        engine.best_move(board)  # first use maps the table pages
    benchmark(lambda: [engine.best_move(board) for board in boards])
    per_decision = benchmark.stats.stats.median / len(boards)
    benchmark.extra_info["seconds_per_decision"] = per_decision
    print(f"\n{settings}, threads={threads}: {per_decision * 1e6:.1f} us per decision (median)")


def test_ntuple_training_and_search_speed(benchmark):
    network = NTupleNetwork(seed=0)
    network.train(500)  # past the first, very short games
    totals = {}

    def train():
        games = network.train(100)
        totals["moves"], totals["games"] = sum(g.moves for g in games), len(games)

    benchmark.pedantic(train, rounds=3, iterations=1)
    seconds = benchmark.stats.stats.mean
    engine = Engine(heuristic="ntuple", weights=network, depth=2, threads=1)
    positions = positions_from_a_game(count=8, min_empty=2, max_empty=8, seed=5)
    start = time.perf_counter()
    evaluations = sum(engine.best_move(board).evaluations for board in positions)
    search_seconds = time.perf_counter() - start
    benchmark.extra_info.update(
        training_moves_per_second=totals["moves"] / seconds,
        training_games_per_second=totals["games"] / seconds,
        search_evaluations_per_second=evaluations / search_seconds,
    )
    print(
        f"\nntuple: training {totals['moves'] / seconds / 1e3:.0f} k moves/s, {totals['games'] / seconds:.0f} games/s; "
        f"depth-2 search {evaluations / search_seconds / 1e6:.2f} M evaluations/s (one thread)"
    )
