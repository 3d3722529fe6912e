// One ONNX graph in one Ort::Session, with IO binding into memory we own.
#pragma once

#include "ort_env.h"

#include <cstdint>
#include <string>
#include <vector>

namespace chattts {

struct TensorInfo {
  std::string name;
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;  // -1 for a symbolic dimension
};

const char* dtype_name(ONNXTensorElementDataType t);
size_t dtype_size(ONNXTensorElementDataType t);

// A tensor over memory someone else owns. Creating one allocates only the small OrtValue header.
Ort::Value view(void* data, ONNXTensorElementDataType type, const std::vector<int64_t>& shape);
template <typename T>
Ort::Value view(T* data, const std::vector<int64_t>& shape);

class Session {
 public:
  Session(const std::string& path, const std::string& device, int threads,
          const std::vector<std::pair<std::string, std::string>>& config = {});

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& inputs() const { return inputs_; }
  const std::vector<TensorInfo>& outputs() const { return outputs_; }

  // Bind by name (names are checked once, at load, against the manifest by the caller).
  void bind_input(const std::string& name, const Ort::Value& v) { binding_.BindInput(name.c_str(), v); }
  void bind_output(const std::string& name, const Ort::Value& v) { binding_.BindOutput(name.c_str(), v); }
  // Runs the graph on the current bindings; outputs land in the bound memory. Throws Error naming the file.
  void run(Ort::RunOptions& opts);
  void clear() { binding_.ClearBoundInputs(); binding_.ClearBoundOutputs(); }

 private:
  std::string path_;
  Ort::Session session_{nullptr};
  Ort::IoBinding binding_{nullptr};
  std::vector<TensorInfo> inputs_, outputs_;
};

}  // namespace chattts
