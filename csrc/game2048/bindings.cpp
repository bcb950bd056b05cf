// Python bindings: fastdl.game2048._engine. The Python package wraps these in friendlier
// classes and validates input; searches release the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "board.h"
#include "search.h"

namespace py = pybind11;
using namespace fastdl::game2048;

namespace {

py::dict stats_dict(const SearchStats& stats) {
    py::dict d;
    d["nodes"] = stats.nodes;
    d["evaluations"] = stats.evaluations;
    d["cache_hits"] = stats.cache_hits;
    return d;
}

std::shared_ptr<Engine> make_engine(const std::string& heuristic, int depth, double prob_cutoff, bool cache,
                                    int threads, const py::dict& weights) {
    SearchConfig config;
    config.heuristic = parse_heuristic(heuristic);
    config.depth = depth;
    config.prob_cutoff = prob_cutoff;
    config.cache = cache;
    config.threads = threads;
    HeuristicWeights& w = config.weights;
    for (auto [key, value] : weights) {
        std::string name = py::cast<std::string>(key);
        double v = py::cast<double>(value);
        if (name == "lost_penalty") w.lost_penalty = v;
        else if (name == "empty") w.empty = v;
        else if (name == "merges") w.merges = v;
        else if (name == "monotonicity") w.monotonicity = v;
        else if (name == "monotonicity_power") w.monotonicity_power = v;
        else if (name == "sum") w.sum = v;
        else if (name == "sum_power") w.sum_power = v;
        else throw py::value_error("unknown heuristic weight '" + name + "'");
    }
    return std::make_shared<Engine>(config);
}

}  // namespace

PYBIND11_MODULE(_engine, m) {
    m.doc() = "fastdl 2048 engine (C++ core)";
    m.attr("MAX_RANK") = kMaxRank;

    m.def("move", [](Board board, int direction) {
        if (direction < 0 || direction >= kNumDirections) throw py::value_error("direction must be 0..3");
        MoveOutcome outcome = apply_move(board, direction);
        return py::make_tuple(outcome.board, outcome.gain, outcome.overflow);
    }, py::arg("board"), py::arg("direction"),
       "(new_board, merge_score, overflow) for a move; new_board == board when illegal.");
    m.def("transpose", &transpose, py::arg("board"));
    m.def("count_empty", &count_empty, py::arg("board"));

    py::class_<Rng>(m, "Rng", "xoshiro256** seeded through splitmix64.")
        .def(py::init<std::uint64_t>(), py::arg("seed"))
        .def("next", &Rng::next, "Next raw 64-bit output.")
        .def("below", [](Rng& rng, std::uint64_t n) {
            if (n == 0) throw py::value_error("below(n) needs n > 0");
            return rng.below(n);
        }, py::arg("n"), "Uniform integer in [0, n).")
        .def("uniform", &Rng::uniform, "Uniform float in [0, 1).");

    m.def("spawn", [](Board board, Rng& rng) {
        if (count_empty(board) == 0) throw py::value_error("cannot spawn a tile: the board is full");
        return spawn_tile(board, rng);
    }, py::arg("board"), py::arg("rng"));

    py::class_<Engine, std::shared_ptr<Engine>>(m, "Engine")
        .def(py::init(&make_engine), py::arg("heuristic") = "default", py::arg("depth") = 0,
             py::arg("prob_cutoff") = 1e-4, py::arg("cache") = true, py::arg("threads") = 0,
             py::arg("weights") = py::dict())
        .def("evaluate", &Engine::evaluate, py::arg("board"))
        .def("root_depth", &Engine::root_depth, py::arg("board"))
        .def("best_move", [](const Engine& engine, Board board) {
            Decision decision;
            {
                py::gil_scoped_release release;
                decision = engine.best_move(board);
            }
            py::dict d;
            d["move"] = decision.move;
            d["values"] = std::vector<double>(decision.values.begin(), decision.values.end());
            d["depth"] = decision.depth;
            d["stats"] = stats_dict(decision.stats);
            d["seconds"] = decision.seconds;
            return d;
        }, py::arg("board"))
        .def("play_game", [](const Engine& engine, std::uint64_t seed, bool record_moves) {
            GameResult result;
            {
                py::gil_scoped_release release;
                result = engine.play_game(seed, record_moves);
            }
            py::dict d;
            d["final_board"] = result.final_board;
            d["max_tile"] = result.max_tile;
            d["score"] = result.score;
            d["moves"] = result.moves;
            d["seconds"] = result.seconds;
            d["hit_65536_limit"] = result.hit_65536_limit;
            d["stats"] = stats_dict(result.stats);
            d["move_log"] = std::vector<int>(result.move_log.begin(), result.move_log.end());
            return d;
        }, py::arg("seed"), py::arg("record_moves") = false);
}
