"""fastdl.game2048 n-tuple networks: the C++ value and TD training against the pure-Python
reference, symmetries, the search with a network, weights files and their errors, bad settings
and ``fastdl 2048 train``; and ``fastdl 2048 bench --results`` with its external engines. Small
tuples keep it fast; everything is seeded."""

import argparse
import json
import math
import random
import struct
import sys
import zlib

import numpy as np
import pytest

from fastdl.game2048 import Board, Engine, NTupleNetwork, Rng, _engine, cli, game_seeds, play_games
from fastdl.game2048 import reference
from fastdl.game2048.bench import ExternalEngineError, play_external, play_external_games, read_records, wilson_interval
from fastdl.game2048.ntuple import DEFAULT_TUPLES, MAGIC

SMALL_TUPLES = [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 4, 5], [1, 2, 5]]


def random_grid(rng, max_rank=12, empty_share=0.4):
    return [[0 if rng.random() < empty_share else 1 << rng.randint(1, max_rank) for _ in range(4)] for _ in range(4)]


def random_network(tuples=SMALL_TUPLES, seed=0, scale=100.0):
    network = NTupleNetwork(tuples, seed=seed)
    generator = np.random.default_rng(seed)
    for i in range(len(tuples)):
        network.weights(i)[:] = generator.normal(0.0, scale, network.weights(i).size).astype(np.float32)
    return network


def weights_of(network):
    return [network.weights(i).copy() for i in range(len(network.tuples))]


def symmetries(grid):
    """The 8 images of a grid under the symmetries of the square."""
    out = []
    for s in range(8):
        image = [[0] * 4 for _ in range(4)]
        for cell in range(16):
            r, c = divmod(reference.symmetric_cell(cell, s), 4)
            image[r][c] = grid[cell // 4][cell % 4]
        out.append(image)
    return out


# ---- value ---------------------------------------------------------------------------------


def test_symmetric_cells_match_reference_and_are_the_8_symmetries():
    maps = set()
    for s in range(8):
        image = tuple(_engine.symmetric_cell(cell, s) for cell in range(16))
        assert image == tuple(reference.symmetric_cell(cell, s) for cell in range(16))
        assert sorted(image) == list(range(16))
        maps.add(image)
    assert len(maps) == 8
    assert maps == {
        tuple(_engine.symmetric_cell(_engine.symmetric_cell(c, a), b) for c in range(16))
        for a in range(8)
        for b in range(8)
    }  # closed under composition: a group


def test_value_matches_reference_on_random_boards():
    rng = random.Random(1)
    network = random_network(seed=1)
    weights = weights_of(network)
    for _ in range(300):
        grid = random_grid(rng, empty_share=rng.choice([0.0, 0.3, 0.7]))
        assert network.value(Board(grid)) == reference.ntuple_value(grid, SMALL_TUPLES, weights)


def test_symmetric_boards_have_the_same_value():
    rng = random.Random(2)
    network = random_network(seed=2)
    engine = Engine(heuristic="ntuple", weights=network)
    for _ in range(100):
        images = symmetries(random_grid(rng))
        assert len({Board(image).bits for image in images}) > 1
        values = [engine.evaluate(Board(image)) for image in images]
        # The same terms summed in another order: equal up to rounding.
        assert values == pytest.approx([values[0]] * 8, rel=1e-12, abs=1e-9)


def test_default_tuples_are_valid_and_zero_at_first():
    network = NTupleNetwork()
    assert network.tuples == [list(t) for t in DEFAULT_TUPLES]
    assert [network.weights(i).size for i in range(4)] == [16**6] * 4
    assert network.value(Board([[2, 4, 8, 16]] + [[0] * 4] * 3)) == 0.0


# ---- TD training ---------------------------------------------------------------------------


def reference_training(network, games, alpha):
    """The reference's TD games from the network's weights and game counter (float32 copies)."""
    weights = weights_of(network)
    results = [
        reference.td_training_game(network.tuples, weights, Rng(network.seed + network.games_trained + g), alpha)
        for g in range(games)
    ]
    return weights, results


@pytest.mark.parametrize("start", ["zero", "random"])
def test_td_steps_move_the_weights_as_the_reference_update(start):
    network = NTupleNetwork(SMALL_TUPLES, seed=11) if start == "zero" else random_network(seed=11, scale=5.0)
    expected_weights, expected_games = reference_training(network, 3, alpha=0.05)
    games = network.train(3, alpha=0.05)
    assert [(g.score, g.max_tile, g.moves) for g in games] == expected_games
    for got, expected in zip(weights_of(network), expected_weights):
        assert np.array_equal(got, expected)  # bit for bit
    assert network.games_trained == 3
    assert any(w.any() for w in weights_of(network))


def test_training_in_chunks_equals_one_run_and_is_reproducible():
    one, two = NTupleNetwork(SMALL_TUPLES, seed=4), NTupleNetwork(SMALL_TUPLES, seed=4)
    one.train(60)
    for chunk in (25, 1, 34):
        two.train(chunk)
    assert two.games_trained == 60
    for a, b in zip(weights_of(one), weights_of(two)):
        assert np.array_equal(a, b)


def test_threaded_training_runs_every_game():
    network = NTupleNetwork(SMALL_TUPLES, seed=3)
    games = network.train(40, threads=2)
    assert len(games) == 40 and network.games_trained == 40
    assert all(g.moves > 0 and g.max_tile >= 4 for g in games)
    assert all(np.isfinite(w).all() for w in weights_of(network))


def mean_greedy_score(network, seeds=24):
    games = play_games(seeds, seed=99, engine=Engine(heuristic="ntuple", weights=network, depth=1), threads=1)
    return sum(g.score for g in games) / len(games), sum(g.max_tile >= 512 for g in games)


def test_short_training_improves_greedy_play():
    network = NTupleNetwork(SMALL_TUPLES, seed=0)
    untrained_score, untrained_512 = mean_greedy_score(network)
    network.train(2000)
    trained_score, trained_512 = mean_greedy_score(network)
    assert trained_score > 1.5 * untrained_score
    assert trained_512 > untrained_512


# ---- search with a network -----------------------------------------------------------------


def reference_search(grid, depth, value):
    """Expectimax over afterstates with rewards: a move is worth its merge score plus the chance
    node after it; a chance node at depth 0 is worth value(afterstate); a lost position 0."""

    def chance(after, d):
        if d <= 0:
            return value(after)
        empty = [(i, j) for i in range(4) for j in range(4) if after[i][j] == 0]
        total = 0.0
        for i, j in empty:
            for tile, p in ((2, 0.9), (4, 0.1)):
                child = [row[:] for row in after]
                child[i][j] = tile
                moves = [
                    reference.move(child, m)[1] + chance(moved, d - 1) for m, moved in reference.legal_children(child)
                ]
                total += p * (max(moves) if moves else 0.0)
        return total / len(empty)

    return {m: reference.move(grid, m)[1] + chance(moved, depth - 1) for m, moved in reference.legal_children(grid)}


@pytest.mark.parametrize("depth", [1, 2])
def test_search_values_match_the_reference(depth):
    rng = random.Random(5)
    network = random_network(seed=5)
    weights = weights_of(network)
    engine = Engine(heuristic="ntuple", weights=network, depth=depth, threads=1)
    for _ in range(8):
        grid = random_grid(rng, max_rank=8, empty_share=0.5)
        result = engine.best_move(Board(grid))
        expected = reference_search(grid, depth, lambda g: reference.ntuple_value(g, SMALL_TUPLES, weights))
        assert {str(m): v for m, v in result.values.items()} == pytest.approx(expected, rel=1e-12, abs=1e-9)


def test_ntuple_engine_plays_legal_reproducible_games():
    network = random_network(seed=6, scale=1.0)
    engine = Engine(heuristic="ntuple", weights=network, threads=1)
    assert engine.root_depth(Board([[2, 0, 0, 0]] + [[0] * 4] * 3)) == 2
    first, second = (play_games(2, seed=1, engine=engine, threads=1) for _ in range(2))
    assert [(g.score, g.moves) for g in first] == [(g.score, g.moves) for g in second]


# ---- files ---------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    network = random_network(seed=7)
    network.train(5)
    path = tmp_path / "net.bin"
    network.save(path)
    loaded = NTupleNetwork.load(path)
    assert loaded.tuples == network.tuples and loaded.seed == 7 and loaded.games_trained == 5
    for a, b in zip(weights_of(network), weights_of(loaded)):
        assert np.array_equal(a, b)
    board = Board([[2, 4, 8, 16], [0, 2, 0, 0], [0, 0, 4, 0], [0, 0, 0, 2]])
    assert Engine(heuristic="ntuple", weights=str(path)).evaluate(board) == network.value(board)
    # Training on after a load continues the same games.
    network.train(3)
    loaded.train(3)
    for a, b in zip(weights_of(network), weights_of(loaded)):
        assert np.array_equal(a, b)


def write_file(
    path, *, magic=MAGIC, version=1, tuples=([0, 1], [2]), games=0, seed=0, weights=None, data=None, count=None
):
    head = struct.pack("<8sIIQQ", magic, version, len(tuples) if count is None else count, games, seed)
    head += b"".join(bytes([len(t), *t]) for t in tuples)
    if data is None:
        if weights is None:
            weights = np.zeros(sum(16 ** len(t) for t in tuples), np.float32)
        data = zlib.compress(np.asarray(weights, "<f4").tobytes())
    path.write_bytes(head + data)
    return path


def test_the_writer_of_the_corrupt_files_writes_good_ones(tmp_path):
    weights = np.arange(272, dtype=np.float32)
    network = NTupleNetwork.load(write_file(tmp_path / "good.bin", weights=weights, games=9, seed=3))
    assert network.tuples == [[0, 1], [2]] and network.games_trained == 9 and network.seed == 3
    assert np.array_equal(np.concatenate(weights_of(network)), weights)


def corrupt_cases():
    nan = np.zeros(272, np.float32)
    nan[260] = np.nan
    inf = np.zeros(272, np.float32)
    inf[3] = -np.inf
    good = zlib.compress(np.zeros(272, "<f4").tobytes())
    return {
        "empty": ({"data": b"", "tuples": (), "count": 0}, "tuple count 0"),
        "magic": ({"magic": b"NOTANET!"}, "not an n-tuple network file"),
        "version": ({"version": 2}, "unsupported version 2"),
        "count": ({"count": 40}, "tuple count 40 is outside"),
        "cell": ({"tuples": ([0, 16],)}, "bad tuple shapes: tuples\\[0\\] = \\[0, 16\\] has a cell outside"),
        "repeat": ({"tuples": ([3, 3],)}, "repeats cell 3"),
        "long": ({"tuples": ([0, 1, 2, 3, 4, 5, 6],), "data": good}, "must have 1 to 6 cells"),
        "short_data": ({"data": good[: len(good) // 2]}, "truncated or too long"),
        "long_data": ({"data": zlib.compress(np.zeros(273, "<f4").tobytes())}, "truncated or too long"),
        "trailing": ({"data": good + b"xx"}, "2 unexpected bytes after the weight data"),
        "garbage": ({"data": b"\x00" * 40}, "corrupt weight data"),
        "nan": ({"weights": nan}, "tuple 1 has a non-finite weight \\(nan at index 4\\)"),
        "inf": ({"weights": inf}, "tuple 0 has a non-finite weight \\(-inf at index 3\\)"),
    }


@pytest.mark.parametrize("case", sorted(corrupt_cases()))
def test_corrupt_files_raise_value_error_naming_file_and_problem(tmp_path, case):
    kwargs, message = corrupt_cases()[case]
    path = write_file(tmp_path / f"{case}.bin", **kwargs)
    with pytest.raises(ValueError, match=f"{case}.bin: .*{message}"):
        NTupleNetwork.load(path)
    with pytest.raises(ValueError, match=message):
        Engine(heuristic="ntuple", weights=path)


def test_short_and_truncated_headers(tmp_path):
    (tmp_path / "tiny.bin").write_bytes(b"FDL")
    with pytest.raises(ValueError, match="tiny.bin: too short"):
        NTupleNetwork.load(tmp_path / "tiny.bin")
    path = write_file(tmp_path / "cut.bin")
    path.write_bytes(path.read_bytes()[: struct.calcsize("<8sIIQQ") + 3])  # tuple 0's shape, not tuple 1's
    with pytest.raises(ValueError, match="cut.bin: truncated in the shape of tuple 1"):
        NTupleNetwork.load(path)
    with pytest.raises(FileNotFoundError):
        NTupleNetwork.load(tmp_path / "missing.bin")


# ---- settings ------------------------------------------------------------------------------

BAD_NETWORKS = [
    ({"tuples": []}, "tuples must be 1 to 16 tuples, got 0"),
    ({"tuples": [[0]] * 17}, "tuples must be 1 to 16 tuples, got 17"),
    ({"tuples": [[]]}, r"tuples\[0\] = \[\] must have 1 to 6 cells"),
    ({"tuples": [[0, 1, 2, 3, 4, 5, 6]]}, r"must have 1 to 6 cells"),
    ({"tuples": [[0, 1], [5, 5]]}, r"tuples\[1\] = \[5, 5\] repeats cell 5"),
    ({"tuples": [[-1]]}, r"tuples\[0\] = \[-1\] has a cell outside \[0, 16\)"),
    ({"tuples": [[2**70]]}, r"a tuple cell must be an integer in \[0, 16\)"),
    ({"tuples": "0123"}, "tuples must be a list of lists of cell indices"),
    ({"tuples": [3]}, "tuples must be a list of lists of cell indices"),
    ({"tuples": [[0.5]]}, r"a tuple cell must be an integer"),
    ({"tuples": [[0]], "seed": -1}, r"seed must be an integer in \[0, 2\*\*64\), got -1"),
]


@pytest.mark.parametrize("kwargs, message", BAD_NETWORKS, ids=[str(k) for k, _ in BAD_NETWORKS])
def test_bad_networks_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NTupleNetwork(**kwargs)


BAD_TRAINING = [
    ({"games": -1}, "games must be a non-negative integer, got -1"),
    ({"games": True}, "games must be a non-negative integer, got True"),
    ({"games": 1, "threads": 0}, r"threads must be an integer in \[1, 256\], got 0"),
    ({"games": 1, "threads": 257}, r"threads must be an integer in \[1, 256\], got 257"),
    ({"games": 1, "threads": 1.5}, r"threads must be an integer in \[1, 256\], got 1.5"),
    ({"games": 1, "alpha": 0}, r"alpha must be a number in \(0, 1\], got 0"),
    ({"games": 1, "alpha": 1.5}, r"alpha must be a number in \(0, 1\], got 1.5"),
    ({"games": 1, "alpha": math.nan}, r"alpha must be a number in \(0, 1\], got nan"),
    ({"games": 1, "alpha": "0.1"}, r"alpha must be a number in \(0, 1\], got '0.1'"),
]


@pytest.mark.parametrize("kwargs, message", BAD_TRAINING, ids=[str(k) for k, _ in BAD_TRAINING])
def test_bad_training_settings_are_rejected(kwargs, message):
    network = NTupleNetwork([[0, 1]])
    with pytest.raises(ValueError, match=message):
        network.train(**kwargs)
    assert network.games_trained == 0


def test_bad_engine_settings_for_ntuple(tmp_path):
    network = NTupleNetwork([[0, 1]])
    with pytest.raises(ValueError, match="weights must name the network of the ntuple heuristic"):
        Engine(heuristic="ntuple")
    with pytest.raises(ValueError, match="weights must be a weights file path or an NTupleNetwork .* got 3"):
        Engine(heuristic="ntuple", weights=3)
    with pytest.raises(ValueError, match=r"weights must be None or a dict"):
        Engine(heuristic="default", weights=network)
    with pytest.raises(
        ValueError, match=r"depth must be 0 \(adaptive\) or in \[1, 8\] for the ntuple heuristic, got 9"
    ):
        Engine(heuristic="ntuple", weights=network, depth=9)
    with pytest.raises(ValueError, match="weights must be an NTupleNetwork for the ntuple heuristic"):
        _engine.Engine("ntuple", 0, 1e-4, True, 1, {}, None, None)
    with pytest.raises(FileNotFoundError):
        Engine(heuristic="ntuple", weights=tmp_path / "missing.bin")
    assert Engine.max_depth("ntuple") == 8


# ---- command line --------------------------------------------------------------------------


def run_cli(*argv):
    parser = argparse.ArgumentParser(prog="fastdl")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["2048", *argv])
    return args.func(args)


def test_cli_train_checkpoints_resumes_and_plots(tmp_path, capsys):
    out, straight = tmp_path / "net.bin", tmp_path / "straight.bin"
    tuples = "0,1,2,3 4,5,6,7 0,1,4,5 1,2,5"
    assert (
        run_cli(
            "train",
            "--games",
            "150",
            "--out",
            str(out),
            "--seed",
            "2",
            "--checkpoint-every",
            "100",
            "--window",
            "50",
            "--tuples",
            tuples,
        )
        == 0
    )
    assert NTupleNetwork.load(out).games_trained == 150
    assert NTupleNetwork.load(out).tuples == SMALL_TUPLES
    curve = json.loads((tmp_path / "net.curve.json").read_text())
    assert [p["games"] for p in curve] == [50, 100, 150]
    assert set(curve[0]) == {"games", "mean_score", "2048", "8192", "16384"}
    assert (tmp_path / "net.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit, match="net.bin exists: pass --resume"):
        run_cli("train", "--games", "200", "--out", str(out))
    with pytest.raises(SystemExit, match="--seed 5 differs from seed 2"):
        run_cli("train", "--games", "200", "--out", str(out), "--resume", "--seed", "5")
    with pytest.raises(SystemExit, match="--tuples differ from the tuples"):
        run_cli("train", "--games", "200", "--out", str(out), "--resume", "--tuples", "0,1")
    assert run_cli("train", "--games", "250", "--out", str(out), "--resume", "--window", "50") == 0
    assert [p["games"] for p in json.loads((tmp_path / "net.curve.json").read_text())] == [50, 100, 150, 200, 250]
    # Resuming trains exactly the games a straight run trains (one thread: bit-reproducible).
    assert run_cli("train", "--games", "250", "--out", str(straight), "--seed", "2", "--tuples", tuples) == 0
    for a, b in zip(weights_of(NTupleNetwork.load(out)), weights_of(NTupleNetwork.load(straight))):
        assert np.array_equal(a, b)
    assert "250 games trained" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--games", "0"], "--games must be at least 1, got 0"),
        (["--window", "0"], "--window must be at least 1"),
        (["--alpha", "0"], r"alpha must be a number in \(0, 1\], got 0"),
        (["--threads", "0"], r"threads must be an integer in \[1, 256\], got 0"),
        (["--seed", "-3"], r"seed must be an integer in \[0, 2\*\*64\), got -3"),
        (["--resume"], "No such file"),
        (
            ["--tuples", "0,1 2,x"],
            r"--tuples must be tuples of cells separated by spaces, cells by commas, got '0,1 2,x'",
        ),
        (["--tuples", "0,16"], r"tuples\[0\] = \[0, 16\] has a cell outside|tuples must be lists of cells"),
    ],
)
def test_cli_train_rejects_bad_settings(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        run_cli("train", "--out", str(tmp_path / "net.bin"), *argv)
    assert not (tmp_path / "net.bin").exists()


def test_cli_bench_and_watch_with_a_network(tmp_path, capsys):
    path = tmp_path / "net.bin"
    random_network(seed=8, scale=1.0).save(path)
    assert (
        run_cli(
            "bench", "--heuristic", "ntuple", "--weights", str(path), "--depth", "1", "--games", "2", "--parallel", "1"
        )
        == 0
    )
    assert run_cli("watch", "--heuristic", "ntuple", "--weights", str(path), "--seed", "1", "--max-moves", "3") == 0
    assert "3 moves" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--weights applies to --heuristic ntuple only"):
        run_cli("watch", "--weights", str(path))
    with pytest.raises(SystemExit, match="weights must name the network"):
        run_cli("watch", "--heuristic", "ntuple")


# ---- bench records and external engines ----------------------------------------------------

# A tiny external engine: the first of left, up, right, down that moves a tile.
EXTERNAL_ENGINE = """
import sys

def slides(line):
    tiles = [t for t in line if t]
    merged = any(a == b for a, b in zip(tiles, tiles[1:]))
    return merged or tiles != line[:len(tiles)]

for text in sys.stdin:
    cells = [int(v) for v in text.split()]
    rows = [cells[4 * r:4 * r + 4] for r in range(4)]
    columns = [cells[c::4] for c in range(4)]
    options = {"left": rows, "up": columns, "right": [r[::-1] for r in rows], "down": [c[::-1] for c in columns]}
    print(next(name for name, lines in options.items() if any(slides(line) for line in lines)), flush=True)
"""


def external(tmp_path, body=EXTERNAL_ENGINE):
    script = tmp_path / "engine.py"
    script.write_text(body)
    return f"{sys.executable} {script}"


def test_wilson_interval():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_cli_bench_records_games_and_plays_an_external_engine(tmp_path, capsys):
    results = tmp_path / "games.jsonl"
    argv = ["bench", "--games", "2", "--jobs", "2", "--preset", "fast", "--results", str(results)]
    assert run_cli(*argv, "--versus", external(tmp_path)) == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == 4
    ours = [r for r in records if r["settings"]["engine"] == "fastdl"]
    theirs = [r for r in records if r["settings"]["engine"] == "external"]
    assert sorted(r["seed"] for r in ours) == sorted(r["seed"] for r in theirs) == sorted(game_seeds(2))
    assert all({"seed", "settings", "max_tile", "score", "moves", "seconds"} <= set(r) for r in records)
    assert ours[0]["settings"]["depth"] == 2
    assert run_cli(*argv) == 0  # appends: the report covers all 4 fastdl games
    assert len(results.read_text().splitlines()) == 6
    out = capsys.readouterr().out
    assert '"engine": "fastdl"' in out and ": 4 games" in out and "95% CI" in out
    with pytest.raises(SystemExit, match="answered 'sideways'"):
        run_cli(
            "bench",
            "--games",
            "1",
            "--jobs",
            "1",
            "--depth",
            "1",
            "--versus",
            external(tmp_path, "print('sideways', flush=True)"),
        )


@pytest.mark.parametrize(
    "body, message",
    [
        ("print('sideways', flush=True)", "answered 'sideways' to .*: expected up, down, left or right"),
        ("pass", "exited"),
        ("import sys\nfor _ in sys.stdin: print('down', flush=True)", "played the illegal move down"),
    ],
)
def test_a_broken_external_engine_is_reported(tmp_path, body, message):
    with pytest.raises(ExternalEngineError, match=message):
        play_external(external(tmp_path, body), seed=0, timeout=10.0)


def test_external_engine_command_errors(tmp_path):
    with pytest.raises(ExternalEngineError, match="cannot start external engine '/nonexistent/engine'"):
        play_external("/nonexistent/engine", seed=0, timeout=10.0)
    with pytest.raises(ExternalEngineError, match="did not answer within 0.2 s"):
        play_external(external(tmp_path, "import time\ntime.sleep(5)"), seed=0, timeout=0.2)
    for command, message in (("", "got an empty one"), ("engine 'unclosed", "No closing quotation")):
        with pytest.raises(ValueError, match=f"--versus must be a command line, .*{message}"):
            play_external_games(command, [0], 1, 10.0, print)


def test_bench_settings_and_corrupt_records(tmp_path):
    with pytest.raises(SystemExit, match=r"--jobs must be in \[1, 256\], got 0"):
        run_cli("bench", "--games", "1", "--jobs", "0")
    with pytest.raises(SystemExit, match="--out writes the summary of one run"):
        run_cli("bench", "--games", "1", "--jobs", "1", "--out", str(tmp_path))
    with pytest.raises(SystemExit, match="depth must be 0"):
        run_cli("bench", "--games", "1", "--jobs", "1", "--depth", "99")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"settings": {}, "max_tile": 2, "score": 0}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not a JSON line"):
        read_records(str(path))


def test_cli_train_without_matplotlib_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert (
        run_cli("train", "--games", "20", "--out", str(tmp_path / "net.bin"), "--tuples", "0,1 2,3", "--window", "10")
        == 0
    )
    assert "matplotlib not installed: no learning-curve PNG" in capsys.readouterr().out
    assert not (tmp_path / "net.png").exists() and (tmp_path / "net.curve.json").exists()
