// The KV cache of one generation state: per layer, one K and one V buffer for `rows` batch rows at the full
// context, allocated up front and written in place by the layers (no step allocates or copies it).
//
// Layouts (the manifest's layer_form picks one):
// - fused:    [rows, H, M, D]: past and present of GroupQueryAttention are the same buffer; row b is one slab.
// - portable: [M, rows, H, D]: sequence outermost, so the first P positions of any batch size are one
//             contiguous "past" view and the S new positions are the contiguous slot right after it.
// fp16 elements (fused form only) are stored two to a float slot; the core never does arithmetic on them.
#pragma once

#include "ort_env.h"

#include <cstdint>
#include <memory>
#include <vector>

namespace chattts {

class KVCache {
 public:
  KVCache(int64_t layers, int64_t heads, int64_t head_dim, int64_t max_context, bool fp16);

  // Bytes of K and V for one batch row over all layers (checked arithmetic).
  static int64_t bytes_per_row(int64_t layers, int64_t heads, int64_t head_dim, int64_t max_context, bool fp16);

  // Makes room for `rows` rows (never shrinks). On allocation failure the cache keeps its previous buffers
  // and an Error says how much was asked for.
  void reserve(int64_t rows);
  // Frees the buffers beyond `rows` rows (after a large batch, or on request).
  void shrink(int64_t rows);

  int64_t rows() const { return rows_; }
  int64_t max_context() const { return max_context_; }
  ONNXTensorElementDataType type() const {
    return fp16_ ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  // Element pointer of layer l at element offset `offset` (in elements of type()).
  void* key(size_t l, int64_t offset = 0) { return at(K_[l].get(), offset); }
  void* value(size_t l, int64_t offset = 0) { return at(V_[l].get(), offset); }

 private:
  void* at(float* base, int64_t offset) const {
    return fp16_ ? static_cast<void*>(reinterpret_cast<uint16_t*>(base) + offset) : static_cast<void*>(base + offset);
  }
  void allocate(int64_t rows);

  int64_t layers_, heads_, head_dim_, max_context_;
  bool fp16_;
  int64_t rows_ = 0;
  std::vector<std::unique_ptr<float[]>> K_, V_;
};

}  // namespace chattts
