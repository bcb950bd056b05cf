// Python bindings: fastdl.game2048._engine. This is the only way into the engine from Python, so
// every argument is checked here (types) and in the engine (ranges, see search.h): a bad value
// raises ValueError naming the argument and the value. Searches release the GIL and stay
// interruptible: the calling thread, if it is Python's main thread, runs the signal handlers
// every 20 ms (Cancellation::kPollSeconds), so Ctrl-C raises KeyboardInterrupt promptly.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <climits>
#include <limits>
#include <stdexcept>

#include "board.h"
#include "ntuple.h"
#include "search.h"

namespace py = pybind11;
using namespace fastdl::game2048;

namespace {

const char* const kHeuristics = "'default', 'snake', 'notes' or 'ntuple'";

std::string shown(py::handle value) { return py::repr(value).cast<std::string>(); }

[[noreturn]] void bad(const std::string& name, const std::string& expected, py::handle value) {
  throw py::value_error(name + " must be " + expected + ", got " + shown(value));
}

// An int (or an object with __index__, such as a numpy integer), but not a bool.
long long int_arg(py::handle value, const std::string& name, const std::string& expected) {
  if (PyBool_Check(value.ptr()) || !PyIndex_Check(value.ptr())) bad(name, expected, value);
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
  if (!index) throw py::error_already_set();
  int overflow = 0;
  long long result = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0) bad(name, expected, value);
  if (result == -1 && PyErr_Occurred()) throw py::error_already_set();
  return result;
}

// A 64-bit board, seed or count: an int in [0, 2^64).
std::uint64_t uint64_arg(py::handle value, const std::string& name) {
  const char* expected = "an integer in [0, 2**64)";
  if (PyBool_Check(value.ptr()) || !PyIndex_Check(value.ptr())) bad(name, expected, value);
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
  if (!index) throw py::error_already_set();
  if (PyObject_RichCompareBool(index.ptr(), py::int_(0).ptr(), Py_LT) == 1)
    bad(name, expected, value);
  unsigned long long result = PyLong_AsUnsignedLongLong(index.ptr());
  if (result == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    bad(name, expected, value);
  }
  return result;
}

// An int or a float (or anything with __float__), not a bool or a string.
double float_arg(py::handle value, const std::string& name, const std::string& expected) {
  if (PyBool_Check(value.ptr()) || PyUnicode_Check(value.ptr()) || PyBytes_Check(value.ptr()))
    bad(name, expected, value);
  double result = PyFloat_AsDouble(value.ptr());
  if (result == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    bad(name, expected, value);
  }
  return result;
}

bool bool_arg(py::handle value, const std::string& name) {
  if (!PyBool_Check(value.ptr())) bad(name, "True or False", value);
  return value.ptr() == Py_True;
}

Board board_arg(py::handle value) { return uint64_arg(value, "board"); }

// Runs `check` (a range check of search.h) and turns its std::invalid_argument into ValueError.
template <class F>
void checked(F&& check) {
  try {
    check();
  } catch (const std::invalid_argument& error) {
    throw py::value_error(error.what());
  }
}

// None (no limit) or a budget value; the engine's ranges apply.
void read_budget(py::handle max_nodes, py::handle time_limit, SearchBudget& budget) {
  if (!max_nodes.is_none()) {
    long long nodes = int_arg(max_nodes, "max_nodes", "None or a positive integer");
    checked([&] { check_max_nodes(nodes); });
    budget.max_nodes = static_cast<std::uint64_t>(nodes);
  } else {
    budget.max_nodes = 0;
  }
  if (!time_limit.is_none()) {
    double seconds =
        float_arg(time_limit, "time_limit", "None or a number of seconds in (0, 86400]");
    checked([&] { check_time_limit(seconds); });
    budget.time_limit = seconds;
  } else {
    budget.time_limit = 0.0;
  }
}

py::dict stats_dict(const SearchStats& stats) {
  py::dict d;
  d["nodes"] = stats.nodes;
  d["evaluations"] = stats.evaluations;
  d["cache_hits"] = stats.cache_hits;
  return d;
}

// NTupleNetwork.train's threads and alpha, checked as the trainer checks them.
std::pair<int, double> training_settings(py::handle threads, py::handle alpha) {
  long long t = int_arg(threads, "threads", "an integer in [1, 256]");
  checked([&] { check_training_threads(t); });
  double a = float_arg(alpha, "alpha", "a number in (0, 1]");
  checked([&] { check_alpha(a); });
  return {int(t), a};
}

std::shared_ptr<Engine> make_engine(py::handle heuristic, py::handle depth, py::handle prob_cutoff,
                                    py::handle cache, py::handle threads, py::handle weights,
                                    py::handle max_nodes, py::handle time_limit) {
  SearchConfig config;
  if (!py::isinstance<py::str>(heuristic)) bad("heuristic", kHeuristics, heuristic);
  checked([&] { config.heuristic = parse_heuristic(heuristic.cast<std::string>()); });

  long long d = int_arg(
      depth, "depth",
      "0 (adaptive) or an integer in [1, " + std::to_string(max_depth(config.heuristic)) + "]");
  checked([&] { check_depth(config.heuristic, d); });
  config.depth = int(d);

  config.prob_cutoff = float_arg(prob_cutoff, "prob_cutoff", "a number in [1e-06, 1)");
  checked([&] { check_prob_cutoff(config.prob_cutoff); });

  config.cache = bool_arg(cache, "cache");

  long long t = int_arg(threads, "threads",
                        "0 (all cores) or an integer in [1, " + std::to_string(kMaxThreads) + "]");
  checked([&] { check_threads(t); });
  config.threads = int(t);

  if (config.heuristic == Heuristic::kNTuple) {
    if (!py::isinstance<NTupleNetwork>(weights))
      bad("weights", "an NTupleNetwork for the ntuple heuristic", weights);
    config.network = weights.cast<std::shared_ptr<NTupleNetwork>>();
  } else if (!weights.is_none()) {
    if (!py::isinstance<py::dict>(weights))
      bad("weights", "a dict of weight names to numbers", weights);
    auto dict = py::reinterpret_borrow<py::dict>(weights);
    if (dict.size() > 0 && config.heuristic != Heuristic::kDefault)
      throw py::value_error("weights apply to the default heuristic only, got weights for the " +
                            heuristic.cast<std::string>() + " heuristic");
    for (auto [key, value] : dict) {
      if (!py::isinstance<py::str>(key)) bad("a weight name", "a string", key);
      std::string name = key.cast<std::string>();
      checked([&] { check_weight(name, 0.0); });  // the name first
      double v = float_arg(value, "weight " + name, "a finite number");
      checked([&] { set_weight(config.weights, name, v); });
    }
  }
  read_budget(max_nodes, time_limit, config.budget);
  std::shared_ptr<Engine> engine;
  checked([&] { engine = std::make_shared<Engine>(config); });
  return engine;
}

// A flag that stops the searches it is passed to, from any thread (play_games uses it to stop
// the games of its pool when the main thread is interrupted).
struct CancelToken {
  std::atomic<bool> flag{false};
};

bool on_main_thread() {
  static const unsigned long main_ident =
      py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  return PyThread_get_thread_ident() == main_ident;
}

// Releases the GIL for a search and, when the search runs on the main thread, gives the engine a
// poll that briefly retakes it to run the signal handlers. A handler that raises (Ctrl-C:
// KeyboardInterrupt) stops the search; its exception is left set and re-raised by run().
class ReleasedSearch {
 public:
  explicit ReleasedSearch(CancelToken* token) {
    if (token) cancel_.flag = &token->flag;
    if (on_main_thread()) {
      cancel_.poll = &ReleasedSearch::poll;
      cancel_.context = this;
    }
  }

  template <class F>
  auto run(F&& search) -> decltype(search(std::declval<const Cancellation&>())) {
    try {
      state_ = PyEval_SaveThread();
      struct Restore {
        ReleasedSearch* self;
        ~Restore() { PyEval_RestoreThread(self->state_); }
      } restore{this};
      return search(cancel_);
    } catch (const SearchCancelled&) {
      if (PyErr_Occurred()) throw py::error_already_set();  // the signal handler's exception
      throw;
    }
  }

 private:
  static bool poll(void* context) {
    auto* self = static_cast<ReleasedSearch*>(context);
    PyEval_RestoreThread(self->state_);
    bool raised = PyErr_CheckSignals() != 0;
    self->state_ = PyEval_SaveThread();
    return raised;
  }

  Cancellation cancel_;
  PyThreadState* state_ = nullptr;
};

py::dict decision_dict(const Decision& decision) {
  py::dict d;
  d["move"] = decision.move;
  d["values"] = std::vector<double>(decision.values.begin(), decision.values.end());
  d["depth"] = decision.depth;
  d["target_depth"] = decision.target_depth;
  d["budget_exhausted"] = decision.budget_exhausted;
  d["threads"] = decision.threads;
  d["stats"] = stats_dict(decision.stats);
  d["seconds"] = decision.seconds;
  return d;
}

}  // namespace

PYBIND11_MODULE(_engine, m) {
  m.doc() = "fastdl 2048 engine (C++ core)";
  m.attr("MAX_RANK") = kMaxRank;
  m.attr("MAX_THREADS") = kMaxThreads;
  m.attr("MIN_PROB_CUTOFF") = kMinProbCutoff;
  m.attr("MAX_TIME_LIMIT") = kMaxTimeLimit;
  m.def(
      "max_depth",
      [](py::handle heuristic) {
        if (!py::isinstance<py::str>(heuristic)) bad("heuristic", kHeuristics, heuristic);
        Heuristic h;
        checked([&] { h = parse_heuristic(heuristic.cast<std::string>()); });
        return max_depth(h);
      },
      py::arg("heuristic"), "The deepest explicit depth of a heuristic.");

  py::register_exception<SearchCancelled>(m, "SearchCancelled", PyExc_RuntimeError);

  m.def(
      "move",
      [](py::handle board, py::handle direction) {
        Board b = board_arg(board);
        long long d = int_arg(direction, "direction", "0, 1, 2 or 3");
        if (d < 0 || d >= kNumDirections) bad("direction", "0, 1, 2 or 3", direction);
        MoveOutcome outcome = apply_move(b, int(d));
        return py::make_tuple(outcome.board, outcome.gain, outcome.overflow);
      },
      py::arg("board"), py::arg("direction"),
      "(new_board, merge_score, overflow) for a move; new_board == board when illegal.");
  m.def(
      "transpose", [](py::handle board) { return transpose(board_arg(board)); }, py::arg("board"));
  m.def(
      "count_empty", [](py::handle board) { return count_empty(board_arg(board)); },
      py::arg("board"));

  py::class_<Rng>(m, "Rng", "xoshiro256** seeded through splitmix64.")
      .def(py::init([](py::handle seed) { return Rng(uint64_arg(seed, "seed")); }), py::arg("seed"))
      .def("next", &Rng::next, "Next raw 64-bit output.")
      .def(
          "below",
          [](Rng& rng, py::handle n) {
            std::uint64_t count = uint64_arg(n, "n");
            if (count == 0) throw py::value_error("below(n) needs n > 0, got 0");
            return rng.below(count);
          },
          py::arg("n"), "Uniform integer in [0, n).")
      .def("uniform", &Rng::uniform, "Uniform float in [0, 1).");

  m.def(
      "spawn",
      [](py::handle board, Rng& rng) {
        Board b = board_arg(board);
        if (count_empty(b) == 0) throw py::value_error("cannot spawn a tile: the board is full");
        return spawn_tile(b, rng);
      },
      py::arg("board"), py::arg("rng"));

  py::class_<CancelToken>(m, "CancelToken", "Stops the searches it is given, from any thread.")
      .def(py::init<>())
      .def("cancel", [](CancelToken& token) { token.flag.store(true); })
      .def_property_readonly("cancelled",
                             [](const CancelToken& token) { return token.flag.load(); });

  m.attr("MAX_TUPLES") = kMaxTuples;
  m.attr("MAX_TUPLE_CELLS") = kMaxTupleCells;
  m.def(
      "symmetric_cell",
      [](int cell, int symmetry) {
        if (cell < 0 || cell >= 16)
          throw py::value_error("cell must be in [0, 16), got " + std::to_string(cell));
        if (symmetry < 0 || symmetry >= kSymmetries)
          throw py::value_error("symmetry must be in [0, 8), got " + std::to_string(symmetry));
        return symmetric_cell(cell, symmetry);
      },
      py::arg("cell"), py::arg("symmetry"));

  m.def(
      "check_training_settings",
      [](py::handle threads, py::handle alpha) { training_settings(threads, alpha); },
      py::arg("threads"), py::arg("alpha"),
      "Raises ValueError unless NTupleNetwork.train accepts them.");

  py::class_<NTupleNetwork, std::shared_ptr<NTupleNetwork>>(
      m, "NTupleNetwork", "n-tuple network: tuples x 8 symmetries, 16^k float weights per tuple.")
      .def(py::init([](py::handle tuples) {
             if (!py::isinstance<py::sequence>(tuples) || py::isinstance<py::str>(tuples))
               bad("tuples", "a list of lists of cell indices", tuples);
             std::vector<std::vector<long long>> cells;
             for (py::handle tuple : py::reinterpret_borrow<py::sequence>(tuples)) {
               if (!py::isinstance<py::sequence>(tuple) || py::isinstance<py::str>(tuple))
                 bad("tuples", "a list of lists of cell indices", tuples);
               std::vector<long long> one;
               for (py::handle cell : py::reinterpret_borrow<py::sequence>(tuple))
                 one.push_back(int_arg(cell, "a tuple cell", "an integer in [0, 16)"));
               cells.push_back(std::move(one));
             }
             std::shared_ptr<NTupleNetwork> network;
             checked([&] { network = std::make_shared<NTupleNetwork>(cells); });
             return network;
           }),
           py::arg("tuples"))
      .def_property_readonly("tuples", &NTupleNetwork::tuples)
      // A writable float32 view of tuple i's table (it keeps the network alive).
      .def(
          "weights",
          [](py::object self, int tuple) {
            auto& network = self.cast<NTupleNetwork&>();
            if (tuple < 0 || tuple >= int(network.tuples().size()))
              throw py::value_error("tuple must be in [0, " +
                                    std::to_string(network.tuples().size()) + "), got " +
                                    std::to_string(tuple));
            return py::array_t<float>({py::ssize_t(network.table_size(tuple))},
                                      {py::ssize_t(sizeof(float))}, network.weights(tuple), self);
          },
          py::arg("tuple"))
      .def(
          "value",
          [](const NTupleNetwork& network, py::handle board) {
            return network.value(board_arg(board));
          },
          py::arg("board"), "The network's value of a board (an afterstate).")
      // Releases the GIL; returns (score, max_tile, moves) per game, in game order.
      .def_property(
          "games_trained", [](const NTupleNetwork& network) { return network.games_trained; },
          [](NTupleNetwork& network, py::handle games) {
            network.games_trained = uint64_arg(games, "games_trained");
          })
      .def(
          "train",
          [](NTupleNetwork& network, py::handle seed, py::handle games, py::handle threads,
             py::handle alpha) {
            std::uint64_t s = uint64_arg(seed, "seed");
            std::uint64_t n = uint64_arg(games, "games");
            if (n > (std::uint64_t{1} << 32)) bad("games", "an integer in [0, 2**32]", games);
            const auto [t, a] = training_settings(threads, alpha);
            std::vector<TrainingGame> results;
            {
              py::gil_scoped_release release;
              results = network.train(s, n, t, a);
            }
            py::list out;
            for (const auto& game : results)
              out.append(py::make_tuple(game.score, game.max_tile, game.moves));
            return out;
          },
          py::arg("seed"), py::arg("games"), py::arg("threads") = 1, py::arg("alpha") = 0.1);

  py::class_<Engine, std::shared_ptr<Engine>>(m, "Engine")
      .def(py::init(&make_engine), py::arg("heuristic") = "default", py::arg("depth") = 0,
           py::arg("prob_cutoff") = 1e-4, py::arg("cache") = true, py::arg("threads") = 0,
           py::arg("weights") = py::none(), py::arg("max_nodes") = py::none(),
           py::arg("time_limit") = py::none())
      .def(
          "evaluate",
          [](const Engine& engine, py::handle board) { return engine.evaluate(board_arg(board)); },
          py::arg("board"))
      .def(
          "root_depth",
          [](const Engine& engine, py::handle board) {
            return engine.root_depth(board_arg(board));
          },
          py::arg("board"))
      .def_property_readonly("max_nodes",
                             [](const Engine& engine) -> py::object {
                               auto n = engine.config().budget.max_nodes;
                               return n ? py::object(py::int_(n)) : py::object(py::none());
                             })
      .def_property_readonly("time_limit",
                             [](const Engine& engine) -> py::object {
                               double t = engine.config().budget.time_limit;
                               return t > 0 ? py::object(py::float_(t)) : py::object(py::none());
                             })
      // max_nodes / time_limit: ... (omitted) = the engine's budget, None = no limit.
      .def(
          "best_move",
          [](const Engine& engine, py::handle board, py::handle max_nodes, py::handle time_limit,
             CancelToken* token) {
            Board b = board_arg(board);
            SearchBudget budget = engine.config().budget;
            if (!max_nodes.is(py::ellipsis()) || !time_limit.is(py::ellipsis())) {
              SearchBudget given;
              read_budget(max_nodes.is(py::ellipsis()) ? py::handle(py::none()) : max_nodes,
                          time_limit.is(py::ellipsis()) ? py::handle(py::none()) : time_limit,
                          given);
              if (!max_nodes.is(py::ellipsis())) budget.max_nodes = given.max_nodes;
              if (!time_limit.is(py::ellipsis())) budget.time_limit = given.time_limit;
            }
            ReleasedSearch search(token);
            Decision decision = search.run(
                [&](const Cancellation& cancel) { return engine.best_move(b, budget, cancel); });
            return decision_dict(decision);
          },
          py::arg("board"), py::arg("max_nodes") = py::ellipsis(),
          py::arg("time_limit") = py::ellipsis(), py::arg("cancel") = nullptr)
      .def(
          "play_game",
          [](const Engine& engine, py::handle seed, py::handle record_moves, CancelToken* token) {
            std::uint64_t s = uint64_arg(seed, "seed");
            bool record = bool_arg(record_moves, "record_moves");
            ReleasedSearch search(token);
            GameResult result = search.run(
                [&](const Cancellation& cancel) { return engine.play_game(s, record, cancel); });
            py::dict d;
            d["final_board"] = result.final_board;
            d["max_tile"] = result.max_tile;
            d["score"] = result.score;
            d["moves"] = result.moves;
            d["seconds"] = result.seconds;
            d["hit_65536_limit"] = result.hit_65536_limit;
            d["budget_stops"] = result.budget_stops;
            d["stats"] = stats_dict(result.stats);
            d["move_log"] = std::vector<int>(result.move_log.begin(), result.move_log.end());
            return d;
          },
          py::arg("seed"), py::arg("record_moves") = false, py::arg("cancel") = nullptr);
}
