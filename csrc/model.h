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
  std::vector<std::string> layers;  // the layer graphs, in chain order
  // Decoder layers in all (0: one per layer graph) and per layer graph (the fused form may hold several
  // consecutive layers in one graph: graph g holds layers g*N .. min(L, (g+1)*N) - 1).
  int64_t num_layers = 0;
  int64_t layers_per_graph = 1;
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

// The KV IO names of the j-th layer of a fused layer graph: past_key, past_value, present_key, present_value,
// suffixed _j in an export of several layers per graph (format.fused_kv_names).
struct KVNames {
  std::string past_key, past_value, present_key, present_value;
};
KVNames fused_kv_names(size_t j, size_t layers_per_graph);

// Binds what a fused layer graph shares across its layers: hidden in and out, the per-row lengths and the
// rotary tables. Each of its layers' KV buffers is bound with bind_fused_kv.
void bind_fused_common(Ort::IoBinding& io, const Ort::Value& hidden, const Ort::Value& hidden_out,
                       const Ort::Value& seqlens_k, const Ort::Value& total_len, const Ort::Value& cos_cache,
                       const Ort::Value& sin_cache);
// Binds one layer's KV buffer as both past and present (GroupQueryAttention appends the new positions in place).
void bind_fused_kv(Ort::IoBinding& io, const KVNames& names, const Ort::Value& kv_key, const Ort::Value& kv_value);

class Model {
 public:
  explicit Model(const ModelSpec& spec);
  const ModelSpec& spec() const { return spec_; }
  bool fused() const { return spec_.layer_form == "fused"; }

  Session& embed() { return *embed_; }
  // Layer graphs: graph g holds the decoder layers first_layer(g) .. first_layer(g) + graph_layers(g) - 1.
  Session& layer_graph(size_t g) { return *layers_[g]; }
  size_t num_graphs() const { return layers_.size(); }
  size_t first_layer(size_t g) const { return g * size_t(spec_.layers_per_graph); }
  size_t graph_layers(size_t g) const { return kv_names_[g].size(); }
  const KVNames& kv_names(size_t g, size_t j) const { return kv_names_[g][j]; }
  size_t num_layers() const { return size_t(spec_.num_layers); }  // decoder layers (KV cache entries)
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
  std::vector<std::vector<KVNames>> kv_names_;  // per layer graph, per layer in it
  std::vector<float> cos_, sin_;
  std::vector<uint16_t> cos16_, sin16_;
  bool sample_per_row_ = false;
};

}  // namespace chattts
