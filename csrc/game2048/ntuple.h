// An n-tuple network: a board evaluation learned by TD(0) afterstate learning.
//
// Each tuple is a list of up to kMaxTupleCells cells and owns a table of 16^k float weights, one
// per combination of the cells' ranks. The network applies every tuple under the 8 symmetries of
// the square, so the value of a board is the sum of tuples x 8 table entries, and every board
// has the value of its rotations and reflections.
#pragma once

#include <array>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "board.h"

namespace fastdl::game2048 {

constexpr int kMaxTupleCells = 6;  // 16^6 floats = 64 MiB per tuple; 16^7 would be 1 GiB
constexpr int kMaxTuples = 16;
constexpr int kSymmetries = 8;

// Symmetry s of the square maps cell (r, c) to: (c, r) first when s & 4, then row r -> 3 - r
// when s & 1, then column c -> 3 - c when s & 2. s = 0 is the identity.
int symmetric_cell(int cell, int symmetry);

struct TrainingGame {
  std::uint64_t score = 0;
  int max_tile = 0;
  int moves = 0;
};

class NTupleNetwork {
 public:
  // Throws std::invalid_argument (naming `tuples`) unless there are 1..kMaxTuples tuples of
  // 1..kMaxTupleCells distinct cells in [0, 16). The weights start at 0.
  // (The cells are long long so that a caller's out-of-range value reaches the check intact.)
  explicit NTupleNetwork(const std::vector<std::vector<long long>>& tuples);
  NTupleNetwork(const NTupleNetwork&) = delete;
  NTupleNetwork& operator=(const NTupleNetwork&) = delete;

  const std::vector<std::vector<int>>& tuples() const { return tuples_; }
  int features() const { return int(tuples_.size()) * kSymmetries; }
  float* weights(int tuple) { return weights_[tuple].get(); }
  std::size_t table_size(int tuple) const { return std::size_t{1} << (4 * tuples_[tuple].size()); }

  // The sum, in double, of the features' weights in the order tuple 0 symmetry 0, tuple 0
  // symmetry 1, ... (the reference sums in the same order, so the values agree exactly).
  double value(Board board) const;
  // Adds `delta` to the weight of every feature of `board`, feature by feature.
  void update(Board board, float delta);

  // TD(0) afterstate learning over the next `games` games, `threads` games at a time: results in
  // game order. Game g of the network's training (g = games_trained, games_trained + 1, ...)
  // draws its tiles from Rng(seed + g), so training in several calls equals one long call. With one
  // thread the weights after training are bit-reproducible; with more, the threads update the
  // shared weights without locks (relaxed atomic loads and stores, Hogwild style), so an update
  // that races with another may be lost; TD learning tolerates that.
  std::vector<TrainingGame> train(std::uint64_t seed, std::uint64_t games, int threads,
                                  double alpha);
  std::uint64_t games_trained =
      0;  // counted with the updates, so a saved count matches the weights

 private:
  std::uint32_t index(Board board, const std::array<std::uint8_t, kMaxTupleCells>& cells,
                      int length) const {
    std::uint32_t index = 0;
    for (int j = 0; j < length; ++j) index |= std::uint32_t(cell_rank(board, cells[j])) << (4 * j);
    return index;
  }
  TrainingGame play_training_game(std::uint64_t seed, double step);

  std::vector<std::vector<int>> tuples_;
  // The cells of tuple t under symmetry s: cells_[t * kSymmetries + s].
  std::vector<std::array<std::uint8_t, kMaxTupleCells>> cells_;
  // calloc'd: large tables come as untouched zero pages, so a fresh network costs no time and
  // only the memory of the entries that training reaches (most 6-tuple entries never occur).
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::vector<std::unique_ptr<float[], Free>> weights_;
};

}  // namespace fastdl::game2048
