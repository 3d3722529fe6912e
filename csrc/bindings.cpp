// pybind11 surface of the C++ core: kept thin on purpose. Python owns the user-facing API
// (chattts_ort.Runtime); this file converts arrays, crosses structs with named fields, and releases the GIL
// around compute.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <exception>
#include <future>
#include <thread>

#include "audio.h"
#include "model.h"
#include "scheduler.h"
#include "session.h"
#include "state.h"

namespace py = pybind11;
using namespace chattts;

namespace {

// Runs fn with the GIL released. The GIL is taken back in plain code, not in a destructor: a daemon thread
// that is still here when the interpreter exits is ended by Python through pthread_exit at that point, and a
// forced unwind through a destructor (py::gil_scoped_release's) would abort the whole process.
template <typename F>
auto without_gil(F&& fn) -> decltype(fn()) {
  decltype(fn()) out{};
  std::exception_ptr err;
  PyThreadState* ts = PyEval_SaveThread();
  try {
    out = fn();
  } catch (...) {
    err = std::current_exception();
  }
  PyEval_RestoreThread(ts);
  if (err) std::rethrow_exception(err);
  return out;
}

// Like without_gil, but fn runs on a helper thread while this one wakes every 50 ms to let Python handle
// signals: Ctrl-C during a long prefill cuts the Run in flight (RunOptions terminate) and raises
// KeyboardInterrupt at once instead of after the whole prompt.
template <typename F>
auto interruptible(State& state, F&& fn) -> decltype(fn()) {
  using R = decltype(fn());
  // However this frame is left (an exception, or the interpreter ending this thread), the worker is cut
  // and joined first: a joinable std::thread must never be destroyed.
  struct Worker {
    State& state;
    std::thread thread;
    ~Worker() {
      if (thread.joinable()) {
        state.terminate();
        thread.join();
      }
    }
  };
  std::packaged_task<R()> task(std::forward<F>(fn));
  std::future<R> done = task.get_future();
  Worker worker{state, std::thread(std::move(task))};
  while (true) {
    const bool ready = without_gil([&] {
      return done.wait_for(std::chrono::milliseconds(50)) == std::future_status::ready;
    });
    if (ready) break;
    if (PyErr_CheckSignals() != 0) {
      state.terminate();
      without_gil([&] { worker.thread.join(); return 0; });
      try { done.get(); } catch (...) {}  // the cut Run's error; the signal's exception wins
      throw py::error_already_set();
    }
  }
  without_gil([&] { worker.thread.join(); return 0; });
  return done.get();
}

ONNXTensorElementDataType ort_type(const py::dtype& dt) {
  if (dt.is(py::dtype::of<float>())) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (dt.is(py::dtype::of<double>())) return ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
  if (dt.is(py::dtype::of<int64_t>())) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  if (dt.is(py::dtype::of<int32_t>())) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  if (dt.is(py::dtype::of<bool>())) return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
  if (dt.is(py::dtype::of<uint8_t>())) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  if (dt.is(py::dtype::of<int8_t>())) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  if (dt.is(py::dtype("float16"))) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  throw Error("unsupported numpy dtype " + std::string(py::str(dt)));
}

py::list describe(const std::vector<TensorInfo>& infos) {
  py::list out;
  for (auto& t : infos) out.append(py::make_tuple(t.name, dtype_name(t.type), t.shape));
  return out;
}

const TensorInfo& find(const std::vector<TensorInfo>& infos, const std::string& name, const Session& s,
                       const char* what) {
  for (auto& t : infos)
    if (t.name == name) return t;
  throw py::key_error(std::string("graph ") + s.path() + " has no " + what + " named '" + name + "'");
}

// Binds caller-owned numpy arrays as inputs and outputs (no copies) and runs the graph.
void session_run(Session& s, py::dict inputs, py::dict outputs) {
  std::vector<py::array> keep;
  Ort::IoBinding binding = s.make_binding();
  auto bind = [&](py::dict d, bool is_input) {
    for (auto item : d) {
      std::string name = py::cast<std::string>(item.first);
      if (!py::isinstance<py::array>(item.second)) throw py::type_error("'" + name + "' must be a numpy array");
      py::array a = py::reinterpret_borrow<py::array>(item.second);
      if (!(a.flags() & py::array::c_style)) throw py::value_error("'" + name + "' must be C-contiguous");
      if (!is_input && !a.writeable()) throw py::value_error("output '" + name + "' must be writeable");
      const TensorInfo& info = find(is_input ? s.inputs() : s.outputs(), name, s, is_input ? "input" : "output");
      ONNXTensorElementDataType t = ort_type(a.dtype());
      if (t != info.type)
        throw py::type_error("'" + name + "' of " + s.path() + " is " + dtype_name(info.type) + ", got " +
                             dtype_name(t));
      std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
      void* ptr = is_input ? const_cast<void*>(a.data()) : a.mutable_data();
      Ort::Value v = view(ptr, t, shape);
      if (is_input) binding.BindInput(name.c_str(), v); else binding.BindOutput(name.c_str(), v);
      keep.push_back(a);
    }
  };
  bind(inputs, true);
  bind(outputs, false);
  Ort::RunOptions opts;
  without_gil([&] { s.run(opts, binding); return 0; });
}

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

std::vector<float> to_floats(const FloatArray& a) { return std::vector<float>(a.data(), a.data() + a.size()); }

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "chattts-ort C++ core: ONNX Runtime sessions with IO binding, the model and generation states";
  py::register_exception<Error>(m, "CoreError", PyExc_RuntimeError);

  m.def("init_runtime", &init_runtime, py::arg("library_path"),
        "Load libonnxruntime from this path (once per process).");
  m.def("runtime_ready", &runtime_ready);
  m.def("runtime_library_path", &runtime_library_path);
  m.def("runtime_version", &runtime_version, "Version string of the loaded ONNX Runtime.");
  m.def("available_providers", &available_providers, "Execution providers of the loaded ONNX Runtime.");
  m.def("set_spinning", &set_spinning, py::arg("on"),
        "Spin (True) or sleep (False) between Runs; only before the first session of the process.");
  m.def("spinning", &spinning, "Whether the process-wide thread pool spins.");
  m.def("env_created", &env_created, "Whether the process-wide ONNX Runtime Env (and its thread pool) exists.");
  m.attr("ORT_API_VERSION") = ORT_API_VERSION;

  py::class_<Session>(m, "Session", "One ONNX graph; run() binds caller-owned numpy buffers with IO binding.")
      .def(py::init<const std::string&, const std::string&, int>(), py::arg("path"), py::arg("device") = "cpu",
           py::arg("threads") = 0, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("path", &Session::path)
      .def_property_readonly("inputs", [](const Session& s) { return describe(s.inputs()); })
      .def_property_readonly("outputs", [](const Session& s) { return describe(s.outputs()); })
      .def("run", &session_run, py::arg("inputs"), py::arg("outputs"),
           "Run with every input and output bound to the given arrays; outputs are written in place.");

  py::class_<ModelSpec>(m, "ModelSpec", "What Model loads: the block files and the sizes of the config.")
      .def(py::init<>())
      .def_readwrite("embed", &ModelSpec::embed)
      .def_readwrite("head_code", &ModelSpec::head_code)
      .def_readwrite("head_text", &ModelSpec::head_text)
      .def_readwrite("sample", &ModelSpec::sample)
      .def_readwrite("layers", &ModelSpec::layers)
      .def_readwrite("num_layers", &ModelSpec::num_layers)
      .def_readwrite("layers_per_graph", &ModelSpec::layers_per_graph)
      .def_readwrite("hidden", &ModelSpec::hidden)
      .def_readwrite("heads", &ModelSpec::heads)
      .def_readwrite("head_dim", &ModelSpec::head_dim)
      .def_readwrite("num_vq", &ModelSpec::num_vq)
      .def_readwrite("vocab_code", &ModelSpec::vocab_code)
      .def_readwrite("vocab_text", &ModelSpec::vocab_text)
      .def_readwrite("max_context", &ModelSpec::max_context)
      .def_readwrite("device", &ModelSpec::device)
      .def_readwrite("threads", &ModelSpec::threads)
      .def_readwrite("layer_form", &ModelSpec::layer_form)
      .def_readwrite("session_config", &ModelSpec::session_config)
      .def_readwrite("kv_fp16", &ModelSpec::kv_fp16)
      .def_readwrite("rope_theta", &ModelSpec::rope_theta);

  py::class_<Model, std::shared_ptr<Model>>(m, "Model", "The loaded blocks, read-only and shared by states.")
      .def(py::init([](const ModelSpec& spec) {
             return without_gil([&] { return std::make_shared<Model>(spec); });
           }), py::arg("spec"))
      .def("io", [](Model& md, const std::string& block) {
             Session& s = md.block(block);
             return py::make_tuple(describe(s.inputs()), describe(s.outputs()));
           }, py::arg("block"), "(inputs, outputs) of a block: lists of (name, dtype, shape).")
      .def("kv_bytes_per_row", &Model::kv_bytes_per_row, py::arg("max_context"),
           "KV cache bytes one batch row takes at this context (all layers, K and V).");

  py::class_<GenerationSpec>(m, "GenerationSpec", "One generation's prompts and sampling settings.")
      .def(py::init<>())
      .def_readwrite("text_mode", &GenerationSpec::text_mode)
      .def_readwrite("prompt_ids", &GenerationSpec::prompt_ids)
      .def_readwrite("prompt_lens", &GenerationSpec::prompt_lens)
      .def_readwrite("temperature", &GenerationSpec::temperature)
      .def_readwrite("repetition_penalty", &GenerationSpec::repetition_penalty)
      .def_readwrite("top_p", &GenerationSpec::top_p)
      .def_readwrite("top_k", &GenerationSpec::top_k)
      .def_readwrite("max_new_token", &GenerationSpec::max_new_token)
      .def_readwrite("min_new_token", &GenerationSpec::min_new_token)
      .def_readwrite("eos_id", &GenerationSpec::eos_id)
      .def_readwrite("greedy", &GenerationSpec::greedy)
      .def_readwrite("return_hidden", &GenerationSpec::return_hidden)
      .def_readwrite("seed", &GenerationSpec::seed)
      .def_property("speaker", [](const GenerationSpec& g) { return py::array_t<float>(g.speaker.size(), g.speaker.data()); },
                    [](GenerationSpec& g, const FloatArray& a) { g.speaker = to_floats(a); },
                    "[B * hidden] speaker values (empty: no speaker)")
      .def_property("noise", [](const GenerationSpec& g) { return py::array_t<float>(g.noise.size(), g.noise.data()); },
                    [](GenerationSpec& g, const FloatArray& a) {
                      if (a.ndim() != 3) throw py::value_error("noise must be [steps, N, V]");
                      g.noise_steps = a.shape(0);
                      g.noise = to_floats(a);
                    }, "[steps, N, V] Exp(1) draw noise (empty: the seeded generator)");

  py::class_<StepResult>(m, "StepResult", "What one step produced (frames of rows still running).")
      .def_readonly("step", &StepResult::step)
      .def_readonly("done", &StepResult::done)
      .def_readonly("stop_reason", &StepResult::stop_reason)
      .def_readonly("ended_rows", &StepResult::ended_rows)
      .def_property_readonly("rows", [](const StepResult& r) { return py::array_t<int32_t>(r.rows.size(), r.rows.data()); })
      .def_property_readonly("ids", [](const StepResult& r) {
        const int64_t frames = int64_t(r.rows.size());
        py::array_t<int64_t> a(std::vector<int64_t>{frames, r.k});
        std::copy(r.ids.begin(), r.ids.end(), a.mutable_data());
        return a;
      }, "int64 [frames, k]")
      .def_property_readonly("hidden", [](const StepResult& r) -> py::object {
        if (r.hidden.empty()) return py::none();
        const int64_t frames = int64_t(r.rows.size());
        py::array_t<float> a(std::vector<int64_t>{frames, int64_t(r.hidden.size()) / frames});
        std::copy(r.hidden.begin(), r.hidden.end(), a.mutable_data());
        return a;
      }, "float32 [frames, hidden] when the spec asked for it, else None");

  py::class_<State>(m, "State", "One generation at a time over a shared Model: KV cache, rows, counters.")
      .def(py::init([](std::shared_ptr<Model> model, int64_t max_batch) {
             return without_gil([&] { return std::make_unique<State>(std::move(model), max_batch); });
           }), py::arg("model"), py::arg("max_batch") = 1)
      .def("start", [](State& s, GenerationSpec g) { without_gil([&] { s.start(std::move(g)); return 0; }); },
           py::arg("spec"))
      .def("step", [](State& s) {
             // A prefill can take seconds: it runs interruptibly. Decode steps run on this thread.
             if (s.prefill_pending()) return interruptible(s, [&s] { return s.step(); });
             return without_gil([&s] { return s.step(); });
           }, "Run one step (the first runs the prefill).")
      .def_property_readonly("kv_rows", &State::kv_rows)
      .def("profile", &State::profile, py::arg("on"), "Time every block (for chattts_ort.Runtime.profile).")
      .def("take_profile", [](State& s) { return without_gil([&] { return s.take_profile(); }); },
           "Summed ms per block since the last call, and the step count.")
      .def("reset", [](State& s) { without_gil([&] { s.reset(); return 0; }); },
           "End the generation in progress (buffers are kept).")
      .def("close", &State::close, "End the generation for good (cuts a Run in flight); later calls raise.")
      .def("release_memory", [](State& s) { without_gil([&] { s.release_memory(); return 0; }); },
           "Free KV rows grown beyond the load-time batch.");

  py::class_<StreamSpec>(m, "StreamSpec", "One stream's prompt (a single row) and sampling settings.")
      .def(py::init<>())
      .def_readwrite("prompt_ids", &StreamSpec::prompt_ids)
      .def_readwrite("temperature", &StreamSpec::temperature)
      .def_readwrite("repetition_penalty", &StreamSpec::repetition_penalty)
      .def_readwrite("top_p", &StreamSpec::top_p)
      .def_readwrite("top_k", &StreamSpec::top_k)
      .def_readwrite("max_new_token", &StreamSpec::max_new_token)
      .def_readwrite("min_new_token", &StreamSpec::min_new_token)
      .def_readwrite("greedy", &StreamSpec::greedy)
      .def_readwrite("return_hidden", &StreamSpec::return_hidden)
      .def_readwrite("seed", &StreamSpec::seed)
      .def_readwrite("queue_timeout_s", &StreamSpec::queue_timeout_s)
      .def_property("speaker", [](const StreamSpec& g) { return py::array_t<float>(g.speaker.size(), g.speaker.data()); },
                    [](StreamSpec& g, const FloatArray& a) { g.speaker = to_floats(a); }, "[hidden] or empty")
      .def_property("noise", [](const StreamSpec& g) { return py::array_t<float>(g.noise.size(), g.noise.data()); },
                    [](StreamSpec& g, const FloatArray& a) {
                      if (a.ndim() != 3) throw py::value_error("noise must be [steps, num_vq, V]");
                      g.noise_steps = a.shape(0);
                      g.noise = to_floats(a);
                    }, "[steps, num_vq, V] Exp(1) draw noise (empty: the stream's seeded generator)");

  py::class_<Pulled>(m, "Pulled", "Frames a stream produced since the last pull, and how it ended.")
      .def_readonly("done", &Pulled::done)
      .def_readonly("stop_reason", &Pulled::stop_reason)
      .def_readonly("error", &Pulled::error)
      .def_property_readonly("count", [](const Pulled& p) { return p.frames.size(); })
      .def_property_readonly("steps", [](const Pulled& p) {
        py::array_t<int64_t> a(int64_t(p.frames.size()));
        for (size_t i = 0; i < p.frames.size(); ++i) a.mutable_data()[i] = p.frames[i].step;
        return a;
      })
      .def_property_readonly("codes", [](const Pulled& p) {
        const int64_t k = p.frames.empty() ? 0 : int64_t(p.frames[0].codes.size());
        py::array_t<int64_t> a(std::vector<int64_t>{int64_t(p.frames.size()), k});
        for (size_t i = 0; i < p.frames.size(); ++i)
          std::copy(p.frames[i].codes.begin(), p.frames[i].codes.end(), a.mutable_data() + i * size_t(k));
        return a;
      }, "int64 [frames, num_vq]")
      .def_property_readonly("hidden", [](const Pulled& p) -> py::object {
        if (p.frames.empty() || p.frames[0].hidden.empty()) return py::none();
        const int64_t E = int64_t(p.frames[0].hidden.size());
        py::array_t<float> a(std::vector<int64_t>{int64_t(p.frames.size()), E});
        for (size_t i = 0; i < p.frames.size(); ++i)
          std::copy(p.frames[i].hidden.begin(), p.frames[i].hidden.end(), a.mutable_data() + i * size_t(E));
        return a;
      }, "float32 [frames, hidden] when the stream asked for it, else None");

  py::class_<Scheduler>(m, "Scheduler", "Many concurrent streams batched step by step over one Model.")
      .def(py::init([](std::shared_ptr<Model> model, int64_t max_streams, int64_t queue_frames, bool batch_invariant) {
             return without_gil([&] {
               return std::make_unique<Scheduler>(std::move(model), max_streams, queue_frames, batch_invariant);
             });
           }), py::arg("model"), py::arg("max_streams"), py::arg("queue_frames") = 256, py::arg("batch_invariant") = false)
      .def("submit", [](Scheduler& s, StreamSpec spec) { return without_gil([&] { return s.submit(std::move(spec)); }); },
           py::arg("spec"), "Queue a stream; returns its id (it waits for a free row, then runs).")
      .def("pull", [](Scheduler& s, int64_t id, int64_t max_wait_ms) {
             return without_gil([&] { return s.pull(id, max_wait_ms); });
           }, py::arg("id"), py::arg("max_wait_ms") = 50, "The frames queued since the last pull (waits up to max_wait_ms).")
      .def("cancel", [](Scheduler& s, int64_t id) { without_gil([&] { s.cancel(id); return 0; }); }, py::arg("id"))
      .def("close", [](Scheduler& s) { without_gil([&] { s.close(); return 0; }); })
      .def("stats", [](Scheduler& s) {
             SchedulerStats st = without_gil([&] { return s.stats(); });
             py::dict d;
             d["rows"] = st.rows; d["active"] = st.active; d["waiting"] = st.waiting;
             d["steps"] = st.steps; d["frames"] = st.frames; d["prefills"] = st.prefills;
             return d;
           });

  py::class_<AudioSpec>(m, "AudioSpec", "What AudioEngine loads: the streaming audio graphs and their sizes.")
      .def(py::init<>())
      .def_readwrite("step", &AudioSpec::step)
      .def_readwrite("flush", &AudioSpec::flush)
      .def_readwrite("hidden", &AudioSpec::hidden)
      .def_readwrite("state_size", &AudioSpec::state_size)
      .def_readwrite("flush_samples", &AudioSpec::flush_samples)
      .def_readwrite("samples_per_frame", &AudioSpec::samples_per_frame)
      .def_readwrite("hop", &AudioSpec::hop)
      .def_readwrite("exact_lookahead", &AudioSpec::exact_lookahead)
      .def_readwrite("sample_rate", &AudioSpec::sample_rate)
      .def_readwrite("max_chunk", &AudioSpec::max_chunk)
      .def_readwrite("device", &AudioSpec::device)
      .def_readwrite("threads", &AudioSpec::threads)
      .def_readwrite("own_threads", &AudioSpec::own_threads)
      .def_readwrite("session_config", &AudioSpec::session_config);

  py::class_<AudioEngine>(m, "AudioEngine", "GPT hidden states in, samples out, for any number of streams.")
      .def(py::init([](const AudioSpec& spec) {
             return without_gil([&] { return std::make_unique<AudioEngine>(spec); });
           }), py::arg("spec"))
      .def("io", [](AudioEngine& e, const std::string& block) {
             const Session& s = block == "audio_step" ? e.step_session() : block == "audio_flush" ? e.flush_session()
                 : throw py::key_error("no audio block '" + block + "'");
             return py::make_tuple(describe(s.inputs()), describe(s.outputs()));
           }, py::arg("block"))
      .def("open", [](AudioEngine& e, int64_t lookahead, int64_t chunk) { return e.open(lookahead, chunk); },
           py::arg("lookahead"), py::arg("chunk"), "A new stream; returns its id.")
      .def("push", [](AudioEngine& e, int64_t id, const FloatArray& frames) {
             if (frames.ndim() != 2 || frames.shape(1) != e.spec().hidden)
               throw py::value_error("frames must be [n, " + std::to_string(e.spec().hidden) + "] float32");
             without_gil([&] { e.push(id, frames.data(), frames.shape(0)); return 0; });
           }, py::arg("id"), py::arg("frames"))
      .def("finish", [](AudioEngine& e, int64_t id) { without_gil([&] { e.finish(id); return 0; }); }, py::arg("id"))
      .def("pull", [](AudioEngine& e, int64_t id, int64_t max_wait_ms) {
             AudioPulled p = without_gil([&] { return e.pull(id, max_wait_ms); });
             py::array_t<float> a(int64_t(p.samples.size()));
             std::copy(p.samples.begin(), p.samples.end(), a.mutable_data());
             return py::make_tuple(a, p.first, p.done, p.error);
           }, py::arg("id"), py::arg("max_wait_ms") = 50,
           "(samples float32 [n], index of the first, done, error) since the last pull.")
      .def("cancel", [](AudioEngine& e, int64_t id) { without_gil([&] { e.cancel(id); return 0; }); }, py::arg("id"))
      .def("close", [](AudioEngine& e) { without_gil([&] { e.close(); return 0; }); })
      .def("stats", [](AudioEngine& e) {
             AudioStats st = without_gil([&] { return e.stats(); });
             py::dict d;
             d["steps"] = st.steps; d["flushes"] = st.flushes; d["frames"] = st.frames; d["samples"] = st.samples;
             d["step_ms"] = st.step_ms; d["flush_ms"] = st.flush_ms;
             return d;
           });
}
