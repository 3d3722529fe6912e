// The loaded model: one ONNX Runtime session per block, read-only after load and shared by every generation
// state (the Model / State split of onnxruntime-genai). Loading checks each graph against what the core
// binds: its block tag, its IO names and the static dimensions the config fixes.
#pragma once

#include "session.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace chattts {

struct ModelSpec {
  std::string embed, head_code, head_text, sample;
  std::vector<std::string> layers;
  int64_t hidden = 768, heads = 12, head_dim = 64, num_vq = 4;
  int64_t vocab_code = 626, vocab_text = 21178;
  int64_t max_context = 2048;  // positions per row every state allocates (and the rotary tables cover)
  std::string device = "cpu";
  int threads = 0;
  // "fused": GroupQueryAttention over a [B, H, M, D] buffer (rows right-padded).
  // "portable": standard ops over [M, B, H, D] views (rows left-padded).
  std::string layer_form = "fused";
  std::vector<std::pair<std::string, std::string>> session_config;  // extra ORT session config entries
  double rope_theta = 10000.0;
  bool kv_fp16 = false;  // fused form only: KV buffers and rotary caches in fp16
};

// Block names, as in the manifest (python/chattts_ort/format.py).
std::string layer_block_name(size_t i);

// Binds a fused layer: hidden in and out, and the KV buffer as both past and present (GroupQueryAttention
// appends the new positions in place), with the per-row lengths and the rotary tables.
void bind_fused_layer(Ort::IoBinding& io, const Ort::Value& hidden, const Ort::Value& hidden_out,
                      const Ort::Value& kv_key, const Ort::Value& kv_value, const Ort::Value& seqlens_k,
                      const Ort::Value& total_len, const Ort::Value& cos_cache, const Ort::Value& sin_cache);

class Model {
 public:
  explicit Model(const ModelSpec& spec);
  const ModelSpec& spec() const { return spec_; }
  bool fused() const { return spec_.layer_form == "fused"; }

  Session& embed() { return *embed_; }
  Session& layer(size_t i) { return *layers_[i]; }
  size_t num_layers() const { return layers_.size(); }
  Session& head(bool text) { return text ? *head_text_ : *head_code_; }
  Session& sample() { return *sample_; }
  // A block by manifest name ("embed", "layer_03", "head_code", ...).
  Session& block(const std::string& name);

  // Rotary tables [max_context, D/2] for the fused form (fp32, or fp16 bits when kv_fp16).
  void* cos_cache() { return spec_.kv_fp16 ? static_cast<void*>(cos16_.data()) : cos_.data(); }
  void* sin_cache() { return spec_.kv_fp16 ? static_cast<void*>(sin16_.data()) : sin_.data(); }

  int64_t kv_bytes_per_row(int64_t max_context) const;
  // The sample head takes penalty, top_p, top_k and block_eos per row ([N]); sample heads exported before
  // per-row sampling take one value for all rows ([]).
  bool sample_per_row() const { return sample_per_row_; }

 private:
  void check_block(const Session& s, const std::string& name, const std::vector<std::string>& ins,
                   const std::vector<std::string>& outs) const;

  ModelSpec spec_;
  std::unique_ptr<Session> embed_, head_code_, head_text_, sample_;
  std::vector<std::unique_ptr<Session>> layers_;
  std::vector<float> cos_, sin_;
  std::vector<uint16_t> cos16_, sin16_;
  bool sample_per_row_ = false;
};

}  // namespace chattts
