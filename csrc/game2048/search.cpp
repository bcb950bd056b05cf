#include "search.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <new>
#include <stdexcept>
#include <thread>

namespace fastdl::game2048 {

namespace {

using Line = std::array<int, 4>;  // four ranks, index 0 first

Line unpack_line(std::uint32_t line) {
    return {int(line & 0xF), int((line >> 4) & 0xF), int((line >> 8) & 0xF), int((line >> 12) & 0xF)};
}

double tile_value(int rank) { return rank == 0 ? 0.0 : double(1u << rank); }

// Non-increasing or non-decreasing, zeros included (tile order equals rank order).
bool is_monotone(const Line& line) {
    bool non_increasing = true, non_decreasing = true;
    for (int i = 1; i < 4; ++i) {
        non_increasing &= line[i - 1] >= line[i];
        non_decreasing &= line[i - 1] <= line[i];
    }
    return non_increasing || non_decreasing;
}

int count_zeros(const Line& line) { return int(std::count(line.begin(), line.end(), 0)); }

double line_sum(const Line& line) {
    double sum = 0.0;
    for (int rank : line) sum += tile_value(rank);
    return sum;
}

double adjacent_difference(const Line& line) {
    double total = 0.0;
    for (int i = 1; i < 4; ++i) total += std::fabs(tile_value(line[i - 1]) - tile_value(line[i]));
    return total;
}

// Snake / notes position weights: W[row][column], largest in the top-left corner.
constexpr double kSnakeWeights[4][4] = {{65536, 32768, 16384, 8192},
                                        {512, 1024, 2048, 4096},
                                        {256, 512, 1024, 2048},
                                        {128, 256, 512, 1024}};

double weighted_row(const Line& line, int row) {
    double total = 0.0;
    for (int c = 0; c < 4; ++c) total += tile_value(line[c]) * kSnakeWeights[row][c];
    return total;
}

double default_line(const Line& line, const HeuristicWeights& w) {
    double sum = 0.0;
    for (int rank : line) sum += std::pow(rank, w.sum_power);

    // Tiles in runs of two or more equal ranks, gaps ignored: each could merge soon.
    int merges = 0, previous = 0, run = 0;
    for (int rank : line) {
        if (rank == 0) continue;
        if (rank == previous) {
            ++run;
        } else {
            if (run > 0) merges += run + 1;
            run = 0;
        }
        previous = rank;
    }
    if (run > 0) merges += run + 1;

    // Monotonicity violation in each direction, on rank^power so big tiles count much more;
    // only the smaller one is penalised, since a line may increase either way.
    double decreasing = 0.0, increasing = 0.0;
    for (int i = 1; i < 4; ++i) {
        double a = std::pow(line[i - 1], w.monotonicity_power), b = std::pow(line[i], w.monotonicity_power);
        if (line[i - 1] > line[i]) decreasing += a - b; else increasing += b - a;
    }
    return w.lost_penalty + w.empty * count_zeros(line) + w.merges * merges -
           w.monotonicity * std::min(decreasing, increasing) - w.sum * sum;
}

double snake_row(const Line& line, int row) {
    return weighted_row(line, row) + 100.0 * count_zeros(line) + (is_monotone(line) ? line_sum(line) : 0.0);
}
double snake_column(const Line& line) { return is_monotone(line) ? line_sum(line) : 0.0; }

double notes_row(const Line& line, int row) {
    return weighted_row(line, row) + 500.0 * count_zeros(line) - 5.0 * adjacent_difference(line) +
           (is_monotone(line) ? 100.0 : 0.0);
}
double notes_column(const Line& line) {
    return -5.0 * adjacent_difference(line) + (is_monotone(line) ? 100.0 : 0.0);
}

}  // namespace

Heuristic parse_heuristic(const std::string& name) {
    if (name == "default") return Heuristic::kDefault;
    if (name == "snake") return Heuristic::kSnake;
    if (name == "notes") return Heuristic::kNotes;
    throw std::invalid_argument("unknown heuristic '" + name + "' (expected default, snake or notes)");
}

Evaluator::Evaluator(Heuristic heuristic, const HeuristicWeights& weights) {
    constexpr std::size_t kSize = 65536;
    auto fill = [&](std::size_t table, auto&& line_value) {
        for (std::uint32_t line = 0; line < kSize; ++line) storage_[table * kSize + line] = line_value(unpack_line(line));
    };
    if (heuristic == Heuristic::kDefault) {
        // Rows and columns are scored alike: one table.
        storage_.resize(kSize);
        fill(0, [&](const Line& l) { return default_line(l, weights); });
        for (auto& table : row_tables_) table = storage_.data();
        column_table_ = storage_.data();
        return;
    }
    storage_.resize(5 * kSize);
    bool snake = heuristic == Heuristic::kSnake;
    for (int row = 0; row < 4; ++row)
        fill(row, [&](const Line& l) { return snake ? snake_row(l, row) : notes_row(l, row); });
    fill(4, [&](const Line& l) { return snake ? snake_column(l) : notes_column(l); });
    for (int row = 0; row < 4; ++row) row_tables_[row] = storage_.data() + row * kSize;
    column_table_ = storage_.data() + 4 * kSize;
}

// ---- transposition table ----------------------------------------------------------------------

void TranspositionTable::FreeDeleter::operator()(Entry* p) const { std::free(p); }

void TranspositionTable::new_search() {
    if (!entries_) {
        auto* memory = static_cast<Entry*>(std::calloc(std::size_t{1} << kBits, sizeof(Entry)));
        if (!memory) throw std::bad_alloc();
        entries_.reset(memory);
    }
    ++generation_;  // zeroed entries have generation 0, which is never current
}

const TranspositionTable::Entry* TranspositionTable::find(Board board) const {
    const Entry& entry = entries_[slot(board)];
    return entry.generation == generation_ && entry.board == board ? &entry : nullptr;
}

void TranspositionTable::store(Board board, int depth, double value) {
    entries_[slot(board)] = Entry{board, value, generation_, depth};
}

// ---- search -----------------------------------------------------------------------------------

double Searcher::evaluate(Board board) {
    ++stats.evaluations;
    return engine_.evaluate(board);
}

double Searcher::root_move_value(Board after_move, int depth) {
    table_.new_search();
    return chance_node(after_move, depth - (engine_.max_ply_costs_depth ? 1 : 0), 1.0);
}

double Searcher::max_node(Board board, int depth, double probability) {
    ++stats.nodes;
    if (engine_.leaf_at_max_nodes && depth <= 0) return evaluate(board);
    int child_depth = depth - (engine_.max_ply_costs_depth ? 1 : 0);
    double best = -std::numeric_limits<double>::infinity();
    bool any_move = false;
    for (int direction = 0; direction < kNumDirections; ++direction) {
        bool overflow;
        Board moved = move_board(board, direction, &overflow);
        if (moved == board || overflow) continue;  // illegal, or beyond the 32768 cell limit
        any_move = true;
        best = std::max(best, chance_node(moved, child_depth, probability));
    }
    if (any_move) return best;
    return engine_.lost_is_zero ? 0.0 : evaluate(board);
}

double Searcher::chance_node(Board board, int depth, double probability) {
    ++stats.nodes;
    int empty = count_empty(board);
    if (depth <= 0 || probability < engine_.config().prob_cutoff || empty == 0) return evaluate(board);

    bool cache = engine_.config().cache;
    if (cache) {
        if (const auto* entry = table_.find(board)) {
            if (entry->depth == depth || (engine_.reuse_deeper_entries && entry->depth > depth)) {
                ++stats.cache_hits;
                return entry->value;
            }
        }
    }

    double total = 0.0;
    double probability_two = probability * 0.9 / empty, probability_four = probability * 0.1 / empty;
    // Walk the empty cells with a one-nibble probe.
    for (Board probe = 1; probe != 0; probe <<= 4) {
        if (board & (probe * 0xF)) continue;
        total += 0.9 * max_node(board | probe, depth - 1, probability_two) +
                 0.1 * max_node(board | (probe << 1), depth - 1, probability_four);
    }
    double value = total / empty;
    if (cache) table_.store(board, depth, value);
    return value;
}

// ---- engine -----------------------------------------------------------------------------------

Engine::Engine(const SearchConfig& config) : config_(config), evaluator_(config.heuristic, config.weights) {
    switch (config.heuristic) {
        case Heuristic::kDefault:
            lost_is_zero = true;
            reuse_deeper_entries = true;
            break;
        case Heuristic::kSnake:
            leaf_at_max_nodes = true;
            break;
        case Heuristic::kNotes:
            leaf_at_max_nodes = true;
            max_ply_costs_depth = true;
            break;
    }
    // The snake/notes searches are the plain expectimax of the notes: nothing is cut off.
    if (config.heuristic != Heuristic::kDefault) config_.prob_cutoff = 0.0;
}

int Engine::root_depth(Board board) const {
    if (config_.depth > 0) return config_.depth;
    switch (config_.heuristic) {
        case Heuristic::kDefault: {
            // Deeper when there are more distinct tiles: the position is more delicate.
            std::uint32_t seen = 0;
            for (int cell = 0; cell < 16; ++cell) seen |= 1u << cell_rank(board, cell);
            int distinct = __builtin_popcount(seen & ~1u);
            return std::max(3, distinct - 2);
        }
        case Heuristic::kSnake: return 3;
        case Heuristic::kNotes: {
            int empty = count_empty(board);
            return empty >= 6 ? 4 : empty >= 3 ? 5 : 6;
        }
    }
    return 3;
}

int Engine::thread_count() const {
    if (config_.threads > 0) return config_.threads;
    return std::max(1u, std::thread::hardware_concurrency());
}

Decision Engine::decide(Board board, std::vector<std::unique_ptr<Searcher>>& workers) const {
    auto start = std::chrono::steady_clock::now();
    Decision decision;
    decision.depth = root_depth(board);
    decision.values.fill(std::numeric_limits<double>::quiet_NaN());

    std::array<Board, kNumDirections> after{};
    std::vector<int> tasks;
    for (int direction = 0; direction < kNumDirections; ++direction) {
        bool overflow;
        after[direction] = move_board(board, direction, &overflow);
        if (after[direction] != board && !overflow) tasks.push_back(direction);
    }

    // One task per root move, each starting from an empty table: the values do not depend on
    // the number of threads or on which thread ran which move.
    int threads = std::min<int>(thread_count(), int(tasks.size()));
    while (int(workers.size()) < std::max(threads, 1)) workers.push_back(std::make_unique<Searcher>(*this));
    for (auto& worker : workers) worker->stats = SearchStats{};

    std::atomic<int> next_task{0};
    auto run = [&](Searcher& worker) {
        for (int t; (t = next_task.fetch_add(1)) < int(tasks.size());)
            decision.values[tasks[t]] = worker.root_move_value(after[tasks[t]], decision.depth);
    };
    if (threads <= 1) {
        if (!tasks.empty()) run(*workers[0]);
    } else {
        std::vector<std::thread> pool;
        for (int i = 1; i < threads; ++i) pool.emplace_back(run, std::ref(*workers[i]));
        run(*workers[0]);
        for (auto& thread : pool) thread.join();
    }

    // Ties go to the first direction in the order up, down, left, right.
    for (int direction : tasks)
        if (decision.move < 0 || decision.values[direction] > decision.values[decision.move]) decision.move = direction;
    for (auto& worker : workers) decision.stats.add(worker->stats);
    decision.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return decision;
}

Decision Engine::best_move(Board board) const {
    std::lock_guard<std::mutex> lock(workers_mutex_);
    return decide(board, workers_);
}

GameResult Engine::play_game(std::uint64_t seed, bool record_moves) const {
    auto start = std::chrono::steady_clock::now();
    std::vector<std::unique_ptr<Searcher>> workers;
    Rng rng(seed);
    GameResult result;
    Board board = spawn_tile(spawn_tile(0, rng), rng);
    for (;;) {
        Decision decision = decide(board, workers);
        result.stats.add(decision.stats);
        if (decision.move < 0) {
            // No move left for the search: either the game is over, or every legal move
            // would merge two 32768 tiles.
            for (int direction = 0; direction < kNumDirections; ++direction) {
                MoveOutcome outcome = apply_move(board, direction);
                if (outcome.board != board || outcome.overflow) result.hit_65536_limit = true;
            }
            break;
        }
        MoveOutcome outcome = apply_move(board, decision.move);
        result.score += outcome.gain;
        ++result.moves;
        if (record_moves) result.move_log.push_back(static_cast<std::int8_t>(decision.move));
        board = spawn_tile(outcome.board, rng);
    }
    result.final_board = board;
    for (int cell = 0; cell < 16; ++cell) result.max_tile = std::max(result.max_tile, cell_rank(board, cell));
    result.max_tile = 1 << result.max_tile;
    result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return result;
}

}  // namespace fastdl::game2048
