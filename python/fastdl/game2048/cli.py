"""``fastdl 2048 ...``: play in the terminal, watch the engine, benchmark it, or train an n-tuple network.

The package's command line calls :func:`register` to add the ``2048`` sub-command. Ctrl-C stops
any of them promptly, in the middle of a search too.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from . import Board, Direction, Engine, IllegalMoveError, Rng, _engine, play_games
from .ntuple import NTupleNetwork, rates

MILESTONES = (2048, 4096, 8192, 16384, 32768)
_CLEAR = "\x1b[H\x1b[J"  # ANSI: cursor home, clear to end of screen (redraw in place)


def register(subparsers) -> None:
    """Adds ``2048 {play,watch,bench,train}`` to an argparse subparsers object."""
    parser = subparsers.add_parser("2048", help="the 2048 game engine", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="game2048_command", required=True)

    play = commands.add_parser("play", help="play in the terminal (arrow keys or WASD, q quits)")
    play.add_argument("--seed", type=int, default=None, help="tile seed (default: random)")
    play.set_defaults(func=cmd_play)

    watch = commands.add_parser("watch", help="watch the engine play")
    _add_engine_arguments(watch)
    watch.add_argument("--seed", type=int, default=None, help="tile seed (default: random)")
    watch.add_argument("--delay", type=float, default=0.0, help="seconds to pause after each move")
    watch.add_argument("--max-moves", type=int, default=None, help="stop after this many moves")
    watch.set_defaults(func=cmd_watch)

    bench = commands.add_parser("bench", help="self-play benchmark: max-tile distribution, scores, speed")
    _add_engine_arguments(bench)
    bench.add_argument("--games", type=int, default=10, help="number of games")
    bench.add_argument("--seed", type=int, default=0, help="seed of the game seeds")
    bench.add_argument("--parallel", type=int, default=None, help="games played at once (default: all cores)")
    bench.add_argument("--out", default=None, help="directory for bench_2048.json and bench_2048_max_tiles.png")
    bench.add_argument("--jobs", type=int, default=None, help="play the games in this many processes")
    bench.add_argument(
        "--results",
        default=None,
        metavar="FILE",
        help="append each finished game to FILE as a JSON line and report every game recorded there "
        "with 95%% confidence intervals",
    )
    bench.add_argument(
        "--versus",
        default=None,
        metavar="COMMAND",
        help="also play the same seeds with an external engine (the line protocol of docs/game2048.md)",
    )
    bench.set_defaults(func=cmd_bench)

    train = commands.add_parser("train", help="train an n-tuple network by TD(0) afterstate learning")
    train.add_argument("--games", type=int, default=100000, help="train until the network has played this many games")
    train.add_argument("--threads", type=int, default=1, help="training threads (1: bit-reproducible)")
    train.add_argument("--out", required=True, metavar="FILE", help="the weights file (checkpointed as it trains)")
    train.add_argument("--resume", action="store_true", help="continue training the network in FILE")
    train.add_argument("--alpha", type=float, default=0.1, help="TD step of the value as a whole, in (0, 1]")
    train.add_argument(
        "--seed", type=int, default=None, help="seed of the training games (default 0; with --resume, the file's)"
    )
    train.add_argument(
        "--tuples",
        default=None,
        metavar="SPEC",
        help="the network's tuples, e.g. "
        "'0,1,2,3,4,5 4,5,6,7,8,9' (cells 4*row+column; default: docs/game2048.md's four 6-tuples)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=10000,
        metavar="GAMES",
        help="save FILE and the learning curve every this many games",
    )
    train.add_argument(
        "--window",
        type=int,
        default=1000,
        metavar="GAMES",
        help="games behind each running rate and learning-curve point",
    )
    train.set_defaults(func=cmd_train)


def _add_engine_arguments(parser) -> None:
    parser.add_argument(
        "--preset", choices=("default", "fast"), default="default", help="fast = default heuristic at depth 2"
    )
    parser.add_argument("--depth", type=int, default=None, help="search depth (default: the heuristic's policy)")
    parser.add_argument("--heuristic", choices=("default", "snake", "notes", "ntuple"), default="default")
    parser.add_argument("--weights", default=None, metavar="FILE", help="the ntuple heuristic's network")
    parser.add_argument("--threads", type=int, default=None, help="search threads (default: all cores)")
    parser.add_argument(
        "--time-limit",
        "--move-time",
        type=float,
        default=None,
        metavar="SECONDS",
        help="time budget per move: deepen iteratively, keep the deepest completed depth",
    )
    parser.add_argument("--max-nodes", type=int, default=None, metavar="N", help="node budget per move")


def _engine_from(args) -> Engine:
    depth = args.depth if args.depth is not None else (2 if args.preset == "fast" else None)
    try:
        if args.weights is not None and args.heuristic != "ntuple":
            raise ValueError("--weights applies to --heuristic ntuple only")
        weights = args.weights if args.heuristic == "ntuple" else None
        return Engine(
            depth=depth,
            threads=args.threads,
            heuristic=args.heuristic,
            time_limit=args.time_limit,
            max_nodes=args.max_nodes,
            weights=weights,
        )
    except (ValueError, OSError) as error:
        raise SystemExit(f"fastdl 2048: {error}") from None


def _seed_from(args) -> int:
    return args.seed if args.seed is not None else int.from_bytes(os.urandom(8), "little")


# ---- play -------------------------------------------------------------------------------------


def cmd_play(args) -> int:
    import curses

    try:
        return curses.wrapper(_play_loop, _seed_from(args))  # restores the terminal on any exit
    except KeyboardInterrupt:
        print("interrupted")
        return 130


def _play_loop(screen, seed: int) -> int:
    import curses

    keys = {
        curses.KEY_UP: Direction.UP,
        curses.KEY_DOWN: Direction.DOWN,
        curses.KEY_LEFT: Direction.LEFT,
        curses.KEY_RIGHT: Direction.RIGHT,
        ord("w"): Direction.UP,
        ord("s"): Direction.DOWN,
        ord("a"): Direction.LEFT,
        ord("d"): Direction.RIGHT,
    }
    rng = Rng(seed)
    board = Board.new_game(rng)
    message = "arrows or WASD to move, q to quit"
    while True:
        screen.erase()
        screen.addstr(0, 0, f"{board}\n\n{message}\n")
        screen.refresh()
        if board.is_over():
            screen.addstr(f"game over: score {board.score}, max tile {board.max_tile}. Press any key.\n")
            screen.getch()
            return 0
        key = screen.getch()
        if key in (ord("q"), ord("Q"), 27):
            return 0
        key = key if key not in range(ord("A"), ord("Z") + 1) else key + 32  # accept WASD in capitals
        if key not in keys:
            continue
        try:
            board = board.move(keys[key]).spawn(rng)
            message = f"moved {keys[key]}"
        except IllegalMoveError:
            message = f"{keys[key]} does not move anything"
        except OverflowError as error:
            message = str(error)


# ---- watch ------------------------------------------------------------------------------------


def cmd_watch(args) -> int:
    engine = _engine_from(args)
    rng = Rng(_seed_from(args))
    board = Board.new_game(rng)
    start, moves = time.perf_counter(), 0
    try:
        while args.max_moves is None or moves < args.max_moves:
            result = engine.best_move(board)
            if result.move is None:
                break
            board = board.move(result.move).spawn(rng)
            moves += 1
            rate = moves / (time.perf_counter() - start)
            depth = f"depth {result.depth}" + (f" of {result.target_depth} (budget)" if result.budget_exhausted else "")
            sys.stdout.write(
                f"{_CLEAR}{board}\nmove {moves} ({result.move}), {rate:.0f} moves/s, {depth}, {result.nodes} nodes\n"
            )
            sys.stdout.flush()
            if args.delay:
                time.sleep(args.delay)
    except KeyboardInterrupt:  # raised within ~20 ms, also in the middle of a search
        print("interrupted")
    print(f"final: score {board.score}, max tile {board.max_tile}, {moves} moves")
    return 0


# ---- bench ------------------------------------------------------------------------------------


def _progress_bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def cmd_bench(args) -> int:
    if args.games < 1:
        raise SystemExit("--games must be at least 1")
    if args.jobs is not None or args.results is not None or args.versus is not None:
        return _bench_records(args)
    engine = _engine_from(args)
    done = 0

    def progress(result):
        nonlocal done
        done += 1
        sys.stderr.write(f"\r{_progress_bar(done, args.games)} last: max tile {result.max_tile}, score {result.score}")
        sys.stderr.flush()

    start = time.perf_counter()
    try:
        results = play_games(args.games, seed=args.seed, engine=engine, threads=args.parallel, progress=progress)
    except KeyboardInterrupt:  # play_games has stopped the running games
        sys.stderr.write(f"\ninterrupted after {done} of {args.games} games\n")
        return 130
    wall = time.perf_counter() - start
    sys.stderr.write("\n")

    summary = summarize(results, wall)
    summary["settings"] = {
        "games": args.games,
        "seed": args.seed,
        "preset": args.preset,
        "depth": args.depth,
        "heuristic": args.heuristic,
        "time_limit": args.time_limit,
        "max_nodes": args.max_nodes,
    }
    print(format_summary(summary))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_2048.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {args.out}/bench_2048.json")
        if _plot_max_tiles(results, os.path.join(args.out, "bench_2048_max_tiles.png")):
            print(f"wrote {args.out}/bench_2048_max_tiles.png")
    return 0


EXTERNAL_MOVE_TIMEOUT = 60.0  # seconds an external engine may take per move


def _bench_records(args) -> int:
    from . import bench, game_seeds

    if args.jobs is not None and not 1 <= args.jobs <= 256:
        raise SystemExit(f"fastdl 2048: --jobs must be in [1, 256], got {args.jobs}")
    if args.out is not None:
        raise SystemExit(
            "fastdl 2048: --out writes the summary of one run; with --jobs, --results or --versus "
            "the games go to --results FILE"
        )
    jobs = args.jobs or bench.default_jobs()
    _engine_from(args)  # every setting is checked before a game starts
    depth = args.depth if args.depth is not None else (2 if args.preset == "fast" else None)
    engine_kwargs = {
        "depth": depth,
        "threads": 1 if args.threads is None else args.threads,
        "heuristic": args.heuristic,
        "time_limit": args.time_limit,
        "max_nodes": args.max_nodes,
    }
    if args.heuristic == "ntuple":
        engine_kwargs["weights"] = os.path.abspath(args.weights) if args.weights else None
    settings = {"engine": "fastdl", **engine_kwargs}
    seeds = game_seeds(args.games, args.seed)
    records, total = [], args.games * (2 if args.versus else 1)

    def on_game(label_settings):
        def record_game(game):
            record = {**game, "settings": label_settings}
            records.append(record)
            if args.results:
                bench.append_record(args.results, record)
            sys.stderr.write(
                f"\r{_progress_bar(len(records), total)} last: max tile {game['max_tile']}, score {game['score']}  "
            )
            sys.stderr.flush()

        return record_game

    try:
        bench.play_in_processes(engine_kwargs, seeds, jobs, on_game(settings))
        if args.versus:
            bench.play_external_games(
                args.versus, seeds, jobs, EXTERNAL_MOVE_TIMEOUT, on_game({"engine": "external", "command": args.versus})
            )
    except KeyboardInterrupt:
        sys.stderr.write(f"\ninterrupted after {len(records)} of {total} games\n")
        return 130
    except (ValueError, bench.ExternalEngineError) as error:
        raise SystemExit(f"fastdl 2048: {error}") from None
    sys.stderr.write("\n")
    if args.results:
        print(f"{args.results}: every recorded game")
        print(bench.format_distribution(bench.read_records(args.results)))
    else:
        print(bench.format_distribution(records))
    return 0


def summarize(results, wall_seconds: float) -> dict:
    scores = [r.score for r in results]
    game_seconds = sum(r.seconds for r in results)
    moves = sum(r.moves for r in results)
    return {
        "reached": {str(tile): rate for tile, rate in rates(results, MILESTONES).items()},
        "max_tiles": sorted(r.max_tile for r in results),
        "score": {"min": min(scores), "median": statistics.median(scores), "max": max(scores)},
        "moves": moves,
        "moves_per_second": moves / game_seconds,  # per game thread
        "nodes_per_second": sum(r.nodes for r in results) / game_seconds,
        "wall_seconds": wall_seconds,
        "budget_stops": sum(r.budget_stops for r in results),  # moves whose search the budget cut short
        "games": [
            {"seed": r.seed, "max_tile": r.max_tile, "score": r.score, "moves": r.moves, "seconds": r.seconds}
            for r in results
        ],
    }


def format_summary(summary: dict) -> str:
    lines = [f"games: {len(summary['games'])} in {summary['wall_seconds']:.1f} s"]
    lines += [
        f"  reached {tile:>5}: {share:6.1%}" for tile, share in ((int(t), s) for t, s in summary["reached"].items())
    ]
    score = summary["score"]
    lines.append(f"score: min {score['min']}, median {score['median']}, max {score['max']}")
    lines.append(
        f"speed: {summary['moves_per_second']:.0f} moves/s, "
        f"{summary['nodes_per_second'] / 1e6:.1f} M search nodes/s (per game thread)"
    )
    if summary.get("budget_stops"):
        lines.append(f"budget: {summary['budget_stops']} of {summary['moves']} moves stopped before the full depth")
    return "\n".join(lines)


def _plot_max_tiles(results, path: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("(matplotlib not installed: no histogram)")
        return False

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    tiles = sorted({r.max_tile for r in results})
    counts = [sum(r.max_tile == t for r in results) for t in tiles]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([str(t) for t in tiles], counts)
    ax.set_xlabel("max tile")
    ax.set_ylabel("games")
    ax.set_title(f"fastdl 2048: max tile over {len(results)} games")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---- train ------------------------------------------------------------------------------------


def cmd_train(args) -> int:
    for name, value, low in (
        ("--games", args.games, 1),
        ("--checkpoint-every", args.checkpoint_every, 1),
        ("--window", args.window, 1),
    ):
        if value < low:
            raise SystemExit(f"fastdl 2048: {name} must be at least {low}, got {value}")
    curve_path = _sibling(args.out, ".curve.json")
    try:
        _engine.check_training_settings(args.threads, args.alpha)
        tuples = _parse_tuples(args.tuples) if args.tuples is not None else None
        if args.resume:
            network = NTupleNetwork.load(args.out)
            if args.seed is not None and args.seed != network.seed:
                raise ValueError(f"--seed {args.seed} differs from seed {network.seed} of the network in {args.out}")
            if tuples is not None and tuples != network.tuples:
                raise ValueError(f"--tuples differ from the tuples {network.tuples} of the network in {args.out}")
            curve = _read_curve(curve_path) if os.path.exists(curve_path) else []
        else:
            if os.path.exists(args.out):
                raise ValueError(f"{args.out} exists: pass --resume to continue training it, or remove it")
            seed = 0 if args.seed is None else args.seed
            network = NTupleNetwork(seed=seed) if tuples is None else NTupleNetwork(tuples, seed=seed)
            curve = []
    except (ValueError, OSError) as error:
        raise SystemExit(f"fastdl 2048: {error}") from None

    start_games, recent, chunk = network.games_trained, [], 16
    if start_games >= args.games:
        print(f"{args.out} has already trained {start_games} games (--games {args.games})")
        return 0
    start = time.perf_counter()
    next_checkpoint = start_games + args.checkpoint_every

    def checkpoint():
        network.save(args.out)
        _write_curve(curve_path, curve)
        _plot_curve(curve, _sibling(args.out, ".png"))

    try:
        while network.games_trained < args.games:
            todo = min(chunk, args.games - network.games_trained, next_checkpoint - network.games_trained)
            tick = time.perf_counter()
            first = network.games_trained
            for index, game in enumerate(network.train(todo, threads=args.threads, alpha=args.alpha)):
                recent.append(game)
                if len(recent) == args.window:  # a learning-curve point every `window` games
                    curve.append(
                        {
                            "games": first + index + 1,
                            "mean_score": statistics.fmean(g.score for g in recent),
                            **{str(tile): rate for tile, rate in rates(recent).items()},
                        }
                    )
                    recent = []
            # Chunks of about half a second: a steady progress bar, and Ctrl-C is served promptly.
            elapsed = time.perf_counter() - tick
            chunk = max(1, min(100000, int(todo * 0.5 / max(elapsed, 1e-3))))
            if network.games_trained >= next_checkpoint:
                checkpoint()
                next_checkpoint += args.checkpoint_every
            done = network.games_trained - start_games
            rate = done / (time.perf_counter() - start)
            last = curve[-1] if curve else None
            shares = (
                f"last {args.window}: 2048 {last['2048']:.1%}, 8192 {last['8192']:.1%}, "
                f"16384 {last['16384']:.1%}, mean score {last['mean_score']:.0f}"
                if last
                else ""
            )
            sys.stderr.write(f"\r{_progress_bar(network.games_trained, args.games)} {rate:.0f} games/s {shares}  ")
            sys.stderr.flush()
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted: saving the network\n")
        checkpoint()
        print(f"wrote {args.out} ({network.games_trained} games trained)")
        return 130
    sys.stderr.write("\n")
    checkpoint()
    print(
        f"wrote {args.out} ({network.games_trained} games trained, "
        f"{(network.games_trained - start_games) / (time.perf_counter() - start):.0f} games/s)"
    )
    return 0


def _parse_tuples(spec: str) -> list[list[int]]:
    try:
        return [[int(cell) for cell in item.split(",")] for item in spec.split()]
    except ValueError:
        raise ValueError(
            f"--tuples must be tuples of cells separated by spaces, cells by commas, got {spec!r}"
        ) from None


def _sibling(path: str, suffix: str) -> str:
    """``net.bin`` -> ``net.png``: the learning curve's files next to the weights file."""
    root, _ = os.path.splitext(path)
    return root + suffix


def _read_curve(path: str) -> list:
    try:
        with open(path) as f:
            curve = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable learning curve ({error})") from None
    if not isinstance(curve, list) or not all(isinstance(p, dict) and "games" in p for p in curve):
        raise ValueError(f"{path}: not a learning curve (a JSON list of points)")
    return curve


def _write_curve(path: str, curve: list) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(curve, f)
    os.replace(path + ".tmp", path)


def _plot_curve(curve: list, path: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("(matplotlib not installed: no learning-curve PNG)")
        return False
    if not curve:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    games = [p["games"] for p in curve]
    fig, (rates_axis, score_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    for tile in ("2048", "8192", "16384"):
        rates_axis.plot(games, [100 * p[tile] for p in curve], label=f"reached {tile}")
    rates_axis.set_xlabel("training games")
    rates_axis.set_ylabel("% of games (greedy)")
    rates_axis.legend()
    score_axis.plot(games, [p["mean_score"] for p in curve])
    score_axis.set_xlabel("training games")
    score_axis.set_ylabel("mean score")
    fig.suptitle("fastdl 2048: n-tuple network, TD(0) learning curve")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
