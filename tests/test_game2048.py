"""fastdl.game2048: rules against a list-based reference, spawning statistics, the three
search variants against straightforward Python searches, threading, errors, budgets,
interrupts, a regression fixture of decisions and the CLI."""

import _thread
import argparse
import json
import math
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from fastdl.game2048 import (
    Board,
    Direction,
    Engine,
    IllegalMoveError,
    Rng,
    SearchCancelled,
    _engine,
    cli,
    game_seeds,
    play_game,
    play_games,
)
from fastdl.game2048.reference import (
    DIRECTIONS,
    legal_children,
    monotone,
    notes_eval,
    notes_root_depth,
    snake_eval,
    transpose,
)
from fastdl.game2048.reference import best_move as reference_best
from fastdl.game2048.reference import move as reference_move

# The list-based reference (rules, snake/notes evaluations, plain expectimax) lives in
# fastdl.game2048.reference; the C++ engine is checked against it.


def random_grid(rng, max_rank=11, empty_share=0.4):
    return [[0 if rng.random() < empty_share else 1 << rng.randint(1, max_rank) for _ in range(4)] for _ in range(4)]


@pytest.fixture
def rng():
    seed = random.randrange(2**32)
    print(f"random seed: {seed}")  # shown by pytest when a test fails
    return random.Random(seed)


# ---- rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, expected", [([2, 2, 2, 2], [4, 4, 0, 0]), ([4, 4, 8, 0], [8, 8, 0, 0]), ([2, 2, 4, 0], [4, 4, 0, 0])]
)
def test_issue_examples(row, expected):
    board = Board([row, [0] * 4, [0] * 4, [0] * 4])
    assert board.move("left").to_list()[0] == expected
    # The same row as a column, moved up, and mirrored, moved right.
    column = Board(transpose([row, [0] * 4, [0] * 4, [0] * 4]))
    assert [r[0] for r in column.move(Direction.UP).to_list()] == expected
    mirrored = Board([row[::-1], [0] * 4, [0] * 4, [0] * 4])
    assert mirrored.move("right").to_list()[0] == expected[::-1]


def test_moves_match_reference_on_random_boards(rng):
    checked = 0
    for trial in range(3000):
        grid = random_grid(rng, empty_share=rng.choice([0.1, 0.3, 0.6]))
        board = Board(grid, score=7)
        assert board.to_list() == grid
        for direction in DIRECTIONS:
            expected, gained = reference_move(grid, direction)
            if expected == grid:
                with pytest.raises(IllegalMoveError):
                    board.move(direction)
                assert Direction.parse(direction) not in board.legal_moves()
            else:
                moved = board.move(direction)
                assert moved.to_list() == expected, (grid, direction)
                assert moved.score == 7 + gained, (grid, direction)
                assert Direction.parse(direction) in board.legal_moves()
                checked += 1
        assert board.is_over() == (not board.legal_moves())
    assert checked > 5000


def test_int_round_trip_and_layout():
    board = Board([[2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 32768]])
    assert board.bits == 1 | 15 << 60  # (0, 0) is the lowest nibble, (3, 3) the highest
    assert Board(board.bits) == board
    assert board.max_tile == 32768
    text = str(board)
    assert "32768" in text and text.count("\n") >= 8


def test_game_over_detection():
    over = Board([[2, 4, 2, 4], [4, 2, 4, 2], [2, 4, 2, 4], [4, 2, 4, 2]])
    assert over.is_over() and over.legal_moves() == []
    assert Engine.fast().best_move(over).move is None
    full_with_merge = Board([[2, 4, 2, 4], [4, 2, 4, 2], [2, 4, 2, 4], [4, 2, 8, 8]])
    assert not full_with_merge.is_over()
    assert set(full_with_merge.legal_moves()) == {Direction.LEFT, Direction.RIGHT}


def test_spawn_frequencies():
    n = 20000
    rng = Rng(random.randrange(2**63))
    cell_counts, fours = [0] * 16, 0
    for _ in range(n):
        spawned = Board().spawn(rng)
        ranks = [spawned.bits >> (4 * i) & 0xF for i in range(16)]
        cell = max(range(16), key=lambda i: ranks[i])
        cell_counts[cell] += 1
        fours += ranks[cell] == 2
    sigma = math.sqrt(0.1 * 0.9 / n)
    assert abs(fours / n - 0.1) < 5 * sigma
    p = 1 / 16
    cell_sigma = math.sqrt(n * p * (1 - p))
    assert all(abs(count - n * p) < 5 * cell_sigma for count in cell_counts), cell_counts


def test_spawn_only_on_empty_cells_uniformly():
    board = Board([[2, 0, 4, 0], [0, 8, 0, 16], [32, 0, 64, 0], [0, 128, 0, 256]])
    empty = [i for i in range(16) if not board.bits >> (4 * i) & 0xF]
    counts = dict.fromkeys(empty, 0)
    n = 8000
    for seed_rng in (Rng(5), random.Random(5)):
        for _ in range(n // 2):
            child = board.spawn(seed_rng)
            (cell,) = [i for i in range(16) if (child.bits ^ board.bits) >> (4 * i) & 0xF]
            counts[cell] += 1
    p = 1 / len(empty)
    assert all(abs(c - n * p) < 5 * math.sqrt(n * p * (1 - p)) for c in counts.values()), counts
    with pytest.raises(ValueError):
        Board([[2, 4, 2, 4], [4, 2, 4, 2], [2, 4, 2, 4], [4, 2, 4, 2]]).spawn(Rng(0))


def test_rng_is_reproducible():
    a, b = Rng(42), Rng(42)
    assert [a.next() for _ in range(5)] == [b.next() for _ in range(5)]
    assert Rng(1).next() != Rng(2).next()


# ---- 65536 -------------------------------------------------------------------------------------


def test_merging_two_32768_raises_instead_of_wrapping():
    board = Board([[32768, 32768, 2, 4], [2, 4, 8, 16], [4, 8, 16, 32], [8, 16, 32, 64]])
    assert board.legal_moves() == [Direction.LEFT, Direction.RIGHT]  # legal by the rules...
    for direction in ("left", "right"):
        with pytest.raises(OverflowError, match="65536"):
            board.move(direction)
    assert Engine.fast().best_move(board).move is None  # ...but the engine never plays them
    with pytest.raises(ValueError, match="32768"):
        Board([[65536, 0, 0, 0], [0] * 4, [0] * 4, [0] * 4])


def test_engine_avoids_overflowing_move_when_another_exists():
    board = Board([[32768, 32768, 0, 0], [0] * 4, [0] * 4, [0] * 4])
    result = Engine.fast().best_move(board)
    assert result.move == Direction.DOWN  # left/right overflow, up does nothing
    assert set(result.values) == {Direction.DOWN}


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tiles",
    [
        [[0] * 5] * 3,
        [[0] * 4] * 3,
        [[0] * 4] * 3 + [[0] * 3],
        [[3, 0, 0, 0]] + [[0] * 4] * 3,
        [[-2, 0, 0, 0]] + [[0] * 4] * 3,
        [[1, 0, 0, 0]] + [[0] * 4] * 3,
        [["2", 0, 0, 0]] + [[0] * 4] * 3,
        [[2.0, 0, 0, 0]] + [[0] * 4] * 3,
        -1,
        1 << 64,
        "board",
    ],
)
def test_bad_boards_raise_value_error(tiles):
    with pytest.raises(ValueError):
        Board(tiles)


def test_bad_directions_and_settings():
    board = Board([[2, 0, 0, 0], [0] * 4, [0] * 4, [0] * 4])
    for bad in ("north", "", 4, -1, None, 1.0):
        with pytest.raises(ValueError, match="direction"):
            board.move(bad)
    assert board.move("DOWN") == board.move(Direction.DOWN) == board.move(1)
    with pytest.raises(ValueError):
        play_game(seed=-1, engine=Engine.fast())
    for threads in (0, -1, 1000, 2.0, True):
        with pytest.raises(ValueError, match=r"threads must be None or an integer in \[1, 256\], got"):
            play_games(1, engine=Engine.fast(), threads=threads)


# Each bad setting and (a regular expression for) its message, which names the setting and the value.
BAD_SETTINGS = [
    ({"heuristic": "greedy"}, r"unknown heuristic 'greedy'"),
    ({"heuristic": 3}, r"heuristic must be 'default', 'snake', 'notes' or 'ntuple', got 3"),
    ({"depth": 30}, r"depth must be 0 \(adaptive\) or in \[1, 16\] for the default heuristic, got 30"),
    ({"depth": 17}, r"depth must be .* got 17"),
    ({"depth": -1}, r"depth must be .* got -1"),
    ({"depth": 10**30}, r"depth must be .* got 1000000000000000000000000000000"),
    ({"depth": 2.5}, r"depth must be 0 \(adaptive\) or an integer in \[1, 16\], got 2.5"),
    ({"depth": True}, r"depth must be .* got True"),
    ({"depth": "3"}, r"depth must be .* got '3'"),
    ({"heuristic": "snake", "depth": 7}, r"in \[1, 6\] for the snake heuristic, got 7"),
    ({"heuristic": "notes", "depth": 13}, r"in \[1, 12\] for the notes heuristic, got 13"),
    ({"prob_cutoff": 0}, r"prob_cutoff must be in \[1e-06, 1\), got 0"),
    ({"prob_cutoff": 1e-7}, r"prob_cutoff must be in \[1e-06, 1\), got 1e-07"),
    ({"prob_cutoff": 1.0}, r"prob_cutoff must be .* got 1"),
    ({"prob_cutoff": 1.5}, r"prob_cutoff must be .* got 1.5"),
    ({"prob_cutoff": -0.1}, r"prob_cutoff must be .* got -0.1"),
    ({"prob_cutoff": float("nan")}, r"prob_cutoff must be .* got nan"),
    ({"prob_cutoff": float("inf")}, r"prob_cutoff must be .* got inf"),
    ({"prob_cutoff": "0.1"}, r"prob_cutoff must be .* got '0.1'"),
    ({"heuristic": "snake", "prob_cutoff": 0}, r"prob_cutoff must be .* got 0"),
    ({"threads": -1}, r"threads must be 0 \(all cores\) or in \[1, 256\], got -1"),
    ({"threads": 257}, r"threads must be .* got 257"),
    ({"threads": 1.0}, r"threads must be .* got 1.0"),
    ({"cache": "yes"}, r"cache must be True or False, got 'yes'"),
    ({"weights": {"bogus": 1}}, r"unknown heuristic weight 'bogus'"),
    ({"weights": {1: 1.0}}, r"a weight name must be a string, got 1"),
    ({"weights": [("empty", 1.0)]}, r"weights must be .* got \[\('empty', 1.0\)\]"),
    ({"weights": {"empty": float("nan")}}, r"weight empty must be a finite number in \[-1e9, 1e9\], got nan"),
    ({"weights": {"merges": float("inf")}}, r"weight merges must be .* got inf"),
    ({"weights": {"sum": -1e10}}, r"weight sum must be .* got -1e\+10"),
    ({"weights": {"sum_power": 100}}, r"weight sum_power must be a finite number in \[0, 8\], got 100"),
    ({"weights": {"monotonicity_power": -1}}, r"weight monotonicity_power must be .* got -1"),
    ({"weights": {"empty": "a lot"}}, r"weight empty must be a finite number, got 'a lot'"),
    ({"weights": {"empty": True}}, r"weight empty must be a finite number, got True"),
    ({"heuristic": "snake", "weights": {"empty": 1.0}}, r"weights apply to the default heuristic only"),
    ({"max_nodes": 0}, r"max_nodes must be None or a positive integer, got 0"),
    ({"max_nodes": -5}, r"max_nodes must be .* got -5"),
    ({"max_nodes": 1e6}, r"max_nodes must be .* got 1000000.0"),
    ({"time_limit": 0}, r"time_limit must be None or a number of seconds in \(0, 86400\], got 0"),
    ({"time_limit": -1}, r"time_limit must be .* got -1"),
    ({"time_limit": float("nan")}, r"time_limit must be .* got nan"),
    ({"time_limit": float("inf")}, r"time_limit must be .* got inf"),
    ({"time_limit": 1e6}, r"time_limit must be .* got 1e\+06"),
    ({"time_limit": "1s"}, r"time_limit must be .* got '1s'"),
]


@pytest.mark.parametrize("kwargs, message", BAD_SETTINGS, ids=[str(k) for k, _ in BAD_SETTINGS])
def test_bad_settings_name_the_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Engine(**kwargs)
    # The binding itself checks them (the Python class only forwards), so every caller is covered.
    with pytest.raises(ValueError, match=message):
        _engine.Engine(**kwargs)


def test_setting_ranges_and_their_edges_are_accepted():
    assert [Engine.max_depth(h) for h in ("default", "snake", "notes")] == [16, 6, 12]
    board = Board([[2, 4, 0, 0], [0] * 4, [0] * 4, [0] * 4])
    for kwargs in (
        {"depth": 0},
        {"depth": 16},
        {"threads": 0},
        {"threads": 256},
        {"prob_cutoff": 1e-6},
        {"prob_cutoff": 0.999},
        {"heuristic": "snake", "depth": 6},
        {"heuristic": "notes", "depth": 12},
        {"weights": {"sum_power": 8, "monotonicity_power": 0, "empty": -1e9}},
        {"max_nodes": 1},
        {"time_limit": 86400},
        {"time_limit": 1},
    ):
        engine = Engine(**kwargs)
        if kwargs.get("heuristic") is None and kwargs.get("depth", 0) == 0:
            assert engine.best_move(board).move is not None
    # 0 means what None means: the adaptive depth and all cores.
    assert Engine(depth=0).best_move(board).values == Engine().best_move(board).values

    # numpy-style integers and floats (anything with __index__ / __float__) are accepted
    class Index:
        def __index__(self):
            return 3

    assert Engine(depth=Index(), threads=Index()).root_depth(board) == 3


@pytest.mark.parametrize(
    "call",
    [
        lambda: _engine.move(-1, 0),
        lambda: _engine.move(1 << 64, 0),
        lambda: _engine.count_empty("board"),
        lambda: _engine.transpose(2.0),
        lambda: _engine.Engine().evaluate(-3),
        lambda: _engine.Engine().best_move(None),
        lambda: _engine.Engine().root_depth(True),
        lambda: _engine.spawn(-1, Rng(0)),
        lambda: _engine.Rng(-1),
        lambda: _engine.Engine().play_game(-1),
    ],
)
def test_binding_checks_boards_and_seeds(call):
    with pytest.raises(ValueError, match=r"(board|seed) must be an integer in \[0, 2\*\*64\), got"):
        call()


def test_binding_checks_the_other_arguments():
    with pytest.raises(ValueError, match="direction must be 0, 1, 2 or 3, got 4"):
        _engine.move(0, 4)
    with pytest.raises(ValueError, match="record_moves must be True or False, got 1"):
        _engine.Engine(depth=1).play_game(0, 1)
    with pytest.raises(ValueError, match=r"below\(n\) needs n > 0"):
        Rng(0).below(0)


# ---- snake and notes: reference searches -------------------------------------------------------


def test_monotone_definition():
    assert monotone([0, 2, 2, 8]) and monotone([8, 4, 0, 0]) and monotone([0, 0, 0, 0])
    assert not monotone([2, 0, 2, 0]) and not monotone([0, 4, 2, 8])
    engine = Engine(heuristic="snake")
    # Only the first row is non-monotone: its sum is the one missing from the bonus.
    grid = [[2, 0, 2, 0], [0] * 4, [0] * 4, [0] * 4]
    bonus = 2 + 2  # columns 0 and 2 are [2, 0, 0, 0]: monotone
    assert engine.evaluate(grid) == 100 * 14 + 2 * 65536 + 2 * 16384 + bonus


def assert_same_search(result, expected_move, expected_values):
    assert {str(d): v for d, v in result.values.items()}.keys() == expected_values.keys()
    for direction, value in result.values.items():
        assert value == pytest.approx(expected_values[str(direction)], rel=1e-12, abs=1e-6)
    assert str(result.move) == expected_move


def test_snake_depth1_by_hand():
    # Moving left leaves exactly one empty cell, (3, 3).
    grid = [[2, 4, 8, 16], [32, 64, 128, 256], [2, 4, 8, 16], [32, 64, 0, 128]]
    after_left = [[2, 4, 8, 16], [32, 64, 128, 256], [2, 4, 8, 16], [32, 64, 128, 0]]
    with_two = [row[:] for row in after_left]
    with_two[3][3] = 2
    with_four = [row[:] for row in after_left]
    with_four[3][3] = 4
    # Depth 1: the chance node averages over its single empty cell; its children are leaves.
    expected = 0.9 * snake_eval(with_two) + 0.1 * snake_eval(with_four)
    engine = Engine(heuristic="snake", depth=1)
    assert engine.evaluate(with_two) == snake_eval(with_two)
    result = engine.best_move(grid)
    assert result.move in Board(grid).legal_moves()
    assert result.values[Direction.LEFT] == pytest.approx(expected, rel=1e-12)


def test_snake_evaluation_matches_definition(rng):
    engine = Engine(heuristic="snake")
    notes = Engine(heuristic="notes")
    for _ in range(300):
        grid = random_grid(rng, max_rank=15)
        assert engine.evaluate(grid) == snake_eval(grid)
        assert notes.evaluate(grid) == notes_eval(grid)


def few_empty_positions(rng, count, empties):
    positions = []
    while len(positions) < count:
        grid = random_grid(rng, max_rank=9, empty_share=0.0)
        for cell in rng.sample(range(16), empties):
            grid[cell // 4][cell % 4] = 0
        if list(legal_children(grid)):
            positions.append(grid)
    return positions


def test_snake_matches_python_search(rng):
    engine = Engine(heuristic="snake", threads=1)
    for grid in few_empty_positions(rng, 3, 2):  # root depth 3 (the default), few empty cells
        result = engine.best_move(grid)
        assert result.depth == 3
        assert_same_search(result, *reference_best(grid, 3, snake_eval, 0))
    shallow = Engine(heuristic="snake", depth=2, threads=1)
    for grid in few_empty_positions(rng, 10, 4):
        assert_same_search(shallow.best_move(grid), *reference_best(grid, 2, snake_eval, 0))


def test_notes_matches_python_search(rng):
    engine = Engine(heuristic="notes", threads=1)
    # The default depth policy: depth 4 with >= 6 empty cells.
    for grid in few_empty_positions(rng, 3, 7):
        result = engine.best_move(grid)
        assert result.depth == notes_root_depth(grid) == 4
        assert_same_search(result, *reference_best(grid, 4, notes_eval, 1))
    for grid in few_empty_positions(rng, 10, 3):
        assert engine.root_depth(grid) == notes_root_depth(grid) == 5
        reduced = Engine(heuristic="notes", depth=3, threads=1)
        assert_same_search(reduced.best_move(grid), *reference_best(grid, 3, notes_eval, 1))
    assert engine.root_depth(few_empty_positions(rng, 1, 2)[0]) == 6


def test_default_depth1_structure(rng):
    # Depth 1: move value = mean over spawns of the best evaluation one move later. Only the root
    # chance node (probability 1) expands, so any cutoff in range is "no cutoff" here.
    engine = Engine(depth=1, prob_cutoff=1e-6, threads=1)
    for grid in few_empty_positions(rng, 5, 5):
        result = engine.best_move(grid)
        for direction, after in legal_children(grid):
            empty = [(i, j) for i in range(4) for j in range(4) if after[i][j] == 0]
            total = 0.0
            for i, j in empty:
                for tile, p in ((2, 0.9), (4, 0.1)):
                    child = [row[:] for row in after]
                    child[i][j] = tile
                    replies = [engine.evaluate(m) for _, m in legal_children(child)]
                    total += p * (max(replies) if replies else 0.0)  # no move: lost, worth 0
            assert result.values[Direction.parse(direction)] == pytest.approx(total / len(empty), rel=1e-12)


# ---- engine behaviour --------------------------------------------------------------------------


def midgame_positions(count, seed):
    game = play_game(seed=seed, engine=Engine.fast(threads=1), record_moves=True)
    rng = Rng(seed)
    board = Board.new_game(rng)
    positions = []
    for i, move in enumerate(game.move_log):
        if i % max(1, len(game.move_log) // count) == 0:
            positions.append(board)
        board = board.move(move).spawn(rng)
    assert board == game.final_board and board.score == game.score  # replaying the log reproduces the game
    return positions[:count]


def test_threaded_equals_single_threaded():
    single, threaded = Engine(threads=1), Engine(threads=4)
    for board in midgame_positions(6, seed=11):
        a, b = single.best_move(board), threaded.best_move(board)
        assert a.move == b.move and a.values == b.values and a.nodes == b.nodes


def test_best_move_is_always_legal(rng):
    engines = [Engine.fast(threads=1), Engine(heuristic="snake", depth=1), Engine(heuristic="notes", depth=2)]
    for _ in range(200):
        board = Board(random_grid(rng, empty_share=rng.choice([0.0, 0.1, 0.5])))
        legal = board.legal_moves()
        for engine in engines:
            move = engine.best_move(board).move
            assert (move is None) == (not legal) or board.max_tile == 32768
            assert move is None or move in legal


def test_cache_and_stats():
    board = midgame_positions(3, seed=4)[-1]
    cached, uncached = Engine(depth=3, threads=1), Engine(depth=3, threads=1, cache=False)
    a, b = cached.best_move(board), uncached.best_move(board)
    assert a.cache_hits > 0 and b.cache_hits == 0 and a.nodes < b.nodes
    assert a.evaluations > 0 and a.seconds > 0


def test_games_are_reproducible_and_legal():
    engine = Engine.fast(threads=1)
    a = play_game(seed=123, engine=engine, record_moves=True)
    b = play_game(seed=123, engine=Engine.fast(threads=2), record_moves=True)
    assert (a.score, a.moves, a.max_tile, a.move_log) == (b.score, b.moves, b.max_tile, b.move_log)
    assert a.final_board.is_over() and a.moves == len(a.move_log)
    assert play_game(seed=124, engine=engine).move_log is None
    games = play_games(3, seed=9, engine=engine, threads=2)
    assert [g.seed for g in games] == game_seeds(3, seed=9)
    assert [g.score for g in games] == [play_game(s, engine).score for s in game_seeds(3, seed=9)]


# ---- regression fixture ------------------------------------------------------------------------

# Decisions of the engine as it was before budgets, validation and the small-search changes:
# (board, move, depth, nodes, values up/down/left/right with None for an unavailable move). The
# boards are positions of the fast-preset games of seeds 3 and 8 (an open board, 8 to 14 tiles).
# The moves, depths and node counts must stay exactly the same; the values to 1e-12 (they are
# exact on the machine that made the fixture; another libm may round pow() differently).
REGRESSION_SETTINGS = {
    "default": {},
    "snake": {"heuristic": "snake"},
    "notes": {"heuristic": "notes"},
    "fast": {"depth": 2},
    "uncached": {"depth": 3, "cache": False},
}
REGRESSION = {
    "default": [
        (16777217, "left", 3, 142023, (1607959.6227196003, 1607953.569126318, 1607975.6229870094, 1607975.6229870094)),
        (
            2305860601970168338,
            "down",
            3,
            129014,
            (1604652.0952261505, 1604660.1433144738, 1604660.1433144736, 1604652.09522615),
        ),
        (6062200310255858192, "up", 3, 87959, (1588074.6614235102, 1587953.123991263, 1581083.0396274242, None)),
        (
            8075044293204521490,
            "down",
            3,
            132358,
            (1554861.701298167, 1570282.683551635, 1484376.1772564284, 1567194.8965220859),
        ),
        (
            9516179890938843392,
            "up",
            3,
            124209,
            (1565202.9688966589, 1565073.141122286, 1522059.8438703935, 1562058.1903773174),
        ),
        (
            10822786664663884304,
            "right",
            4,
            554149,
            (1454198.1285081133, 1531880.4793670313, 1525539.6837090182, 1532363.4436889358),
        ),
        (
            1230045721240010752,
            "up",
            3,
            169831,
            (1606939.5577389086, 1606927.4387427927, 1606360.0677207822, 1606359.1493002663),
        ),
        (149181819264443206, "up", 3, 66778, (1583791.6246299893, 1582592.2521610989, None, 1581215.1942180644)),
        (
            9291028180055128,
            "up",
            4,
            327694,
            (1549800.0535409418, 1543750.9199946271, 1548341.6117418646, 1547185.0833555248),
        ),
        (
            1153768274609456233,
            "up",
            4,
            515573,
            (1520886.02321281, 1502490.9144386603, 1519601.6373906983, 1465097.7650548166),
        ),
        (
            9376902421432766464,
            "right",
            4,
            648096,
            (1544160.047753691, 1544193.432775399, 1500400.6165172367, 1544393.2522743915),
        ),
        (9223499787488272658, "down", 4, 549061, (None, 1542566.1214562764, 1462428.845866251, 1539194.80972232)),
        (
            9525521277823098880,
            "down",
            4,
            656934,
            (1538071.9435714632, 1542000.3770504356, 1498434.480547996, 1540979.459672214),
        ),
        (9597578871877738752, "up", 5, 1895295, (1538624.3727212287, None, 1494633.5176529563, 1538439.4557862151)),
    ],
    "snake": [
        (16777217, "left", 3, 58057, (362013.94985718455, 354163.49162407644, 368956.9798500785, 324463.1199779185)),
        (
            2305860601970168338,
            "up",
            3,
            33950,
            (735667.9034431699, 689360.2365621927, 565506.4827669681, 566179.4554941603),
        ),
        (6062200310255858192, "left", 3, 21929, (1503785.7712540014, 1417823.8040420276, 1534108.9249603178, None)),
        (
            8075044293204521490,
            "down",
            3,
            34430,
            (1393036.7066078994, 2584034.033396544, 1090284.730397222, 1173173.5685848214),
        ),
        (
            9516179890938843392,
            "right",
            3,
            31849,
            (808474.8093375796, 2114119.8867337373, 2461553.72720636, 2649605.488699253),
        ),
        (
            10822786664663884304,
            "down",
            3,
            16293,
            (2763309.257276191, 2903377.0742548574, 2609220.0758888894, 2687819.1181837036),
        ),
        (
            1230045721240010752,
            "left",
            3,
            58073,
            (424234.0489378272, 473633.8874537778, 687380.4252655512, 551155.8522000501),
        ),
        (149181819264443206, "up", 3, 17070, (5512490.661131627, 4870876.475550239, None, 5208714.137660285)),
        (
            9291028180055128,
            "left",
            3,
            9554,
            (18251963.460274003, 18004339.862000003, 18263614.806041665, 18244393.377127778),
        ),
        (
            1153768274609456233,
            "left",
            3,
            16954,
            (36261199.05236635, 35573549.69900001, 36636670.33339732, 33517434.815706242),
        ),
        (
            9376902421432766464,
            "left",
            3,
            21994,
            (1350269.2289603176, 2078396.2118167803, 2341536.3038900006, 2000805.7233095244),
        ),
        (9223499787488272658, "down", 3, 17374, (None, 3098431.625135715, 1332579.9697892065, 1508100.3463188573)),
        (
            9525521277823098880,
            "left",
            3,
            18977,
            (1342563.480775, 2165429.3920000005, 3232150.26940669, 2723724.7369634924),
        ),
        (9597578871877738752, "right", 3, 8932, (1008662.8473333335, None, 2295541.6584850005, 2538878.6339000002)),
    ],
    "notes": [
        (16777217, "left", 4, 4022, (294914.71310832025, 239456.55389324963, 313938.8551020408, 190145.1003139718)),
        (
            2305860601970168338,
            "up",
            4,
            1888,
            (534264.9862037037, 470668.83768518525, 465818.5510493827, 485630.50626543217),
        ),
        (6062200310255858192, "left", 5, 3939, (1503314.3716666668, 1418339.7566666666, 1535408.228571429, None)),
        (
            8075044293204521490,
            "up",
            4,
            1709,
            (1193421.4767407407, 987902.825154321, 866709.7157142857, 1104663.5649999997),
        ),
        (
            9516179890938843392,
            "right",
            5,
            6137,
            (800266.8679166668, 2107830.8301785714, 2452410.6984693883, 2643572.1745918365),
        ),
        (
            10822786664663884304,
            "down",
            6,
            16293,
            (2755245.707352381, 2896270.633498857, 2601175.3522222224, 2679980.9580681487),
        ),
        (
            1230045721240010752,
            "left",
            4,
            3196,
            (346544.77804407716, 347208.2925289257, 642949.7279273506, 289221.89506701636),
        ),
        (149181819264443206, "up", 5, 3410, (5513575.823333333, 4871186.997333334, None, 5208438.3232)),
        (9291028180055128, "left", 5, 2425, (18249936.2214, 18002083.42, 18261046.056666665, 18241791.726666667)),
        (
            1153768274609456233,
            "left",
            5,
            3504,
            (36253383.47464286, 35566203.16666667, 36630592.55904763, 33509321.908000007),
        ),
        (
            9376902421432766464,
            "left",
            5,
            4880,
            (1348257.3383333336, 2072123.834285715, 2335678.4993333337, 1993897.8560000006),
        ),
        (9223499787488272658, "down", 5, 3466, (None, 3092411.3195, 1327560.5073333334, 1505242.7424)),
        (
            9525521277823098880,
            "left",
            5,
            3965,
            (1335679.3375, 2160178.4887500005, 3227236.371619048, 2717066.2871428574),
        ),
        (9597578871877738752, "right", 6, 8932, (1005180.3750000002, None, 2291508.45089, 2534176.7283200007)),
    ],
    "fast": [
        (16777217, "left", 2, 16990, (1607936.8773587018, 1607936.8773587015, 1607973.6832658318, 1607973.6832658318)),
        (
            2305860601970168338,
            "down",
            2,
            7670,
            (1602833.5277670957, 1603133.784977528, 1603133.784977528, 1602833.5277670957),
        ),
        (6062200310255858192, "down", 2, 3939, (1588220.832995237, 1588584.7998222886, 1581202.5336219203, None)),
        (
            8075044293204521490,
            "down",
            2,
            6860,
            (1553562.8963911836, 1571167.5447184092, 1480717.8151373414, 1569236.601421707),
        ),
        (
            9516179890938843392,
            "down",
            2,
            6137,
            (1564686.3459121906, 1564846.3670789278, 1519843.6135566495, 1561746.742441289),
        ),
        (
            10822786664663884304,
            "right",
            2,
            3421,
            (1441476.3390922397, 1532555.9189865007, 1522714.4743080826, 1533086.9212398522),
        ),
        (
            1230045721240010752,
            "up",
            2,
            13394,
            (1607453.0076636754, 1606775.7888212374, 1606102.142970621, 1606177.199767244),
        ),
        (149181819264443206, "down", 2, 3410, (1581193.0877234184, 1583051.0396232016, None, 1580595.5529435598)),
        (
            9291028180055128,
            "up",
            2,
            2425,
            (1546928.4871289223, 1544314.1287826784, 1546828.9473901738, 1546343.2714443456),
        ),
        (
            1153768274609456233,
            "up",
            2,
            3504,
            (1522891.6700097611, 1502022.9545690352, 1522550.2798276537, 1455512.557612528),
        ),
        (
            9376902421432766464,
            "right",
            2,
            4880,
            (1537110.2697457, 1539710.1229134414, 1494221.8576703668, 1545981.7744737535),
        ),
        (9223499787488272658, "down", 2, 3466, (None, 1543738.0703367128, 1450528.1760191207, 1540604.6885032277)),
        (
            9525521277823098880,
            "right",
            2,
            3965,
            (1535103.6123443116, 1537978.4614396803, 1497185.4059082174, 1541743.9497173082),
        ),
        (9597578871877738752, "up", 2, 2088, (1541816.5170580163, None, 1484641.5787623308, 1537621.914486533)),
    ],
    "uncached": [
        (16777217, "left", 3, 4062826, (1607953.569126318, 1607953.569126318, 1607958.8605833247, 1607958.8605833247)),
        (
            2305860601970168338,
            "down",
            3,
            1315056,
            (1604652.0952261505, 1604660.1433144738, 1604660.1433144736, 1604652.09522615),
        ),
        (6062200310255858192, "up", 3, 361658, (1588074.6614235102, 1587953.123991263, 1581083.0396274242, None)),
        (
            8075044293204521490,
            "down",
            3,
            972896,
            (1554861.701298167, 1570282.683551635, 1484553.304769678, 1567263.8081831879),
        ),
        (
            9516179890938843392,
            "up",
            3,
            574588,
            (1565202.9688966589, 1565073.141122286, 1522059.8438703935, 1562058.1903773174),
        ),
        (
            10822786664663884304,
            "right",
            3,
            211853,
            (1448001.5601907598, 1531863.811437895, 1525008.3212534871, 1532899.4218776107),
        ),
        (
            1230045721240010752,
            "up",
            3,
            2469870,
            (1606939.5577389086, 1606927.4387427927, 1606360.0677207822, 1606359.1493002663),
        ),
        (149181819264443206, "up", 3, 323764, (1583791.6246299893, 1582592.2521610989, None, 1581215.1942180644)),
        (
            9291028180055128,
            "up",
            3,
            140639,
            (1549397.008058244, 1544157.4030810841, 1547217.8141836545, 1547430.9695199416),
        ),
        (
            1153768274609456233,
            "up",
            3,
            238119,
            (1521705.914139468, 1501052.088730346, 1520771.852386539, 1459528.1303761583),
        ),
        (
            9376902421432766464,
            "right",
            3,
            388094,
            (1541651.445795026, 1540704.914274493, 1495690.6995727643, 1545258.5066780585),
        ),
        (9223499787488272658, "down", 3, 191261, (None, 1543490.1811942372, 1455097.0632596463, 1539635.629052212)),
        (
            9525521277823098880,
            "right",
            3,
            249796,
            (1536796.2484474678, 1539729.2883483474, 1496092.5563622918, 1541350.936170014),
        ),
        (9597578871877738752, "up", 3, 103160, (1539715.0969416308, None, 1487580.8233884894, 1539186.8042222718)),
    ],
}


@pytest.mark.parametrize("name", sorted(REGRESSION_SETTINGS))
def test_decisions_match_the_regression_fixture(name):
    engine = Engine(**REGRESSION_SETTINGS[name])
    for bits, move, depth, nodes, values in REGRESSION[name]:
        result = engine.best_move(Board(bits))
        assert (str(result.move), result.depth, result.nodes) == (move, depth, nodes), bits
        assert not result.budget_exhausted and result.target_depth == depth
        expected = {d: v for d, v in zip(Direction, values) if v is not None}
        assert result.values.keys() == expected.keys()
        for direction, value in expected.items():
            assert result.values[direction] == pytest.approx(value, rel=1e-12), (bits, direction)


def test_an_ample_budget_changes_nothing_but_the_node_count():
    # Iterative deepening with every depth completed ends with the plain search's values.
    plain, budgeted = Engine(), Engine(max_nodes=10**12, time_limit=3600)
    for bits, *_ in REGRESSION["default"][:8]:
        a, b = plain.best_move(Board(bits)), budgeted.best_move(Board(bits))
        assert (a.move, a.values, a.depth) == (b.move, b.values, b.depth)
        assert not b.budget_exhausted and b.nodes > a.nodes  # the shallower depths were searched too


# ---- budgets -----------------------------------------------------------------------------------

CROWDED = Board(9597578871877738752)  # 14 tiles: a deep search here takes minutes or more


def test_time_limit_stops_a_huge_search():
    engine = Engine(depth=16, prob_cutoff=1e-6, time_limit=0.2)
    start = time.perf_counter()
    result = engine.best_move(CROWDED)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.4, elapsed  # at most ~2x the limit (the clock is read every 4096 nodes)
    assert result.budget_exhausted and result.target_depth == 16 and 1 <= result.depth < 16
    assert result.move in CROWDED.legal_moves()
    # The reported values are those of the deepest completed depth, searched alone.
    alone = Engine(depth=result.depth, prob_cutoff=1e-6).best_move(CROWDED)
    assert alone.values == result.values and alone.move == result.move


def test_node_budget_is_deterministic_and_respected():
    results = [Engine(depth=8, max_nodes=300_000, threads=t).best_move(CROWDED) for t in (1, 2)]
    for result in results:
        assert result.budget_exhausted and 1 < result.depth < 8
        assert result.nodes <= 300_000 + 2 * 4096  # the abandoned depth stops at the next poll
    assert results[0].values == results[1].values and results[0].depth == results[1].depth
    depth = results[0].depth
    assert Engine(depth=depth).best_move(CROWDED).values == results[0].values
    # Depths 1..depth fit in the budget together, depths 1..depth + 1 do not.
    nodes = [Engine(depth=d).best_move(CROWDED).nodes for d in range(1, depth + 2)]
    assert sum(nodes[:-1]) <= 300_000 < sum(nodes)


def test_depth_one_always_completes():
    result = Engine(depth=5, max_nodes=1).best_move(CROWDED)
    assert result.depth == 1 and result.budget_exhausted and result.move in CROWDED.legal_moves()
    assert result.values == Engine(depth=1).best_move(CROWDED).values
    tiny = Engine(depth=1, max_nodes=1).best_move(CROWDED)
    assert tiny.depth == 1 and not tiny.budget_exhausted  # nothing left to search


def test_per_call_budget_overrides_the_engine_budget():
    unlimited = Engine(depth=16, prob_cutoff=1e-6)
    start = time.perf_counter()
    result = unlimited.best_move(CROWDED, time_limit=0.05)
    assert time.perf_counter() - start < 0.1 and result.budget_exhausted
    limited = Engine(depth=4, max_nodes=1000)
    assert limited.max_nodes == limited._core.max_nodes == 1000
    assert limited.best_move(CROWDED).budget_exhausted
    full = limited.best_move(CROWDED, max_nodes=None)  # this call only: no limit
    assert not full.budget_exhausted and full.depth == 4
    assert limited.best_move(CROWDED).budget_exhausted
    with pytest.raises(ValueError, match="time_limit must be"):
        unlimited.best_move(CROWDED, time_limit=-1)
    with pytest.raises(ValueError, match="max_nodes must be"):
        unlimited.best_move(CROWDED, max_nodes=0)


def test_games_with_a_node_budget_are_reproducible():
    engine = Engine(depth=3, max_nodes=3000, threads=1)
    a = play_game(seed=5, engine=engine, record_moves=True)
    b = play_game(seed=5, engine=Engine(depth=3, max_nodes=3000, threads=2), record_moves=True)
    assert a.move_log == b.move_log and a.budget_stops == b.budget_stops
    assert 0 < a.budget_stops <= a.moves and a.final_board.is_over()


# ---- interrupts and cancellation ---------------------------------------------------------------


def interrupt_main_after(seconds):
    timer = threading.Timer(seconds, _thread.interrupt_main)
    timer.start()
    return timer


def test_interrupt_stops_a_search_promptly():
    engine = Engine(depth=16, prob_cutoff=1e-6)  # would run for hours
    timer = interrupt_main_after(0.2)
    start = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.best_move(CROWDED)
    finally:
        timer.cancel()
    assert time.perf_counter() - start < 0.2 + 0.5
    # The engine is still usable afterwards.
    assert engine.best_move(CROWDED, time_limit=0.01).move in CROWDED.legal_moves()


def test_interrupt_stops_play_games_and_its_threads():
    engine = Engine(heuristic="snake", depth=5)  # a game takes many minutes
    timer = interrupt_main_after(0.3)
    start = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            play_games(4, engine=engine, threads=2)
    finally:
        timer.cancel()
    assert time.perf_counter() - start < 0.3 + 1.0  # includes stopping and joining the game threads


def test_cancel_token_stops_a_search_from_another_thread():
    token = _engine.CancelToken()
    core = _engine.Engine(depth=16, prob_cutoff=1e-6)
    threading.Timer(0.1, token.cancel).start()
    start = time.perf_counter()
    with pytest.raises(SearchCancelled):
        core.best_move(CROWDED.bits, cancel=token)
    assert token.cancelled and time.perf_counter() - start < 0.6


SIGINT_CHILD = """
import argparse, sys
from fastdl.game2048 import cli
parser = argparse.ArgumentParser()
cli.register(parser.add_subparsers())
args = parser.parse_args(["2048", "watch", "--heuristic", "snake", "--depth", "6", "--seed", "1", "--threads", "1"])
print("ready", flush=True)
sys.exit(args.func(args))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_stops_cli_watch_in_the_middle_of_a_search():
    # Snake depth 6 takes seconds per move: the signal arrives inside a search.
    child = subprocess.Popen(
        [sys.executable, "-c", SIGINT_CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        sent = time.perf_counter()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=20)
        stopped = time.perf_counter() - sent
    finally:
        child.kill()
    assert child.returncode == 0, err
    assert "interrupted" in out and "final: score" in out
    assert stopped < 1.0, stopped


# ---- small searches ----------------------------------------------------------------------------


def test_small_searches_stay_on_the_calling_thread():
    # Below 4096 nodes there is no poll at which helpers could start, and the previous decision
    # was small too: one thread, whatever the machine's load.
    engine = Engine(depth=1, threads=4)
    for bits, *_ in REGRESSION["fast"]:
        result = engine.best_move(Board(bits))
        assert result.threads == 1 and result.nodes < 4096
    # A long search brings in helpers once it has run for 1 ms, with unchanged results.
    threaded = Engine(depth=6, threads=2).best_move(CROWDED)
    single = Engine(depth=6, threads=1).best_move(CROWDED)
    assert threaded.threads == 2 and single.threads == 1
    assert (threaded.values, threaded.nodes) == (single.values, single.nodes)


def test_new_engines_and_games_reuse_table_memory():
    # Tables go back to a pool with their generation counters: entries of the previous owner
    # never leak into the next one's results.
    board = Board(REGRESSION["default"][5][0])
    expected = Engine(depth=3, threads=1).best_move(board)
    for _ in range(6):
        engine = Engine(depth=3, threads=1)
        engine.best_move(Board(REGRESSION["default"][9][0]))  # fills the table with other positions
        del engine
        again = Engine(depth=3, threads=1).best_move(board)
        assert (again.values, again.nodes, again.cache_hits) == (expected.values, expected.nodes, expected.cache_hits)


# ---- packaging and CLI -------------------------------------------------------------------------


def test_import_does_not_load_torch():
    code = "import sys, fastdl.game2048, fastdl.game2048.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def make_parser():
    parser = argparse.ArgumentParser(prog="fastdl")
    cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_bench_writes_json_and_png(tmp_path, capsys):
    args = make_parser().parse_args(
        ["2048", "bench", "--games", "2", "--seed", "3", "--preset", "fast", "--parallel", "2", "--out", str(tmp_path)]
    )
    assert args.func(args) == 0
    summary = json.loads((tmp_path / "bench_2048.json").read_text())
    assert len(summary["games"]) == 2 and summary["moves"] > 0
    assert set(summary["reached"]) == {"2048", "4096", "8192", "16384", "32768"}
    png = (tmp_path / "bench_2048_max_tiles.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert "moves/s" in capsys.readouterr().out


def test_cli_budget_and_bad_settings(tmp_path, capsys):
    parser = make_parser()
    args = parser.parse_args(
        [
            "2048",
            "bench",
            "--games",
            "1",
            "--depth",
            "3",
            "--max-nodes",
            "2000",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert args.func(args) == 0
    summary = json.loads((tmp_path / "bench_2048.json").read_text())
    assert summary["settings"]["max_nodes"] == 2000 and summary["budget_stops"] > 0
    args = parser.parse_args(["2048", "watch", "--time-limit", "0.01", "--seed", "2", "--max-moves", "3"])
    assert args.func(args) == 0
    assert "3 moves" in capsys.readouterr().out
    args = parser.parse_args(["2048", "watch", "--depth", "40"])
    with pytest.raises(SystemExit, match="depth must be 0 .* got 40"):
        args.func(args)


def test_cli_watch_and_parsers(capsys):
    parser = make_parser()
    args = parser.parse_args(["2048", "watch", "--preset", "fast", "--seed", "1", "--max-moves", "5"])
    assert args.func(args) == 0
    assert "5 moves" in capsys.readouterr().out
    assert callable(parser.parse_args(["2048", "play"]).func)
    with pytest.raises(SystemExit):
        parser.parse_args(["2048", "bench", "--heuristic", "bogus"])


class FakeScreen:
    """Stands in for a curses window: replays keys, records what is drawn."""

    def __init__(self, keys):
        self.keys, self.drawn = list(keys), []

    def getch(self):
        return self.keys.pop(0)

    def addstr(self, *args):
        self.drawn.append(args[-1])

    def erase(self):
        pass

    def refresh(self):
        pass


def test_cli_play_loop_moves_with_arrows_and_wasd():
    curses = pytest.importorskip("curses")
    seed = 21
    screen = FakeScreen([curses.KEY_LEFT, ord("S"), ord("x"), ord("q")])
    assert cli._play_loop(screen, seed) == 0
    rng = Rng(seed)
    board = Board.new_game(rng)
    for direction in ("left", "down"):
        try:
            board = board.move(direction).spawn(rng)
        except IllegalMoveError:
            pass
    assert str(board) in screen.drawn[-1]  # the screen shows the board after both moves
