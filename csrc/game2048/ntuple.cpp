#include "ntuple.h"

#include <algorithm>
#include <atomic>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>

#include "search.h"  // the settings' checks

namespace fastdl::game2048 {

namespace {

[[noreturn]] void reject(const std::string& message) { throw std::invalid_argument(message); }

// Training threads share the weights without locks. Relaxed atomic accesses compile to plain
// loads and stores, but make the races well defined: a racing update may be lost, never torn.
float load_weight(const float& weight) {
  return std::atomic_ref<float>(const_cast<float&>(weight)).load(std::memory_order_relaxed);
}
void add_to_weight(float& weight, float delta) {
  std::atomic_ref<float> ref(weight);
  ref.store(ref.load(std::memory_order_relaxed) + delta, std::memory_order_relaxed);
}

std::string show_tuple(const std::vector<long long>& tuple) {
  std::string text = "[";
  for (std::size_t j = 0; j < tuple.size(); ++j) {
    if (j) text += ", ";
    text += std::to_string(tuple[j]);
  }
  return text + "]";
}

}  // namespace

int symmetric_cell(int cell, int symmetry) {
  int r = cell / 4, c = cell % 4;
  if (symmetry & 4) std::swap(r, c);
  if (symmetry & 1) r = 3 - r;
  if (symmetry & 2) c = 3 - c;
  return 4 * r + c;
}

NTupleNetwork::NTupleNetwork(const std::vector<std::vector<long long>>& tuples) {
  if (tuples.empty() || int(tuples.size()) > kMaxTuples)
    reject("tuples must be 1 to " + std::to_string(kMaxTuples) + " tuples, got " +
           std::to_string(tuples.size()));
  for (std::size_t t = 0; t < tuples.size(); ++t) {
    const auto& tuple = tuples[t];
    std::string where = "tuples[" + std::to_string(t) + "] = " + show_tuple(tuple);
    if (tuple.empty() || int(tuple.size()) > kMaxTupleCells)
      reject(where + " must have 1 to " + std::to_string(kMaxTupleCells) + " cells");
    std::uint32_t seen = 0;
    for (long long cell : tuple) {
      if (cell < 0 || cell >= 16) reject(where + " has a cell outside [0, 16)");
      if (seen & (1u << cell)) reject(where + " repeats cell " + std::to_string(cell));
      seen |= 1u << cell;
    }
    tuples_.emplace_back(tuple.begin(), tuple.end());
    for (int s = 0; s < kSymmetries; ++s) {
      std::array<std::uint8_t, kMaxTupleCells> cells{};
      for (std::size_t j = 0; j < tuple.size(); ++j)
        cells[j] = std::uint8_t(symmetric_cell(tuple[j], s));
      cells_.push_back(cells);
    }
    auto* table =
        static_cast<float*>(std::calloc(std::size_t{1} << (4 * tuple.size()), sizeof(float)));
    if (!table) throw std::bad_alloc();
    weights_.emplace_back(table);
  }
}

double NTupleNetwork::value(Board board) const {
  double total = 0.0;
  for (std::size_t t = 0; t < tuples_.size(); ++t) {
    const float* table = weights_[t].get();
    int length = int(tuples_[t].size());
    for (int s = 0; s < kSymmetries; ++s)
      total += load_weight(table[index(board, cells_[t * kSymmetries + s], length)]);
  }
  return total;
}

void NTupleNetwork::update(Board board, float delta) {
  for (std::size_t t = 0; t < tuples_.size(); ++t) {
    float* table = weights_[t].get();
    int length = int(tuples_[t].size());
    for (int s = 0; s < kSymmetries; ++s)
      add_to_weight(table[index(board, cells_[t * kSymmetries + s], length)], delta);
  }
}

// One greedy self-play game with TD(0) updates of the afterstate values:
//   move a = argmax over legal moves of reward(s, a) + V(afterstate(s, a))  (ties: first of up,
//   down, left, right); after the next move (reward r', afterstate s'') the previous afterstate s'
//   learns V(s') += step * (r' + V(s'') - V(s')) on each of its features; the last afterstate of
//   the game learns towards 0. V(s'') is the value the move was chosen with; V(s') is read anew.
TrainingGame NTupleNetwork::play_training_game(std::uint64_t seed, double step) {
  Rng rng(seed);
  TrainingGame game;
  Board board = spawn_tile(spawn_tile(0, rng), rng);
  Board previous = 0;
  bool has_previous = false;
  for (;;) {
    int best = -1;
    double best_value = 0.0;
    MoveOutcome best_outcome{};
    for (int direction = 0; direction < kNumDirections; ++direction) {
      MoveOutcome outcome = apply_move(board, direction);
      if (outcome.board == board || outcome.overflow) continue;
      double value = double(outcome.gain) + this->value(outcome.board);
      if (best < 0 || value > best_value) {
        best = direction;
        best_value = value;
        best_outcome = outcome;
      }
    }
    double target = best < 0 ? 0.0 : best_value;
    if (has_previous) update(previous, float(step * (target - value(previous))));
    if (best < 0) break;
    game.score += best_outcome.gain;
    ++game.moves;
    previous = best_outcome.board;
    has_previous = true;
    board = spawn_tile(best_outcome.board, rng);
  }
  int max_rank = 0;
  for (int cell = 0; cell < 16; ++cell) max_rank = std::max(max_rank, cell_rank(board, cell));
  game.max_tile = 1 << max_rank;
  return game;
}

std::vector<TrainingGame> NTupleNetwork::train(std::uint64_t seed, std::uint64_t games, int threads,
                                               double alpha) {
  check_alpha(alpha);
  check_training_threads(threads);
  // alpha is the step of the value as a whole: spread over the features that sum to it.
  double step = alpha / features();
  std::uint64_t first_game = games_trained;
  std::vector<TrainingGame> results(games);
  std::atomic<std::uint64_t> next{0};
  auto work = [&] {
    for (std::uint64_t g; (g = next.fetch_add(1)) < games;)
      results[g] = play_training_game(seed + first_game + g, step);
  };
  std::vector<std::thread> helpers;
  try {
    for (int i = 1; i < threads && std::uint64_t(i) < games; ++i) helpers.emplace_back(work);
  } catch (...) {  // no more threads to be had: the started ones and this one do the games
  }
  work();
  for (auto& helper : helpers) helper.join();
  games_trained += games;
  return results;
}

}  // namespace fastdl::game2048
