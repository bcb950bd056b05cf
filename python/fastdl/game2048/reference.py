"""A straightforward pure-Python 2048 implementation: list-of-lists boards, the rules written
out plainly, the ``snake`` and ``notes`` evaluations and the plain expectimax search of the
course notes. It is slow on purpose: it is the yardstick the tests check the C++ engine
against, and the baseline the benchmarks compare its speed with.
"""

from __future__ import annotations

DIRECTIONS = ("up", "down", "left", "right")

# Position weights of the snake and notes evaluations: largest in the top-left corner.
SNAKE_WEIGHTS = [[65536, 32768, 16384, 8192], [512, 1024, 2048, 4096], [256, 512, 1024, 2048], [128, 256, 512, 1024]]


def slide_row_left(row):
    """(new row, merge score): slide to index 0, merge equal pairs front to back, once each."""
    tiles = [t for t in row if t]
    out, score, i = [], 0, 0
    while i < len(tiles):
        if i + 1 < len(tiles) and tiles[i] == tiles[i + 1]:
            out.append(2 * tiles[i])
            score += 2 * tiles[i]
            i += 2
        else:
            out.append(tiles[i])
            i += 1
    return out + [0] * (4 - len(out)), score


def transpose(grid):
    return [list(column) for column in zip(*grid)]


def move(grid, direction):
    """(new grid, merge score) after sliding ``direction`` ("up", "down", "left", "right")."""
    flip = direction in ("right", "down")
    lines = transpose(grid) if direction in ("up", "down") else [list(row) for row in grid]
    moved, score = [], 0
    for line in lines:
        new, gained = slide_row_left(line[::-1] if flip else line)
        moved.append(new[::-1] if flip else new)
        score += gained
    return (transpose(moved) if direction in ("up", "down") else moved), score


def legal_children(grid):
    """(direction, grid after the move) for every move that changes the board."""
    for direction in DIRECTIONS:
        moved, _ = move(grid, direction)
        if moved != grid:
            yield direction, moved


def monotone(line):
    """Non-increasing or non-decreasing, zeros included."""
    pairs = list(zip(line, line[1:]))
    return all(a >= b for a, b in pairs) or all(a <= b for a, b in pairs)


def snake_eval(grid):
    value = 100 * sum(tile == 0 for row in grid for tile in row)
    value += sum(grid[i][j] * SNAKE_WEIGHTS[i][j] for i in range(4) for j in range(4))
    value += sum(sum(line) for line in grid + transpose(grid) if monotone(line))
    return value


def notes_eval(grid):
    lines = grid + transpose(grid)
    value = sum(grid[i][j] * SNAKE_WEIGHTS[i][j] for i in range(4) for j in range(4))
    value += 500 * sum(tile == 0 for row in grid for tile in row)
    value -= 5 * sum(abs(a - b) for line in lines for a, b in zip(line, line[1:]))
    value += 100 * sum(monotone(line) for line in lines)
    return value


def expectimax(grid, depth, is_max, evaluate, max_costs_depth):
    """The notes' plain expectimax. Chance plies always consume one depth, max plies only when
    ``max_costs_depth`` (notes: 1, snake: 0). Evaluation at depth 0, at a max node with no legal
    move, and at a chance node with no empty cell."""
    children = list(legal_children(grid)) if is_max else None
    if depth <= 0 or (is_max and not children):
        return evaluate(grid)
    if is_max:
        return max(expectimax(m, depth - max_costs_depth, False, evaluate, max_costs_depth) for _, m in children)
    empty = [(i, j) for i in range(4) for j in range(4) if grid[i][j] == 0]
    if not empty:
        return evaluate(grid)
    total = 0.0
    for i, j in empty:
        for tile, probability in ((2, 0.9), (4, 0.1)):
            child = [row[:] for row in grid]
            child[i][j] = tile
            total += probability * expectimax(child, depth - 1, True, evaluate, max_costs_depth)
    return total / len(empty)


def best_move(grid, depth, evaluate, max_costs_depth):
    """(best direction or None, {direction: value}); ties go to the first of up, down, left, right."""
    values = {
        d: expectimax(m, depth - max_costs_depth, False, evaluate, max_costs_depth) for d, m in legal_children(grid)
    }
    best = max(values, key=values.__getitem__) if values else None
    return best, values


def snake_best_move(grid, depth=3):
    return best_move(grid, depth, snake_eval, 0)


def notes_root_depth(grid):
    empty = sum(tile == 0 for row in grid for tile in row)
    return 4 if empty >= 6 else 5 if empty >= 3 else 6


def notes_best_move(grid, depth=None):
    return best_move(grid, depth or notes_root_depth(grid), notes_eval, 1)


# ---- n-tuple networks -----------------------------------------------------------------------
# The network of fastdl.game2048.ntuple written out plainly: cells are 4 * row + column, a
# tuple's index puts the rank (log2 of the tile, 0 = empty) of its j-th cell in bits 4j..4j+3,
# weights are per-tuple float32 arrays (numpy), and the value sums them in double, tuple by
# tuple, symmetry by symmetry, as the engine does.


def symmetric_cell(cell, symmetry):
    """Symmetry s: transpose when s & 4, then flip the rows when s & 1, then the columns when s & 2."""
    r, c = divmod(cell, 4)
    if symmetry & 4:
        r, c = c, r
    if symmetry & 1:
        r = 3 - r
    if symmetry & 2:
        c = 3 - c
    return 4 * r + c


def ntuple_features(grid, tuples):
    """(tuple number, table index) of every feature, tuple-major, symmetry-minor."""
    ranks = [tile.bit_length() - 1 if tile else 0 for row in grid for tile in row]
    for t, cells in enumerate(tuples):
        for symmetry in range(8):
            yield t, sum(ranks[symmetric_cell(cell, symmetry)] << (4 * j) for j, cell in enumerate(cells))


def ntuple_value(grid, tuples, weights):
    total = 0.0
    for t, index in ntuple_features(grid, tuples):
        total += float(weights[t][index])
    return total


def ntuple_update(grid, tuples, weights, delta):
    """Adds the float32 ``delta`` to every feature's weight, one feature after the other."""
    for t, index in ntuple_features(grid, tuples):
        weights[t][index] = weights[t][index] + delta


def spawn(grid, rng):
    """The engine's spawn rule with its random numbers: the rng.below(empty)-th empty cell in
    row-major order gets a 4 when rng.uniform() < 0.1, else a 2."""
    empty = [(i, j) for i in range(4) for j in range(4) if grid[i][j] == 0]
    i, j = empty[rng.below(len(empty))]
    child = [row[:] for row in grid]
    child[i][j] = 4 if rng.uniform() < 0.1 else 2
    return child


def td_training_game(tuples, weights, rng, alpha):
    """One greedy game with TD(0) afterstate updates, as NTupleNetwork.train plays it: the move
    maximises merge score + V(afterstate) (ties: first of up, down, left, right; a move creating
    65536 is not available); once the next move is chosen (score r, afterstate value v), the
    previous afterstate s learns V(s) += alpha / features * (r + v - V(s)), and the last one learns
    towards 0. ``weights`` (float32 numpy arrays) change in place; returns (score, max tile, moves)."""
    import numpy as np

    step = alpha / (8 * len(tuples))
    grid = spawn(spawn([[0] * 4 for _ in range(4)], rng), rng)
    previous, score, moves = None, 0, 0
    while True:
        best = None
        for direction, moved in legal_children(grid):
            if any(tile > 32768 for row in moved for tile in row):
                continue
            gained = move(grid, direction)[1]
            value = gained + ntuple_value(moved, tuples, weights)
            if best is None or value > best[0]:
                best = (value, moved, gained)
        target = 0.0 if best is None else best[0]
        if previous is not None:
            ntuple_update(
                previous, tuples, weights, np.float32(step * (target - ntuple_value(previous, tuples, weights)))
            )
        if best is None:
            return score, max(max(row) for row in grid), moves
        _, previous, gained = best
        score += gained
        moves += 1
        grid = spawn(previous, rng)
