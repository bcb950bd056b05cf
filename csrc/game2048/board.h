// 2048 board representation, moves and tile spawning.
//
// A board is a 64-bit word of 16 four-bit cells. Cell (row r, column c) lives in bits
// [16r + 4c, 16r + 4c + 4) and holds the log2 of its tile (0 = empty, 1 = 2, ..., 15 = 32768).
// Row 0 is the top row and column 0 the leftmost column, so a row is one 16-bit chunk whose
// lowest nibble is its leftmost cell.
#pragma once

#include <cstdint>
#include <vector>

namespace fastdl::game2048 {

using Board = std::uint64_t;

enum Direction : int { kUp = 0, kDown = 1, kLeft = 2, kRight = 3 };
constexpr int kNumDirections = 4;

// The largest rank a nibble can hold: 2^15 = 32768. Two 32768 tiles would merge into 65536,
// which does not fit, so such a move is reported as an overflow instead of wrapping to 0.
constexpr int kMaxRank = 15;

struct MoveOutcome {
  Board board;         // the board after the move (unchanged when the move is illegal)
  std::uint32_t gain;  // sum of the tiles created by merges
  bool overflow;       // the move would merge two 32768 tiles into 65536
};

inline int cell_rank(Board board, int cell) {
  return static_cast<int>((board >> (4 * cell)) & 0xF);
}

inline Board with_cell(Board board, int cell, int rank) {
  return (board & ~(Board{0xF} << (4 * cell))) | (Board(rank) << (4 * cell));
}

// Transposes the 4x4 nibble matrix, (r, c) -> (c, r), in two swap rounds.
inline Board transpose(Board x) {
  // Round 1, inside every 2x2 block of cells: the off-diagonal cells (r even, c odd) and
  // (r odd, c even) are 3 nibbles (12 bits) apart and trade places; the diagonal stays.
  Board round1 = (x & 0xF0F00F0FF0F00F0FULL) | ((x & 0x0000F0F00000F0F0ULL) << 12) |
                 ((x & 0x0F0F00000F0F0000ULL) >> 12);
  // Round 2, whole 2x2 blocks: the top-right block and the bottom-left block are 6 nibbles
  // (24 bits) apart and trade places; the two diagonal blocks stay.
  return (round1 & 0xFF00FF0000FF00FFULL) | ((round1 & 0x00000000FF00FF00ULL) << 24) |
         ((round1 & 0x00FF00FF00000000ULL) >> 24);
}

// Number of empty cells: fold each nibble into its low bit (1 when the nibble is non-zero),
// then count the set bits.
inline int count_empty(Board board) {
  Board occupied = board | (board >> 1);
  occupied |= occupied >> 2;
  return 16 - __builtin_popcountll(occupied & 0x1111111111111111ULL);
}

// Per-row lookup tables: each entry packs the moved row (bits 0-15) and an overflow flag
// (bit 16), so a move needs one load per row and an OR of the flags.
struct RowTables {
  std::vector<std::uint32_t> left, right;  // 65536 entries each
  std::vector<std::uint32_t> gain;         // merge score of a row; the same both ways
  RowTables();
};

const RowTables& row_tables();

constexpr std::uint32_t kOverflowFlag = 1u << 16;

inline Board move_rows(Board board, const std::uint32_t* table, bool* overflow) {
  Board out = 0;
  std::uint32_t flags = 0;
  for (int r = 0; r < 4; ++r) {
    std::uint32_t entry = table[(board >> (16 * r)) & 0xFFFF];
    out |= Board(entry & 0xFFFF) << (16 * r);
    flags |= entry;
  }
  *overflow = (flags & kOverflowFlag) != 0;
  return out;
}

// The board after a move; the merge score is not computed (the search does not need it).
inline Board move_board(Board board, int direction, bool* overflow) {
  const RowTables& tables = row_tables();
  switch (direction) {
    case kLeft:
      return move_rows(board, tables.left.data(), overflow);
    case kRight:
      return move_rows(board, tables.right.data(), overflow);
    // Columns become rows under transposition; up = towards row 0 = left after transposing.
    case kUp:
      return transpose(move_rows(transpose(board), tables.left.data(), overflow));
    default:
      return transpose(move_rows(transpose(board), tables.right.data(), overflow));
  }
}

MoveOutcome apply_move(Board board, int direction);

// xoshiro256** seeded through splitmix64: small, fast and reproducible on every platform.
class Rng {
 public:
  explicit Rng(std::uint64_t seed);
  std::uint64_t next();
  // Uniform integer in [0, n); the modulo bias is below 2^-59 for n <= 16, i.e. invisible.
  std::uint64_t below(std::uint64_t n) { return next() % n; }
  // Uniform double in [0, 1) from the top 53 bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

 private:
  std::uint64_t state_[4];
};

std::uint64_t splitmix64(std::uint64_t& state);

// Puts a 2 (probability 0.9) or a 4 (0.1) on a uniformly chosen empty cell; the board must
// have one. Draws the cell first, then the value.
Board spawn_tile(Board board, Rng& rng);

}  // namespace fastdl::game2048
