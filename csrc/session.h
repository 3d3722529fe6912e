// One ONNX graph in one Ort::Session. Read-only after load and shared by every generation state: each
// state binds its own memory through its own Ort::IoBinding (Run is thread-safe in ONNX Runtime).
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
          const std::vector<std::pair<std::string, std::string>>& config = {}, int own_threads = 0);

  Session(const Session&) = delete;  // in_names_ / out_names_ point into this object
  Session& operator=(const Session&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& inputs() const { return inputs_; }
  const std::vector<TensorInfo>& outputs() const { return outputs_; }
  // The block name the exporter wrote into the graph's metadata ("" for graphs without one).
  const std::string& block_tag() const { return block_tag_; }

  Ort::IoBinding make_binding() { return Ort::IoBinding(session_); }
  // Runs the graph on `binding`; outputs land in the bound memory. Throws Error naming the file.
  void run(const Ort::RunOptions& opts, const Ort::IoBinding& binding);
  // Runs the graph on tensors given in the order of inputs() and outputs() (outputs over caller memory).
  void run(const Ort::RunOptions& opts, const Ort::Value* in, size_t n_in, Ort::Value* out, size_t n_out);

 private:
  std::string path_, block_tag_;
  Ort::Session session_{nullptr};
  std::vector<TensorInfo> inputs_, outputs_;
  std::vector<const char*> in_names_, out_names_;  // into inputs_ / outputs_
};

}  // namespace chattts
