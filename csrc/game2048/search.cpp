#include "search.h"

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <tuple>
#include <utility>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define FASTDL_2048_MMAP 1
#endif

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

// rank^power for the 16 ranks, computed once per table instead of once per line.
using Powers = std::array<double, 16>;
Powers powers(double exponent) {
  Powers out;
  for (int rank = 0; rank < 16; ++rank) out[rank] = std::pow(rank, exponent);
  return out;
}

double default_line(const Line& line, const HeuristicWeights& w, const Powers& sum_powers,
                    const Powers& monotonicity_powers) {
  double sum = 0.0;
  for (int rank : line) sum += sum_powers[rank];

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
    double a = monotonicity_powers[line[i - 1]], b = monotonicity_powers[line[i]];
    if (line[i - 1] > line[i])
      decreasing += a - b;
    else
      increasing += b - a;
  }
  return w.lost_penalty + w.empty * count_zeros(line) + w.merges * merges -
         w.monotonicity * std::min(decreasing, increasing) - w.sum * sum;
}

double snake_row(const Line& line, int row) {
  return weighted_row(line, row) + 100.0 * count_zeros(line) +
         (is_monotone(line) ? line_sum(line) : 0.0);
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
  if (name == "ntuple") return Heuristic::kNTuple;
  throw std::invalid_argument("unknown heuristic '" + name +
                              "' (expected default, snake, notes or ntuple)");
}

// ---- settings ---------------------------------------------------------------------------------

namespace {

const char* heuristic_name(Heuristic heuristic) {
  switch (heuristic) {
    case Heuristic::kDefault:
      return "default";
    case Heuristic::kSnake:
      return "snake";
    case Heuristic::kNotes:
      return "notes";
    case Heuristic::kNTuple:
      return "ntuple";
  }
  return "?";
}

// The shortest text that reads back as the same double: 1e-07, 0.5, nan, -1e+10.
std::string show(double value) {
  char text[64];
  auto [end, error] = std::to_chars(text, text + sizeof text, value);
  return error == std::errc() ? std::string(text, end) : std::string("?");
}

[[noreturn]] void reject(const std::string& message) { throw std::invalid_argument(message); }

}  // namespace

int max_depth(Heuristic heuristic) {
  switch (heuristic) {
    case Heuristic::kDefault:
      return 16;
    case Heuristic::kSnake:
      return 6;
    case Heuristic::kNotes:
      return 12;  // both plies consume depth: the tree of snake depth 6
    case Heuristic::kNTuple:
      return 8;  // the default search's tree, with 8T random reads per evaluation
  }
  return 1;
}

void check_depth(Heuristic heuristic, long long depth) {
  if (depth < 0 || depth > max_depth(heuristic))
    reject("depth must be 0 (adaptive) or in [1, " + std::to_string(max_depth(heuristic)) +
           "] for the " + heuristic_name(heuristic) + " heuristic, got " + std::to_string(depth));
}

void check_prob_cutoff(double prob_cutoff) {
  if (!(prob_cutoff >= kMinProbCutoff && prob_cutoff < 1.0))  // also false for NaN
    reject("prob_cutoff must be in [1e-06, 1), got " + show(prob_cutoff));
}

void check_threads(long long threads) {
  if (threads < 0 || threads > kMaxThreads)
    reject("threads must be 0 (all cores) or in [1, " + std::to_string(kMaxThreads) + "], got " +
           std::to_string(threads));
}

namespace {

bool is_power_weight(const std::string& name) {
  return name == "monotonicity_power" || name == "sum_power";
}

double* weight_slot(HeuristicWeights& w, const std::string& name) {
  if (name == "lost_penalty") return &w.lost_penalty;
  if (name == "empty") return &w.empty;
  if (name == "merges") return &w.merges;
  if (name == "monotonicity") return &w.monotonicity;
  if (name == "monotonicity_power") return &w.monotonicity_power;
  if (name == "sum") return &w.sum;
  if (name == "sum_power") return &w.sum_power;
  return nullptr;
}

}  // namespace

void check_weight(const std::string& name, double value) {
  HeuristicWeights scratch;
  if (!weight_slot(scratch, name))
    reject("unknown heuristic weight '" + name +
           "' (expected empty, lost_penalty, merges, monotonicity, monotonicity_power, sum or "
           "sum_power)");
  if (is_power_weight(name)) {
    if (!(value >= 0.0 && value <= kMaxWeightPower))
      reject("weight " + name + " must be a finite number in [0, 8], got " + show(value));
  } else if (!(std::fabs(value) <= kMaxWeight)) {
    reject("weight " + name + " must be a finite number in [-1e9, 1e9], got " + show(value));
  }
}

void set_weight(HeuristicWeights& weights, const std::string& name, double value) {
  check_weight(name, value);
  *weight_slot(weights, name) = value;
}

void check_alpha(double alpha) {
  if (!(alpha > 0.0 && alpha <= 1.0))
    reject("alpha must be a number in (0, 1], got " + show(alpha));
}

void check_training_threads(long long threads) {
  if (threads < 1 || threads > kMaxThreads)
    reject("threads must be an integer in [1, " + std::to_string(kMaxThreads) + "], got " +
           std::to_string(threads));
}

void check_max_nodes(long long max_nodes) {
  if (max_nodes < 1)
    reject("max_nodes must be None or a positive integer, got " + std::to_string(max_nodes));
}

void check_time_limit(double seconds) {
  if (!(seconds > 0.0 && seconds <= kMaxTimeLimit))
    reject("time_limit must be None or a number of seconds in (0, 86400], got " + show(seconds));
}

void validate(const SearchBudget& budget) {
  if (budget.time_limit != 0.0) check_time_limit(budget.time_limit);
  if (budget.max_nodes > std::uint64_t(std::numeric_limits<long long>::max()))
    reject("max_nodes must be below 2^63, got " + std::to_string(budget.max_nodes));
}

void validate(const SearchConfig& config) {
  check_depth(config.heuristic, config.depth);
  check_prob_cutoff(config.prob_cutoff);
  check_threads(config.threads);
  const HeuristicWeights& w = config.weights;
  const std::pair<const char*, double> weights[] = {{"lost_penalty", w.lost_penalty},
                                                    {"empty", w.empty},
                                                    {"merges", w.merges},
                                                    {"monotonicity", w.monotonicity},
                                                    {"monotonicity_power", w.monotonicity_power},
                                                    {"sum", w.sum},
                                                    {"sum_power", w.sum_power}};
  for (const auto& [name, value] : weights) check_weight(name, value);
  if (config.heuristic == Heuristic::kNTuple && !config.network)
    reject("the ntuple heuristic needs a network");
  if (config.heuristic != Heuristic::kNTuple && config.network)
    reject(std::string("a network applies to the ntuple heuristic only, got one for the ") +
           heuristic_name(config.heuristic) + " heuristic");
  validate(config.budget);
}

Evaluator::Evaluator(Heuristic heuristic, const HeuristicWeights& weights,
                     std::shared_ptr<const NTupleNetwork> network)
    : network_(std::move(network)) {
  if (heuristic == Heuristic::kNTuple) return;
  constexpr std::size_t kSize = 65536;
  auto fill = [&](std::size_t table, auto&& line_value) {
    for (std::uint32_t line = 0; line < kSize; ++line)
      storage_[table * kSize + line] = line_value(unpack_line(line));
  };
  if (heuristic == Heuristic::kDefault) {
    // Rows and columns are scored alike: one table.
    storage_.resize(kSize);
    Powers sum_powers = powers(weights.sum_power),
           monotonicity_powers = powers(weights.monotonicity_power);
    fill(0,
         [&](const Line& l) { return default_line(l, weights, sum_powers, monotonicity_powers); });
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

namespace {

constexpr std::size_t kTableBytes =
    (std::size_t{1} << TranspositionTable::kBits) * sizeof(TranspositionTable::Entry);

TranspositionTable::Entry* map_table() {
#ifdef FASTDL_2048_MMAP
  void* memory =
      mmap(nullptr, kTableBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) throw std::bad_alloc();
#else
  void* memory =
      std::calloc(std::size_t{1} << TranspositionTable::kBits, sizeof(TranspositionTable::Entry));
  if (!memory) throw std::bad_alloc();
#endif
  return static_cast<TranspositionTable::Entry*>(memory);
}

void unmap_table(TranspositionTable::Entry* entries) {
#ifdef FASTDL_2048_MMAP
  munmap(entries, kTableBytes);
#else
  std::free(entries);
#endif
}

// Idle tables with their generation counters: a table's stale entries stay stale for its next
// owner.
struct TablePool {
  std::mutex mutex;
  std::vector<std::pair<TranspositionTable::Entry*, std::uint32_t>> idle;
};

TablePool& table_pool() {
  // Never destroyed: a searcher may outlive static destruction at exit; the OS reclaims the memory.
  static TablePool* pool = new TablePool;
  return *pool;
}

}  // namespace

TranspositionTable::~TranspositionTable() {
  if (!entries_) return;
  TablePool& pool = table_pool();
  {
    std::lock_guard<std::mutex> lock(pool.mutex);
    if (int(pool.idle.size()) < kPooledTables) {
      pool.idle.emplace_back(entries_, generation_);
      return;
    }
  }
  unmap_table(entries_);
}

void TranspositionTable::new_search() {
  if (!entries_) {
    TablePool& pool = table_pool();
    {
      std::lock_guard<std::mutex> lock(pool.mutex);
      if (!pool.idle.empty()) {
        std::tie(entries_, generation_) = pool.idle.back();
        pool.idle.pop_back();
      }
    }
    if (!entries_) entries_ = map_table();
  }
  // Zeroed entries have generation 0, which is never current. After 2^32 searches the counter
  // wraps: clear the table once so that no entry of 2^32 searches ago comes back to life.
  if (++generation_ == 0) {
    std::memset(static_cast<void*>(entries_), 0, kTableBytes);
    generation_ = 1;
  }
}

const TranspositionTable::Entry* TranspositionTable::find(Board board) const {
  const Entry& entry = entries_[slot(board)];
  return entry.generation == generation_ && entry.board == board ? &entry : nullptr;
}

void TranspositionTable::store(Board board, int depth, double value) {
  entries_[slot(board)] = Entry{board, value, generation_, depth};
}

// ---- search control ---------------------------------------------------------------------------

using Clock = std::chrono::steady_clock;

namespace {

// Thrown by a poll to abandon the current root-move search; caught per worker.
struct Abandon {};

// Small trees never pay for starting threads: the calling thread searches alone and helper
// threads start only once a depth has run for kHelperDelay (checked at the polls, so never in a
// tree below kPollNodes nodes), or at once when the caller's trees are known to be large: its
// previous decision visited kLargeTreeNodes nodes or more (~0.25 ms of one thread), or, when
// deepening, 4x the previous depth's nodes reach that.
constexpr auto kHelperDelay = std::chrono::microseconds(250);
constexpr std::uint64_t kLargeTreeNodes = 20000;

Clock::duration seconds_to_duration(double seconds) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

}  // namespace

class Phase;

// Shared by the workers of one decision: the budget, the node count, the stop flag.
class SearchControl {
 public:
  enum Stop : int { kRunning = 0, kBudget, kCancelled, kFailed };

  SearchControl(const SearchBudget& budget, const Cancellation& cancel, Clock::time_point start)
      : max_nodes_(budget.max_nodes), has_deadline_(budget.time_limit > 0.0), cancel_(cancel) {
    if (has_deadline_) deadline_ = start + seconds_to_duration(budget.time_limit);
    next_poll_ = start + seconds_to_duration(Cancellation::kPollSeconds);
  }

  bool budget_active = false;  // false during depth 1 and for searches without a budget
  Phase* phase = nullptr;      // the depth being searched, to start helpers
  std::atomic<std::uint64_t> nodes{0};

  int stop_reason() const { return stop_.load(std::memory_order_relaxed); }
  void request_stop(Stop why) {
    int running = kRunning;
    stop_.compare_exchange_strong(running, why);
  }
  bool over_node_budget() const { return max_nodes_ > 0 && nodes.load() > max_nodes_; }

  // Every kPollNodes nodes on every worker, and while the calling thread waits for helpers:
  // throws Abandon when the search has to stop.
  void check(bool calling_thread);

 private:
  void stop(Stop why) {
    request_stop(why);
    throw Abandon{};
  }

  std::atomic<int> stop_{kRunning};
  std::uint64_t max_nodes_;
  bool has_deadline_;
  Clock::time_point deadline_;
  Cancellation cancel_;
  Clock::time_point next_poll_;  // of cancel_.poll; only the calling thread touches it
};

// One depth of a decision: a task per root move, claimed by the workers in turn.
class Phase {
 public:
  Phase(std::vector<std::unique_ptr<Searcher>>& workers,
        const std::array<Board, kNumDirections>& after, const std::vector<int>& tasks, int depth,
        int threads, bool large, SearchControl& control)
      : workers_(workers),
        after_(after),
        tasks_(tasks),
        depth_(depth),
        threads_(threads),
        control_(control),
        helpers_at_(Clock::now() +
                    (large ? Clock::duration::zero() : Clock::duration(kHelperDelay))) {
    values.fill(std::numeric_limits<double>::quiet_NaN());
  }
  Phase(const Phase&) = delete;
  Phase& operator=(const Phase&) = delete;
  ~Phase() {
    if (!helpers_.empty()) {
      control_.request_stop(
          SearchControl::kFailed);  // only reached with helpers still running on an error
      for (auto& thread : helpers_) thread.join();
    }
  }

  // Searches every root move at this depth; true when all of them completed.
  bool run() {
    control_.phase = this;
    if (helpers_at_ <= Clock::now()) maybe_start_helpers(helpers_at_);
    work(*workers_[0], true);
    if (!helpers_.empty()) {
      std::unique_lock<std::mutex> lock(mutex_);
      // Wait in short slices so the calling thread keeps polling for cancellation.
      while (!finished_.wait_for(lock, std::chrono::milliseconds(10),
                                 [&] { return running_helpers_ == 0; })) {
        lock.unlock();
        try {
          control_.check(true);
        } catch (const Abandon&) {
        }
        lock.lock();
      }
      lock.unlock();
      for (auto& thread : helpers_) thread.join();
      helpers_.clear();
    }
    control_.phase = nullptr;
    if (error_) std::rethrow_exception(error_);
    return completed_.load() == int(tasks_.size());
  }

  // Called by the calling thread's polls: starts the helpers once the depth has run long enough.
  bool wants_helpers() const { return !helpers_started_ && threads_ > 1; }
  int threads_used() const { return 1 + helpers_launched_; }
  void maybe_start_helpers(Clock::time_point now) {
    if (!wants_helpers() || now < helpers_at_) return;
    helpers_started_ = true;
    int unclaimed = int(tasks_.size()) - next_task_.load();
    int count = std::min(threads_ - 1, unclaimed);
    for (int i = 1; i <= count; ++i) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        ++running_helpers_;
      }
      try {
        ++helpers_launched_;
        helpers_.emplace_back([this, i] {
          work(*workers_[i], false);
          std::lock_guard<std::mutex> lock(mutex_);
          --running_helpers_;
          finished_.notify_all();
        });
      } catch (...) {  // no thread to be had: the started ones and the calling thread carry on
        std::lock_guard<std::mutex> lock(mutex_);
        --helpers_launched_;
        --running_helpers_;
        break;
      }
    }
  }

  std::array<double, kNumDirections> values;

 private:
  void work(Searcher& worker, bool calling_thread) {
    try {
      for (int t; (t = next_task_.fetch_add(1)) < int(tasks_.size());) {
        values[tasks_[t]] =
            worker.root_move_value(after_[tasks_[t]], depth_, &control_, calling_thread);
        completed_.fetch_add(1);
      }
    } catch (const Abandon&) {
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      control_.request_stop(SearchControl::kFailed);
    }
    control_.nodes.fetch_add(worker.stats.nodes - worker.reported_nodes);
    worker.reported_nodes = worker.stats.nodes;
  }

  std::vector<std::unique_ptr<Searcher>>& workers_;
  const std::array<Board, kNumDirections>& after_;
  const std::vector<int>& tasks_;
  int depth_;
  int threads_;
  SearchControl& control_;
  Clock::time_point helpers_at_;
  bool helpers_started_ = false;
  int helpers_launched_ = 0;
  std::atomic<int> next_task_{0};
  std::atomic<int> completed_{0};
  std::vector<std::thread> helpers_;
  std::mutex mutex_;
  std::condition_variable finished_;
  int running_helpers_ = 0;
  std::exception_ptr error_;
};

void SearchControl::check(bool calling_thread) {
  if (stop_reason() != kRunning) throw Abandon{};
  if (cancel_.flag && cancel_.flag->load(std::memory_order_relaxed)) stop(kCancelled);
  if (budget_active && over_node_budget()) stop(kBudget);
  bool deadline = budget_active && has_deadline_;
  bool calling_work = calling_thread && (cancel_.poll || (phase && phase->wants_helpers()));
  if (!deadline && !calling_work) return;
  Clock::time_point now = Clock::now();  // every kPollNodes nodes: ~25 ns per ~0.1 ms
  if (deadline && now >= deadline_) stop(kBudget);
  if (!calling_thread) return;
  if (cancel_.poll && now >= next_poll_) {
    next_poll_ = now + seconds_to_duration(Cancellation::kPollSeconds);
    if (cancel_.poll(cancel_.context)) stop(kCancelled);
  }
  if (phase) phase->maybe_start_helpers(now);
}

// ---- search -----------------------------------------------------------------------------------

void Searcher::poll() {
  if (control_->budget_active) {  // the node budget needs the count of all workers
    control_->nodes.fetch_add(stats.nodes - reported_nodes);
    reported_nodes = stats.nodes;
  }
  control_->check(calling_thread_);
}

double Searcher::evaluate(Board board) {
  ++stats.evaluations;
  return engine_.evaluate(board);
}

double Searcher::root_move_value(Board after_move, int depth, SearchControl* control,
                                 bool calling_thread) {
  control_ = control;
  calling_thread_ = calling_thread;
  table_.new_search();
  return chance_node(after_move, depth - (engine_.root_ply_costs_depth ? 1 : 0), 1.0);
}

double Searcher::max_node(Board board, int depth, double probability) {
  visit();
  if (engine_.leaf_at_max_nodes && depth <= 0) return evaluate(board);
  int child_depth = depth - (engine_.max_ply_costs_depth ? 1 : 0);
  double best = -std::numeric_limits<double>::infinity();
  bool any_move = false;
  for (int direction = 0; direction < kNumDirections; ++direction) {
    bool overflow;
    Board moved = move_board(board, direction, &overflow);
    if (moved == board || overflow) continue;  // illegal, or beyond the 32768 cell limit
    any_move = true;
    double reward = engine_.rewards_in_value ? engine_.move_reward(board, direction) : 0.0;
    best = std::max(best, reward + chance_node(moved, child_depth, probability));
  }
  if (any_move) return best;
  return engine_.lost_is_zero ? 0.0 : evaluate(board);
}

double Searcher::chance_node(Board board, int depth, double probability) {
  visit();
  int empty = count_empty(board);
  if (depth <= 0 || probability < engine_.config().prob_cutoff || empty == 0)
    return evaluate(board);

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

namespace {
const SearchConfig& validated(const SearchConfig& config) {
  validate(config);
  return config;
}
}  // namespace

Engine::Engine(const SearchConfig& config)
    : config_(validated(config)), evaluator_(config.heuristic, config.weights, config.network) {
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
      root_ply_costs_depth = true;
      break;
    case Heuristic::kNTuple:
      // The network values the position after a move (an afterstate) by the score still to
      // come, so a lost position is worth 0 and a move earns its merge score on top.
      lost_is_zero = true;
      reuse_deeper_entries = true;
      root_ply_costs_depth = true;
      rewards_in_value = true;
      break;
  }
  // The snake/notes searches are the plain expectimax of the notes: nothing is cut off.
  if (config.heuristic == Heuristic::kSnake || config.heuristic == Heuristic::kNotes)
    config_.prob_cutoff = 0.0;
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
    case Heuristic::kSnake:
      return 3;
    case Heuristic::kNotes: {
      int empty = count_empty(board);
      return empty >= 6 ? 4 : empty >= 3 ? 5 : 6;
    }
    // One move and one spawn ahead of the greedy policy the network was trained with.
    case Heuristic::kNTuple:
      return 2;
  }
  return 3;
}

int Engine::thread_count() const {
  if (config_.threads > 0) return config_.threads;
  static const int hardware =
      int(std::max(1u, std::thread::hardware_concurrency()));  // reads /sys: once
  return hardware;
}

Decision Engine::decide(Board board, Workers& workers, const SearchBudget& budget,
                        const Cancellation& cancel) const {
  auto start = Clock::now();
  Decision decision;
  decision.target_depth = decision.depth = root_depth(board);
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
  auto& searchers = workers.searchers;
  while (int(searchers.size()) < std::max(threads, 1))
    searchers.push_back(std::make_unique<Searcher>(*this));
  for (auto& worker : searchers) {
    worker->stats = SearchStats{};
    worker->reported_nodes = 0;
  }

  if (!tasks.empty()) {
    SearchControl control(budget, cancel, start);
    // With a budget: depth 1, 2, ... keeping the values of the deepest completed depth. Every
    // depth starts from empty tables, so a completed depth gives exactly the values of a
    // search at that depth alone.
    bool iterate = budget.limited();
    std::uint64_t previous_depth_nodes = 0;
    for (int depth = iterate ? 1 : decision.target_depth; depth <= decision.target_depth; ++depth) {
      control.budget_active = iterate && depth > 1;
      if (cancel.flag && cancel.flag->load()) throw SearchCancelled();
      bool large = workers.last_decision_nodes >= kLargeTreeNodes ||
                   previous_depth_nodes * 4 >= kLargeTreeNodes;
      std::uint64_t nodes_before = control.nodes.load();
      Phase phase(searchers, after, tasks, depth, threads, large, control);
      bool complete = phase.run();
      previous_depth_nodes = control.nodes.load() - nodes_before;
      decision.threads = std::max(decision.threads, phase.threads_used());
      if (control.stop_reason() == SearchControl::kCancelled) throw SearchCancelled();
      // The node count of a completed depth does not depend on the threads, so neither
      // does this test: a node budget gives the same decision for every thread count.
      if (complete && control.budget_active && control.over_node_budget()) complete = false;
      if (!complete) {
        decision.budget_exhausted = true;
        break;
      }
      for (int direction : tasks)
        decision.values[direction] =
            phase.values[direction] + (rewards_in_value ? move_reward(board, direction) : 0.0);
      decision.depth = depth;
    }
  }

  // Ties go to the first direction in the order up, down, left, right.
  for (int direction : tasks)
    if (decision.move < 0 || decision.values[direction] > decision.values[decision.move])
      decision.move = direction;
  for (auto& worker : searchers) decision.stats.add(worker->stats);
  decision.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  workers.last_decision_nodes = decision.stats.nodes;
  return decision;
}

Decision Engine::best_move(Board board, const SearchBudget& budget,
                           const Cancellation& cancel) const {
  validate(budget);
  // Concurrent callers take turns; a waiting caller can still be cancelled.
  std::unique_lock<std::timed_mutex> lock(workers_mutex_, std::defer_lock);
  while (!lock.try_lock_for(std::chrono::milliseconds(20))) {
    if ((cancel.flag && cancel.flag->load()) || (cancel.poll && cancel.poll(cancel.context)))
      throw SearchCancelled();
  }
  return decide(board, workers_, budget, cancel);
}

GameResult Engine::play_game(std::uint64_t seed, bool record_moves,
                             const Cancellation& cancel) const {
  auto start = Clock::now();
  Workers workers;
  Rng rng(seed);
  GameResult result;
  Board board = spawn_tile(spawn_tile(0, rng), rng);
  for (;;) {
    Decision decision = decide(board, workers, config_.budget, cancel);
    result.stats.add(decision.stats);
    result.budget_stops += decision.budget_exhausted;
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
  for (int cell = 0; cell < 16; ++cell)
    result.max_tile = std::max(result.max_tile, cell_rank(board, cell));
  result.max_tile = 1 << result.max_tile;
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return result;
}

}  // namespace fastdl::game2048
