// pybind11 surface of the C++ core: kept thin on purpose. Python owns the user-facing API
// (chattts_ort.Runtime); this file only converts arrays and releases the GIL around compute.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "engine.h"
#include "session.h"

namespace py = pybind11;
using namespace chattts;

namespace {

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
  auto bind = [&](py::dict d, bool is_input) {
    for (auto item : d) {
      std::string name = py::cast<std::string>(item.first);
      py::array a = py::reinterpret_borrow<py::array>(item.second);
      if (!py::isinstance<py::array>(item.second)) throw py::type_error("'" + name + "' must be a numpy array");
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
      if (is_input) s.bind_input(name, v); else s.bind_output(name, v);
      keep.push_back(a);
    }
  };
  s.clear();
  bind(inputs, true);
  bind(outputs, false);
  Ort::RunOptions opts;
  {
    py::gil_scoped_release release;
    s.run(opts);
  }
  s.clear();
}

template <typename T>
std::vector<T> to_vector(py::array_t<T, py::array::c_style | py::array::forcecast> a) {
  return std::vector<T>(a.data(), a.data() + a.size());
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "chattts-ort C++ core: ONNX Runtime sessions with IO binding and the decode loop";
  py::register_exception<Error>(m, "CoreError", PyExc_RuntimeError);

  m.def("init_runtime", &init_runtime, py::arg("library_path"),
        "Load libonnxruntime from this path (once per process).");
  m.def("runtime_ready", &runtime_ready);
  m.def("runtime_library_path", &runtime_library_path);
  m.def("runtime_version", &runtime_version, "Version string of the loaded ONNX Runtime.");
  m.def("available_providers", &available_providers, "Execution providers of the loaded ONNX Runtime.");
  m.def("env_threads", &env_threads, "Threads of the shared intra-op pool (-1 before the first session).");
  m.attr("ORT_API_VERSION") = ORT_API_VERSION;

  py::class_<Session>(m, "Session", "One ONNX graph; run() binds caller-owned numpy buffers with IO binding.")
      .def(py::init<const std::string&, const std::string&, int>(), py::arg("path"), py::arg("device") = "cpu",
           py::arg("threads") = 0, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("path", &Session::path)
      .def_property_readonly("inputs", [](const Session& s) { return describe(s.inputs()); })
      .def_property_readonly("outputs", [](const Session& s) { return describe(s.outputs()); })
      .def("run", &session_run, py::arg("inputs"), py::arg("outputs"),
           "Run with every input and output bound to the given arrays; outputs are written in place.");

  py::class_<EngineSpec>(m, "EngineSpec")
      .def(py::init<>())
      .def_readwrite("embed", &EngineSpec::embed)
      .def_readwrite("head_code", &EngineSpec::head_code)
      .def_readwrite("head_text", &EngineSpec::head_text)
      .def_readwrite("sample", &EngineSpec::sample)
      .def_readwrite("layers", &EngineSpec::layers)
      .def_readwrite("hidden", &EngineSpec::hidden)
      .def_readwrite("heads", &EngineSpec::heads)
      .def_readwrite("head_dim", &EngineSpec::head_dim)
      .def_readwrite("num_vq", &EngineSpec::num_vq)
      .def_readwrite("vocab_code", &EngineSpec::vocab_code)
      .def_readwrite("vocab_text", &EngineSpec::vocab_text)
      .def_readwrite("max_context", &EngineSpec::max_context)
      .def_readwrite("max_batch", &EngineSpec::max_batch)
      .def_readwrite("device", &EngineSpec::device)
      .def_readwrite("threads", &EngineSpec::threads)
      .def_readwrite("layer_form", &EngineSpec::layer_form)
      .def_readwrite("session_config", &EngineSpec::session_config)
      .def_readwrite("kv_fp16", &EngineSpec::kv_fp16)
      .def_readwrite("rope_theta", &EngineSpec::rope_theta);

  py::class_<Engine>(m, "Engine", "The whole decode loop in C++ over the exported blocks.")
      .def(py::init<const EngineSpec&>(), py::arg("spec"), py::call_guard<py::gil_scoped_release>())
      .def("io", [](const Engine& e, const std::string& which, int layer) {
             const Session& s = e.session(which, layer);
             return py::make_tuple(describe(s.inputs()), describe(s.outputs()));
           }, py::arg("which"), py::arg("layer") = 0)
      .def("start",
           [](Engine& e, py::array_t<int64_t, py::array::c_style | py::array::forcecast> input_ids,
              py::array_t<int64_t, py::array::c_style | py::array::forcecast> attention_mask,
              py::array_t<float, py::array::c_style | py::array::forcecast> speaker, bool text_mode,
              py::array_t<float, py::array::c_style | py::array::forcecast> temperature, float repetition_penalty,
              float top_p, int64_t top_k, int64_t max_new_token, int64_t min_new_token, int64_t eos_id,
              bool greedy, uint64_t seed, py::object noise) {
             if (input_ids.ndim() != 3 || input_ids.shape(2) != 4) throw py::value_error("input_ids must be [B, T, 4]");
             GenerationSpec g;
             g.text_mode = text_mode;
             g.batch = input_ids.shape(0);
             g.prompt_len = input_ids.shape(1);
             g.input_ids = to_vector(input_ids);
             g.attention_mask = to_vector(attention_mask);
             g.speaker = to_vector(speaker);
             g.temperature = to_vector(temperature);
             g.repetition_penalty = repetition_penalty;
             g.top_p = top_p;
             g.top_k = top_k;
             g.max_new_token = max_new_token;
             g.min_new_token = min_new_token;
             g.eos_id = eos_id;
             g.greedy = greedy;
             g.seed = seed;
             if (!noise.is_none()) {
               auto a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(noise);
               if (!a || a.ndim() != 3) throw py::value_error("noise must be a float32 array [steps, N, V]");
               g.noise_steps = a.shape(0);
               g.noise = to_vector<float>(a);
             }
             py::gil_scoped_release release;
             e.start(std::move(g));
           },
           py::arg("input_ids"), py::arg("attention_mask"), py::arg("speaker"), py::arg("text_mode"),
           py::arg("temperature"), py::arg("repetition_penalty"), py::arg("top_p"), py::arg("top_k"),
           py::arg("max_new_token"), py::arg("min_new_token"), py::arg("eos_id"), py::arg("greedy"),
           py::arg("seed"), py::arg("noise") = py::none())
      .def("step",
           [](Engine& e, bool return_hidden) {
             StepResult r;
             {
               py::gil_scoped_release release;
               r = e.step(return_hidden);
             }
             const int64_t frames = int64_t(r.rows.size());
             const int64_t k = frames ? int64_t(r.ids.size()) / frames : 0;
             py::array_t<int32_t> rows(frames, r.rows.data());
             py::array_t<int64_t> ids(std::vector<int64_t>{frames, k});
             std::copy(r.ids.begin(), r.ids.end(), ids.mutable_data());
             py::object hidden = py::none();
             if (return_hidden) {
               const int64_t E = e.spec().hidden;
               py::array_t<float> h(std::vector<int64_t>{frames, E});
               std::copy(r.hidden.begin(), r.hidden.end(), h.mutable_data());
               hidden = h;
             }
             return py::make_tuple(r.step, rows, ids, hidden, r.ended_rows, r.done, r.stop_reason);
           },
           py::arg("return_hidden") = false,
           "Run one step (the first runs the prefill). Returns (step, rows, ids, hidden, ended_rows, done, reason).")
      .def_property_readonly("active", &Engine::active)
      .def("profile", &Engine::profile, py::arg("on"), "Time every block (for chattts_ort.Runtime.profile).")
      .def("take_profile", &Engine::take_profile, "Summed ms per block since the last call, and the step count.")
      .def("reset", &Engine::reset, "End the generation in progress (buffers are kept).")
      .def("terminate", &Engine::terminate, "Cut a Run in flight (safe from another thread).");
}
