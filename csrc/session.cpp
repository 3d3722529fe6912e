#include "session.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace chattts {
namespace {

// Loading a graph parses the whole file and copies its weights into tensors (and, for MatMul, into the
// kernel's prepacked layout); the parse buffers and replaced weights are freed, but glibc keeps freed heap
// pages mapped, so a process that loads ChatTTS's 20 layers would hold ~1.27x the fp32 weights where 1.05x is
// live (measured with `chattts-ort memory`). Handing the free pages back after each graph costs milliseconds.
void release_freed_heap() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

}  // namespace

const char* dtype_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    default: return "unsupported";
  }
}

size_t dtype_size(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return 2;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return 8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return 8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return 1;
    default: throw Error("unsupported tensor element type " + std::to_string(int(t)));
  }
}

static const Ort::MemoryInfo& cpu_memory() {
  static Ort::MemoryInfo info = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  return info;
}

Ort::Value view(void* data, ONNXTensorElementDataType type, const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (auto d : shape) n *= size_t(d);
  return Ort::Value::CreateTensor(cpu_memory(), data, n * dtype_size(type), shape.data(), shape.size(), type);
}

template <>
Ort::Value view<float>(float* d, const std::vector<int64_t>& s) { return view(d, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, s); }
template <>
Ort::Value view<int64_t>(int64_t* d, const std::vector<int64_t>& s) { return view(d, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, s); }
template <>
Ort::Value view<bool>(bool* d, const std::vector<int64_t>& s) { return view(d, ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL, s); }

static std::vector<TensorInfo> describe(Ort::Session& s, bool inputs) {
  std::vector<TensorInfo> out;
  Ort::AllocatorWithDefaultOptions alloc;
  size_t n = inputs ? s.GetInputCount() : s.GetOutputCount();
  for (size_t i = 0; i < n; ++i) {
    auto name = inputs ? s.GetInputNameAllocated(i, alloc) : s.GetOutputNameAllocated(i, alloc);
    auto ti = inputs ? s.GetInputTypeInfo(i) : s.GetOutputTypeInfo(i);
    TensorInfo info{name.get(), ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, {}};
    if (ti.GetONNXType() == ONNX_TYPE_TENSOR) {
      auto tsi = ti.GetTensorTypeAndShapeInfo();
      info.type = tsi.GetElementType();
      info.shape = tsi.GetShape();
    }
    out.push_back(std::move(info));
  }
  return out;
}

Session::Session(const std::string& path, const std::string& device, int threads,
                 const std::vector<std::pair<std::string, std::string>>& config, int own_threads)
    : path_(path) {
  try {
    Ort::SessionOptions so = make_session_options(device, threads, config, own_threads);
    session_ = Ort::Session(env(threads), path.c_str(), so);
    inputs_ = describe(session_, true);
    outputs_ = describe(session_, false);
    for (auto& t : inputs_) in_names_.push_back(t.name.c_str());
    for (auto& t : outputs_) out_names_.push_back(t.name.c_str());
    Ort::AllocatorWithDefaultOptions alloc;
    Ort::ModelMetadata meta = session_.GetModelMetadata();
    Ort::AllocatedStringPtr tag = meta.LookupCustomMetadataMapAllocated("chattts_ort.block", alloc);
    if (tag) block_tag_ = tag.get();
  } catch (const Ort::Exception& e) {
    throw Error("cannot load ONNX graph " + path + ": " + e.what());
  }
  release_freed_heap();
}

void Session::run(const Ort::RunOptions& opts, const Ort::Value* in, size_t n_in, Ort::Value* out, size_t n_out) {
  if (n_in != in_names_.size() || n_out != out_names_.size())
    throw Error("running " + path_ + ": " + std::to_string(n_in) + " inputs and " + std::to_string(n_out) +
                " outputs given, the graph has " + std::to_string(in_names_.size()) + " and " +
                std::to_string(out_names_.size()));
  try {
    session_.Run(opts, in_names_.data(), in, n_in, out_names_.data(), out, n_out);
  } catch (const Ort::Exception& e) {
    throw Error("running " + path_ + " failed: " + e.what());
  }
}

void Session::run(const Ort::RunOptions& opts, const Ort::IoBinding& binding) {
  try {
    session_.Run(opts, binding);
  } catch (const Ort::Exception& e) {
    throw Error("running " + path_ + " failed: " + e.what());
  }
}

}  // namespace chattts
