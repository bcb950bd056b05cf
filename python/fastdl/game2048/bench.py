"""Benchmark records behind ``fastdl 2048 bench --results FILE``: games played in worker
processes or by an external engine, one JSON line per finished game, and the distribution of
max tiles over every recorded game with Wilson 95% confidence intervals.

External engines speak a line protocol on stdin/stdout: fastdl writes one line of 16 tile values
(row by row, top row first, 0 = empty, separated by spaces) and reads one line back, ``up``,
``down``, ``left`` or ``right``. When the game is over fastdl closes the engine's stdin.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import select
import shlex
import subprocess
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed

from . import Board, Direction, Engine, IllegalMoveError, Rng

MILESTONES = (2048, 4096, 8192, 16384, 32768)


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for the default z)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


# ---- records -----------------------------------------------------------------------------------


def append_record(path: str, record: dict) -> None:
    """Appends one game as a JSON line; each line is written whole, so an interrupted run keeps
    every game it finished."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_records(path: str) -> list[dict]:
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error})") from None
            if not isinstance(record, dict) or not {"settings", "max_tile", "score"} <= set(record):
                raise ValueError(f"{path}:{number}: not a game record")
            records.append(record)
    return records


def format_distribution(records: list[dict]) -> str:
    """Per settings: the games, their median score, and for each milestone the share of games
    that reached it with its Wilson 95% interval."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(json.dumps(record["settings"], sort_keys=True), []).append(record)
    lines = []
    for key, games in groups.items():
        scores = sorted(g["score"] for g in games)
        lines.append(f"{key}: {len(games)} games, median score {scores[len(scores) // 2]}")
        for tile in MILESTONES:
            reached = sum(g["max_tile"] >= tile for g in games)
            low, high = wilson_interval(reached, len(games))
            lines.append(f"  reached {tile:>5}: {reached / len(games):6.1%}  (95% CI {low:6.1%} - {high:6.1%})")
    return "\n".join(lines)


# ---- fastdl games in worker processes ----------------------------------------------------------

_worker_engine: Engine | None = None


def _start_worker(engine_kwargs: dict) -> None:
    global _worker_engine
    _worker_engine = Engine(**engine_kwargs)


def _play_in_worker(seed: int) -> dict:
    from . import play_game

    game = play_game(seed, engine=_worker_engine)
    return {"seed": seed, "max_tile": game.max_tile, "score": game.score, "moves": game.moves, "seconds": game.seconds}


def play_in_processes(engine_kwargs: dict, seeds: list[int], jobs: int, on_game) -> None:
    """Plays play_game(seed) for every seed, ``jobs`` processes at a time, each with its own
    Engine(**engine_kwargs); ``on_game(record)`` gets each game as it ends."""
    Engine(**engine_kwargs)  # bad settings fail here, once, not in every worker
    # spawn, not fork: the parent may run threads, and a forked copy of a locked mutex deadlocks.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_start_worker, initargs=(engine_kwargs,)
    ) as pool:
        futures = [pool.submit(_play_in_worker, seed) for seed in seeds]
        try:
            for future in as_completed(futures):
                on_game(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise


# ---- external engines --------------------------------------------------------------------------


class ExternalEngineError(RuntimeError):
    """The external engine broke the protocol, timed out or died."""


def _ask(process, board: Board, command: str, timeout: float) -> Direction:
    line = " ".join(str(tile) for row in board.to_list() for tile in row)
    try:
        process.stdin.write(line + "\n")
        process.stdin.flush()
    except BrokenPipeError:
        raise ExternalEngineError(f"external engine {command!r} exited (status {process.wait()})") from None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise ExternalEngineError(f"external engine {command!r} did not answer within {timeout:g} s")
    answer = process.stdout.readline()
    if not answer:
        raise ExternalEngineError(
            f"external engine {command!r} exited (status {process.wait()}) instead of answering {line!r}"
        )
    try:
        return Direction.parse(answer.strip())
    except ValueError:
        raise ExternalEngineError(
            f"external engine {command!r} answered {answer.strip()!r} to {line!r}: expected up, down, left or right"
        ) from None


def play_external(command: str, seed: int, timeout: float) -> dict:
    """One game of the external engine: the tiles of play_game(seed), one process per game."""
    start = time.perf_counter()
    try:
        process = subprocess.Popen(
            shlex.split(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
    except OSError as error:
        raise ExternalEngineError(f"cannot start external engine {command!r}: {error}") from None
    try:
        rng = Rng(seed)
        board, moves = Board.new_game(rng), 0
        while not board.is_over():
            direction = _ask(process, board, command, timeout)
            try:
                board = board.move(direction).spawn(rng)
            except IllegalMoveError:
                raise ExternalEngineError(
                    f"external engine {command!r} played the illegal move {direction} on {board.to_list()}"
                ) from None
            except OverflowError:
                break  # only a 65536 merge is left: the game ends as fastdl's does
            moves += 1
    except BaseException:
        process.kill()  # a broken engine gets no grace period
        raise
    finally:
        try:
            process.stdin.close()  # the end of the game: a well-behaved engine exits now
        except BrokenPipeError:
            pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return {
        "seed": seed,
        "max_tile": board.max_tile,
        "score": board.score,
        "moves": moves,
        "seconds": time.perf_counter() - start,
    }


def play_external_games(command: str, seeds: list[int], jobs: int, timeout: float, on_game) -> None:
    """Every seed with the external engine, ``jobs`` games (processes) at a time."""
    try:
        words = shlex.split(command)
    except ValueError as error:
        raise ValueError(f"--versus must be a command line, got {command!r} ({error})") from None
    if not words:
        raise ValueError("--versus must be a command line, got an empty one")
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [
            pool.submit(lambda s=seed: None if stop.is_set() else play_external(command, s, timeout)) for seed in seeds
        ]
        try:
            for future in as_completed(futures):
                record = future.result()
                if record is not None:
                    on_game(record)
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            raise


def default_jobs() -> int:
    return os.cpu_count() or 1
