#include "board.h"

#include <array>

namespace fastdl::game2048 {

namespace {

// Slides one row of four ranks towards index 0, merging equal neighbours front to back.
// Returns the merge score; sets *overflow when two 32768 tiles would merge.
std::uint32_t slide_left(std::array<int, 4>& cells, bool* overflow) {
  std::array<int, 4> out{};
  std::uint32_t gain = 0;
  int filled = 0;
  bool last_merged = false;  // a tile created by a merge does not merge again this move
  for (int rank : cells) {
    if (rank == 0) continue;
    if (filled > 0 && !last_merged && out[filled - 1] == rank) {
      if (rank == kMaxRank) *overflow = true;
      out[filled - 1] = rank + 1;
      gain += 1u << (rank + 1);
      last_merged = true;
    } else {
      out[filled++] = rank;
      last_merged = false;
    }
  }
  cells = out;
  return gain;
}

std::uint32_t pack_row(const std::array<int, 4>& cells) {
  std::uint32_t row = 0;
  // An overflowing cell (rank 16) is stored as 0; the flag tells the caller not to use it.
  for (int c = 0; c < 4; ++c) row |= std::uint32_t(cells[c] & 0xF) << (4 * c);
  return row;
}

}  // namespace

RowTables::RowTables() : left(65536), right(65536), gain(65536) {
  for (std::uint32_t row = 0; row < 65536; ++row) {
    std::array<int, 4> cells;
    for (int c = 0; c < 4; ++c) cells[c] = (row >> (4 * c)) & 0xF;

    bool overflow = false;
    std::array<int, 4> moved = cells;
    gain[row] = slide_left(moved, &overflow);
    left[row] = pack_row(moved) | (overflow ? kOverflowFlag : 0);

    // Right = reverse, slide left, reverse back.
    overflow = false;
    std::array<int, 4> reversed = {cells[3], cells[2], cells[1], cells[0]};
    slide_left(reversed, &overflow);
    std::array<int, 4> back = {reversed[3], reversed[2], reversed[1], reversed[0]};
    right[row] = pack_row(back) | (overflow ? kOverflowFlag : 0);
  }
}

const RowTables& row_tables() {
  static const RowTables tables;
  return tables;
}

MoveOutcome apply_move(Board board, int direction) {
  MoveOutcome outcome{};
  outcome.board = move_board(board, direction, &outcome.overflow);
  // Equal runs merge pairwise whichever end they are read from, so the score of a line is
  // the same for both directions: one table serves rows and columns alike.
  Board lines = (direction == kUp || direction == kDown) ? transpose(board) : board;
  const RowTables& tables = row_tables();
  for (int r = 0; r < 4; ++r) outcome.gain += tables.gain[(lines >> (16 * r)) & 0xFFFF];
  return outcome;
}

std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

Rng::Rng(std::uint64_t seed) {
  for (auto& word : state_) word = splitmix64(seed);
}

std::uint64_t Rng::next() {
  auto rotl = [](std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); };
  std::uint64_t result = rotl(state_[1] * 5, 7) * 9;
  std::uint64_t t = state_[1] << 17;
  state_[2] ^= state_[0];
  state_[3] ^= state_[1];
  state_[1] ^= state_[2];
  state_[0] ^= state_[3];
  state_[2] ^= t;
  state_[3] = rotl(state_[3], 45);
  return result;
}

Board spawn_tile(Board board, Rng& rng) {
  int target = static_cast<int>(rng.below(count_empty(board)));
  int rank = rng.uniform() < 0.1 ? 2 : 1;
  for (int cell = 0; cell < 16; ++cell) {
    if (cell_rank(board, cell) != 0) continue;
    if (target-- == 0) return with_cell(board, cell, rank);
  }
  return board;  // unreachable when the board has an empty cell
}

}  // namespace fastdl::game2048
