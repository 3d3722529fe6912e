#include "kv_cache.h"

#include "util.h"

#include <new>

namespace chattts {

KVCache::KVCache(int64_t layers, int64_t heads, int64_t head_dim, int64_t max_context, bool fp16)
    : layers_(layers), heads_(heads), head_dim_(head_dim), max_context_(max_context), fp16_(fp16),
      K_(size_t(layers)), V_(size_t(layers)) {}

int64_t KVCache::bytes_per_row(int64_t layers, int64_t heads, int64_t head_dim, int64_t max_context, bool fp16) {
  return checked_product({2, layers, heads, head_dim, max_context, fp16 ? 2 : 4}, "the KV cache");
}

void KVCache::allocate(int64_t rows) {
  const int64_t elems = checked_product({rows, max_context_, heads_, head_dim_}, "the KV cache");
  const int64_t floats = fp16_ ? (elems + 1) / 2 : elems;
  const int64_t previous = rows_;
  // The old contents are never needed (a cache is resized only between generations): free them first, so
  // growing never holds both.
  for (auto& k : K_) k.reset();
  for (auto& v : V_) v.reset();
  rows_ = 0;
  for (size_t l = 0; l < K_.size(); ++l) {
    // Zero-filled now, so every page is committed at allocation: no step takes a page fault on a cache
    // position it reaches for the first time (steady step times; "no allocation per step" holds for the
    // kernel's page allocator too).
    K_[l].reset(new (std::nothrow) float[size_t(floats)]());
    V_[l].reset(new (std::nothrow) float[size_t(floats)]());
    if (!K_[l] || !V_[l]) {
      for (auto& k : K_) k.reset();
      for (auto& v : V_) v.reset();
      if (previous > 0 && previous < rows) allocate(previous);  // back to what we had
      const double gb = double(bytes_per_row(layers_, heads_, head_dim_, max_context_, fp16_)) * double(rows) / 1e9;
      throw Error("cannot allocate the KV cache for " + std::to_string(rows) + " rows x " +
                  std::to_string(max_context_) + " positions (" + std::to_string(gb).substr(0, 6) +
                  " GB); use a smaller batch or max_context");
    }
  }
  rows_ = rows;
}

void KVCache::reserve(int64_t rows) {
  if (rows > rows_) allocate(rows);
}

void KVCache::shrink(int64_t rows) {
  if (rows < rows_) allocate(rows);
}

}  // namespace chattts
