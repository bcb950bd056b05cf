// Expectimax search over 2048 positions, parameterised by an evaluation and a search policy.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "board.h"
#include "ntuple.h"

namespace fastdl::game2048 {

enum class Heuristic { kDefault, kSnake, kNotes, kNTuple };

// Weights of the default heuristic (per-line terms, summed over the 4 rows and 4 columns).
struct HeuristicWeights {
  double lost_penalty = 200000.0;   // added to every line of a live position
  double empty = 270.0;             // per empty cell
  double merges = 700.0;            // per pair of equal neighbours (ignoring gaps)
  double monotonicity = 47.0;       // times the smaller of the two monotonicity violations
  double monotonicity_power = 4.0;  // violations measured on rank^power
  double sum = 11.0;                // times sum of rank^sum_power (penalises big boards)
  double sum_power = 3.5;
};

// A board evaluation is either an n-tuple network's value or a sum of per-line table lookups:
//   sum_r row_tables[r][row r] + sum_c column_table[column c].
// Rows get one table per row index because the snake/notes weight matrices differ per row.
class Evaluator {
 public:
  Evaluator(Heuristic heuristic, const HeuristicWeights& weights,
            std::shared_ptr<const NTupleNetwork> network);
  Evaluator(const Evaluator&) = delete;
  Evaluator& operator=(const Evaluator&) = delete;

  double operator()(Board board) const {
    if (network_) return network_->value(board);
    Board columns = transpose(board);
    double value = 0.0;
    for (int i = 0; i < 4; ++i) {
      value += row_tables_[i][(board >> (16 * i)) & 0xFFFF];
      value += column_table_[(columns >> (16 * i)) & 0xFFFF];
    }
    return value;
  }

 private:
  std::vector<double> storage_;  // the distinct 65536-entry tables, back to back
  const double* row_tables_[4];  // point into storage_ (the default heuristic shares one table)
  const double* column_table_ = nullptr;
  std::shared_ptr<const NTupleNetwork> network_;  // the ntuple heuristic's network, else null
};

// A search budget, per decision. When either limit is set the search deepens iteratively
// (depth 1, 2, ... up to the configured or adaptive depth) and, once the budget is spent, returns
// the result of the deepest depth it completed. Depth 1 always completes (a few hundred nodes).
struct SearchBudget {
  std::uint64_t max_nodes = 0;  // 0: no node limit
  double time_limit = 0.0;      // seconds; 0: no time limit
  bool limited() const { return max_nodes > 0 || time_limit > 0.0; }
};

struct SearchConfig {
  Heuristic heuristic = Heuristic::kDefault;
  int depth = 0;  // 0: the heuristic's adaptive depth policy, else 1..max_depth(heuristic)
  double prob_cutoff = 1e-4;  // chance nodes reached with lower probability are evaluated
  bool cache = true;          // transposition table at chance nodes
  int threads = 0;            // 0: all hardware threads, else 1..kMaxThreads
  HeuristicWeights weights;
  std::shared_ptr<const NTupleNetwork> network;  // the ntuple heuristic's (required), else null
  SearchBudget budget;  // the default budget of every decision (none by default)
};

// ---- accepted settings (docs/game2048.md explains the choices) ------------------------------
// Every check throws std::invalid_argument with a message that names the setting and the value.

// The deepest explicit depth per heuristic. The adaptive policies stay below: default at most 13,
// snake 3, notes 6, ntuple 2. Past these the search takes minutes per decision even on easy boards.
int max_depth(Heuristic heuristic);
// prob_cutoff lies in [kMinProbCutoff, 1): below 1e-6 the default search is close to a full
// expectimax, whose cost grows by a factor ~100 per depth.
constexpr double kMinProbCutoff = 1e-6;
constexpr int kMaxThreads = 256;           // a decision uses at most 4 (one per root move)
constexpr double kMaxWeight = 1e9;         // |coefficient| of the default heuristic
constexpr double kMaxWeightPower = 8.0;    // the exponents lie in [0, 8]: 15^8 < 3e9
constexpr double kMaxTimeLimit = 86400.0;  // seconds

void check_depth(Heuristic heuristic, long long depth);
void check_prob_cutoff(double prob_cutoff);
void check_threads(long long threads);
void check_weight(const std::string& name, double value);  // also rejects unknown names
void check_max_nodes(long long max_nodes);  // >= 1 (SearchBudget uses 0 for "no limit")
void check_time_limit(double seconds);      // in (0, kMaxTimeLimit]
void validate(const SearchBudget& budget);  // time_limit finite, 0 or in (0, kMaxTimeLimit]
void validate(const SearchConfig& config);  // all of the above, and a network iff ntuple; Engine's
                                            // constructor calls it
void set_weight(HeuristicWeights& weights, const std::string& name, double value);  // checked
// n-tuple training (NTupleNetwork::train): alpha in (0, 1] (the step of the whole value; larger
// steps diverge), threads in [1, kMaxThreads].
void check_alpha(double alpha);
void check_training_threads(long long threads);

// Stops searches from outside. `flag` may be set from any thread. `poll`, if given, is called
// only on the thread that called Engine::best_move or Engine::play_game, about every
// kPollSeconds while it searches or waits; returning true stops the search (the binding uses it
// to run Python's signal handlers). A stopped search throws SearchCancelled.
struct Cancellation {
  const std::atomic<bool>* flag = nullptr;
  bool (*poll)(void* context) = nullptr;
  void* context = nullptr;
  static constexpr double kPollSeconds = 0.02;
};

class SearchCancelled : public std::exception {
 public:
  const char* what() const noexcept override { return "the search was cancelled"; }
};

struct SearchStats {
  std::uint64_t nodes = 0;        // max + chance nodes visited (leaves included)
  std::uint64_t evaluations = 0;  // heuristic evaluations
  std::uint64_t cache_hits = 0;
  void add(const SearchStats& other) {
    nodes += other.nodes;
    evaluations += other.evaluations;
    cache_hits += other.cache_hits;
  }
};

struct Decision {
  int move = -1;  // -1: no move is possible (game over, or only 65536-creating moves)
  std::array<double, kNumDirections> values{};  // NaN for unavailable moves
  int depth = 0;                  // the depth of the values: the deepest completed search
  int target_depth = 0;           // the configured or adaptive depth
  bool budget_exhausted = false;  // the budget stopped the search before target_depth
  int threads = 0;                // threads that searched (helpers start only after 1 ms)
  SearchStats stats;              // every node visited, an interrupted last depth included
  double seconds = 0.0;
};

// Fixed-size, always-replace transposition table. A generation counter invalidates all
// entries in O(1) between root searches, so every root search starts from an empty table and
// results do not depend on which thread ran which search.
//
// Memory: a table is mapped anonymously on first use (zero pages, mapped as they are touched)
// and, when its searcher goes, kept with its generation counter in a process-wide pool of up to
// kPooledTables idle tables for the next searcher: a new engine or game reuses memory that is
// already mapped, and nothing is ever cleared. (The former calloc cleared all 24 MiB whenever
// glibc served it from the heap, about 3 ms per searcher; touching fresh pages costs about 3 us
// per 4 KiB page in the VM measured, up to 20 ms for a whole table.)
class TranspositionTable {
 public:
  struct Entry {
    Board board;
    double value;
    std::uint32_t generation;
    std::int32_t depth;
  };
  static constexpr int kBits = 20;  // 2^20 entries x 24 bytes = 24 MiB per searcher
  static constexpr int kPooledTables = 4;

  TranspositionTable() = default;
  TranspositionTable(const TranspositionTable&) = delete;
  TranspositionTable& operator=(const TranspositionTable&) = delete;
  ~TranspositionTable();

  void new_search();
  const Entry* find(Board board) const;
  void store(Board board, int depth, double value);

 private:
  static std::size_t slot(Board board) {
    // Fibonacci hashing: the top bits of the product mix all 64 input bits.
    return static_cast<std::size_t>((board * 0x9E3779B97F4A7C15ULL) >> (64 - kBits));
  }
  Entry* entries_ = nullptr;
  std::uint32_t generation_ = 0;
};

class Engine;
class SearchControl;

// One search worker: its own transposition table and statistics.
class Searcher {
 public:
  explicit Searcher(const Engine& engine) : engine_(engine) {}
  // Value of the position after a root move, before the tile spawns. With a control, polls it
  // every kPollNodes nodes; the poll throws to abandon the search.
  double root_move_value(Board after_move, int depth, SearchControl* control, bool calling_thread);
  SearchStats stats;                 // of the current decision; Engine::decide resets it
  std::uint64_t reported_nodes = 0;  // part of stats.nodes already added to the control's count

  static constexpr std::uint64_t kPollNodes = 4096;  // a power of two; ~0.1 ms of search

 private:
  void visit() {
    if ((++stats.nodes & (kPollNodes - 1)) == 0 && control_) poll();
  }
  void poll();
  double max_node(Board board, int depth, double probability);
  double chance_node(Board board, int depth, double probability);
  double evaluate(Board board);

  const Engine& engine_;
  TranspositionTable table_;
  SearchControl* control_ = nullptr;
  bool calling_thread_ = false;
};

struct GameResult {
  Board final_board = 0;
  int max_tile = 0;
  std::uint64_t score = 0;
  int moves = 0;
  int budget_stops = 0;  // decisions whose search the budget cut short
  double seconds = 0.0;
  bool hit_65536_limit = false;  // stopped because every remaining move would create 65536
  SearchStats stats;
  std::vector<std::int8_t> move_log;
};

class Engine {
 public:
  explicit Engine(const SearchConfig& config);

  const SearchConfig& config() const { return config_; }
  double evaluate(Board board) const { return evaluator_(board); }
  int root_depth(Board board) const;
  // The merge score of a legal move: what rewards_in_value adds to a move's value.
  static double move_reward(Board board, int direction) {
    return double(apply_move(board, direction).gain);
  }

  // Thread-safe: concurrent callers take turns on the engine's own workers. The first form
  // uses the configured budget. Throws SearchCancelled when `cancel` stops it.
  Decision best_move(Board board) const { return best_move(board, config_.budget); }
  Decision best_move(Board board, const SearchBudget& budget,
                     const Cancellation& cancel = {}) const;
  // Each game has its own workers, so games can run concurrently on one engine. Every
  // decision uses the configured budget.
  GameResult play_game(std::uint64_t seed, bool record_moves,
                       const Cancellation& cancel = {}) const;

  // Search policy, derived from the heuristic (see docs/game2048.md).
  bool max_ply_costs_depth = false;  // notes: both plies consume depth
  bool leaf_at_max_nodes = false;    // snake/notes: evaluate after the spawn at depth 0
  bool lost_is_zero = false;         // default, ntuple: a position with no legal move is worth 0
  bool reuse_deeper_entries =
      false;  // default, ntuple: a deeper cached value answers a shallower query
  bool root_ply_costs_depth =
      false;  // notes, ntuple: the root move consumes depth (ntuple depth 1 = greedy)
  bool rewards_in_value = false;  // ntuple: a move's value adds its merge score (the network
                                  // values afterstates by their expected future score)

  // The searchers of one caller (the engine's, or one game's) and the size of its last
  // decision: a caller whose trees are large gets its helper threads at once.
  struct Workers {
    std::vector<std::unique_ptr<Searcher>> searchers;
    std::uint64_t last_decision_nodes = 0;
  };

 private:
  Decision decide(Board board, Workers& workers, const SearchBudget& budget,
                  const Cancellation& cancel) const;
  int thread_count() const;

  SearchConfig config_;
  Evaluator evaluator_;
  mutable std::timed_mutex workers_mutex_;
  mutable Workers workers_;
};

Heuristic parse_heuristic(const std::string& name);

}  // namespace fastdl::game2048
