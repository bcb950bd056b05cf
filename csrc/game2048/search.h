// Expectimax search over 2048 positions, parameterised by an evaluation and a search policy.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "board.h"

namespace fastdl::game2048 {

enum class Heuristic { kDefault, kSnake, kNotes };

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

// A board evaluation is a sum of per-line table lookups:
//   sum_r row_tables[r][row r] + sum_c column_table[column c].
// Rows get one table per row index because the snake/notes weight matrices differ per row.
class Evaluator {
public:
    Evaluator(Heuristic heuristic, const HeuristicWeights& weights);
    Evaluator(const Evaluator&) = delete;
    Evaluator& operator=(const Evaluator&) = delete;

    double operator()(Board board) const {
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
    const double* column_table_;
};

struct SearchConfig {
    Heuristic heuristic = Heuristic::kDefault;
    int depth = 0;              // <= 0: the heuristic's adaptive depth policy
    double prob_cutoff = 1e-4;  // chance nodes reached with lower probability are evaluated
    bool cache = true;          // transposition table at chance nodes
    int threads = 0;            // <= 0: all hardware threads
    HeuristicWeights weights;
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
    int depth = 0;
    SearchStats stats;
    double seconds = 0.0;
};

// Fixed-size, always-replace transposition table. A generation counter invalidates all
// entries in O(1) between root searches, so every root search starts from an empty table and
// results do not depend on which thread ran which search.
class TranspositionTable {
public:
    struct Entry {
        Board board;
        double value;
        std::uint32_t generation;
        std::int32_t depth;
    };
    static constexpr int kBits = 20;  // 2^20 entries x 24 bytes = 24 MiB per searcher

    void new_search();
    const Entry* find(Board board) const;
    void store(Board board, int depth, double value);

private:
    static std::size_t slot(Board board) {
        // Fibonacci hashing: the top bits of the product mix all 64 input bits.
        return static_cast<std::size_t>((board * 0x9E3779B97F4A7C15ULL) >> (64 - kBits));
    }
    struct FreeDeleter { void operator()(Entry* p) const; };
    std::unique_ptr<Entry[], FreeDeleter> entries_;  // calloc'd: pages are mapped on first touch
    std::uint32_t generation_ = 0;
};

class Engine;

// One search worker: its own transposition table and statistics.
class Searcher {
public:
    explicit Searcher(const Engine& engine) : engine_(engine) {}
    // Value of the position after a root move, before the tile spawns.
    double root_move_value(Board after_move, int depth);
    SearchStats stats;  // of the current decision; Engine::decide resets it

private:
    double max_node(Board board, int depth, double probability);
    double chance_node(Board board, int depth, double probability);
    double evaluate(Board board);

    const Engine& engine_;
    TranspositionTable table_;
};

struct GameResult {
    Board final_board = 0;
    int max_tile = 0;
    std::uint64_t score = 0;
    int moves = 0;
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

    // Thread-safe: concurrent callers take turns on the engine's own workers.
    Decision best_move(Board board) const;
    // Each game has its own workers, so games can run concurrently on one engine.
    GameResult play_game(std::uint64_t seed, bool record_moves) const;

    // Search policy, derived from the heuristic (see docs/game2048.md).
    bool max_ply_costs_depth = false;  // notes: both plies consume depth
    bool leaf_at_max_nodes = false;    // snake/notes: evaluate after the spawn at depth 0
    bool lost_is_zero = false;         // default: a position with no legal move is worth 0
    bool reuse_deeper_entries = false; // default: a deeper cached value answers a shallower query

private:
    Decision decide(Board board, std::vector<std::unique_ptr<Searcher>>& workers) const;
    int thread_count() const;

    SearchConfig config_;
    Evaluator evaluator_;
    mutable std::mutex workers_mutex_;
    mutable std::vector<std::unique_ptr<Searcher>> workers_;
};

Heuristic parse_heuristic(const std::string& name);

}  // namespace fastdl::game2048
