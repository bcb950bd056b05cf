"""fastdl.game2048: rules against a list-based reference, spawning statistics, the three
search variants against straightforward Python searches, threading, errors and the CLI."""

import argparse
import json
import math
import random
import subprocess
import sys

import pytest

from fastdl.game2048 import (Board, Direction, Engine, IllegalMoveError, Rng, cli, game_seeds, play_game,
                             play_games)
from fastdl.game2048.reference import (DIRECTIONS, legal_children, monotone, notes_eval, notes_root_depth,
                                       snake_eval, transpose)
from fastdl.game2048.reference import best_move as reference_best
from fastdl.game2048.reference import move as reference_move

# The list-based reference (rules, snake/notes evaluations, plain expectimax) lives in
# fastdl.game2048.reference; the C++ engine is checked against it.


def random_grid(rng, max_rank=11, empty_share=0.4):
    return [[0 if rng.random() < empty_share else 1 << rng.randint(1, max_rank) for _ in range(4)]
            for _ in range(4)]


@pytest.fixture
def rng():
    seed = random.randrange(2**32)
    print(f"random seed: {seed}")  # shown by pytest when a test fails
    return random.Random(seed)


# ---- rules -------------------------------------------------------------------------------------

@pytest.mark.parametrize("row, expected", [([2, 2, 2, 2], [4, 4, 0, 0]), ([4, 4, 8, 0], [8, 8, 0, 0]),
                                           ([2, 2, 4, 0], [4, 4, 0, 0])])
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

@pytest.mark.parametrize("tiles", [[[0] * 5] * 3, [[0] * 4] * 3, [[0] * 4] * 3 + [[0] * 3], [[3, 0, 0, 0]] + [[0] * 4] * 3,
                                   [[-2, 0, 0, 0]] + [[0] * 4] * 3, [[1, 0, 0, 0]] + [[0] * 4] * 3,
                                   [["2", 0, 0, 0]] + [[0] * 4] * 3, [[2.0, 0, 0, 0]] + [[0] * 4] * 3, -1, 1 << 64,
                                   "board"])
def test_bad_boards_raise_value_error(tiles):
    with pytest.raises(ValueError):
        Board(tiles)


def test_bad_directions_and_settings():
    board = Board([[2, 0, 0, 0], [0] * 4, [0] * 4, [0] * 4])
    for bad in ("north", "", 4, -1, None, 1.0):
        with pytest.raises(ValueError, match="direction"):
            board.move(bad)
    assert board.move("DOWN") == board.move(Direction.DOWN) == board.move(1)
    for kwargs in ({"heuristic": "greedy"}, {"depth": 0}, {"threads": 0}, {"prob_cutoff": 1.5},
                   {"weights": {"bogus": 1}}):
        with pytest.raises(ValueError):
            Engine(**kwargs)
    with pytest.raises(ValueError):
        play_game(seed=-1, engine=Engine.fast())


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
    # Depth 1, no cutoff: move value = mean over spawns of the best evaluation one move later.
    engine = Engine(depth=1, prob_cutoff=0.0, threads=1)
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


# ---- packaging and CLI -------------------------------------------------------------------------

def test_import_does_not_load_torch():
    code = "import sys, fastdl.game2048, fastdl.game2048.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def make_parser():
    parser = argparse.ArgumentParser(prog="fastdl")
    cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_bench_writes_json_and_png(tmp_path, capsys):
    args = make_parser().parse_args(["2048", "bench", "--games", "2", "--seed", "3", "--preset", "fast",
                                     "--parallel", "2", "--out", str(tmp_path)])
    assert args.func(args) == 0
    summary = json.loads((tmp_path / "bench_2048.json").read_text())
    assert len(summary["games"]) == 2 and summary["moves"] > 0
    assert set(summary["reached"]) == {"2048", "4096", "8192", "16384", "32768"}
    png = (tmp_path / "bench_2048_max_tiles.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert "moves/s" in capsys.readouterr().out


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
