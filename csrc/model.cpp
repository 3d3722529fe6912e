#include "model.h"

#include "kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace chattts {
namespace {

// The IO names the core binds, per block (python/chattts_ort/format.py spells the same contract).
const std::vector<std::string> kEmbedIn = {"input_ids", "text_mask", "speaker", "position_ids", "key_mask"};
const std::vector<std::string> kEmbedOut = {"hidden", "cos", "sin", "attn_bias"};
const std::vector<std::string> kLayerInPortable = {"hidden", "cos", "sin", "attn_bias", "past_key", "past_value"};
const std::vector<std::string> kLayerOut = {"hidden_out", "present_key", "present_value"};
const std::vector<std::string> kHeadIn = {"hidden"};
const std::vector<std::string> kHeadOut = {"logits", "last_hidden"};
const std::vector<std::string> kSampleIn = {"logits", "temperature", "penalty", "history", "top_p",
                                            "top_k", "eos_id", "block_eos", "noise"};
const std::vector<std::string> kSampleOut = {"next_ids"};

const TensorInfo* find(const std::vector<TensorInfo>& infos, const std::string& name) {
  for (auto& t : infos)
    if (t.name == name) return &t;
  return nullptr;
}

// A static dimension of a graph IO must equal what the config says (symbolic dimensions pass).
void expect_dim(const Session& s, const std::string& block, const TensorInfo* t, size_t axis, int64_t want,
                const char* what) {
  if (!t || axis >= t->shape.size()) return;
  const int64_t got = t->shape[axis];
  if (got >= 0 && got != want)
    throw Error("block " + block + " (" + s.path() + "): '" + t->name + "' has " + what + " " +
                std::to_string(got) + " on axis " + std::to_string(axis) + ", the manifest's config says " +
                std::to_string(want));
}

}  // namespace

std::string layer_block_name(size_t i) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "layer_%02zu", i);
  return buf;
}

KVNames fused_kv_names(size_t j, size_t layers_per_graph) {
  const std::string sfx = layers_per_graph == 1 ? "" : "_" + std::to_string(j);
  return {"past_key" + sfx, "past_value" + sfx, "present_key" + sfx, "present_value" + sfx};
}

void bind_fused_common(Ort::IoBinding& io, const Ort::Value& hidden, const Ort::Value& hidden_out,
                       const Ort::Value& seqlens_k, const Ort::Value& total_len, const Ort::Value& cos_cache,
                       const Ort::Value& sin_cache) {
  io.BindInput("hidden", hidden);
  io.BindInput("seqlens_k", seqlens_k);
  io.BindInput("total_sequence_length", total_len);
  io.BindInput("cos_cache", cos_cache);
  io.BindInput("sin_cache", sin_cache);
  io.BindOutput("hidden_out", hidden_out);
}

void bind_fused_kv(Ort::IoBinding& io, const KVNames& names, const Ort::Value& kv_key, const Ort::Value& kv_value) {
  io.BindInput(names.past_key.c_str(), kv_key);
  io.BindInput(names.past_value.c_str(), kv_value);
  io.BindOutput(names.present_key.c_str(), kv_key);
  io.BindOutput(names.present_value.c_str(), kv_value);
}

void Model::check_block(const Session& s, const std::string& name, const std::vector<std::string>& ins,
                        const std::vector<std::string>& outs) const {
  if (!s.block_tag().empty() && s.block_tag() != name)
    throw Error("graph " + s.path() + " was exported as block " + s.block_tag() + " but the manifest puts it at " +
                name + " (files swapped, duplicated or renamed)");
  auto check = [&](const std::vector<TensorInfo>& have, const std::vector<std::string>& want, const char* side) {
    for (auto& n : want)
      if (!find(have, n))
        throw Error("block " + name + " (" + s.path() + ") has no " + side + " '" + n + "', which the " +
                    spec_.layer_form + " form binds; is it a graph of another layer form or block?");
    for (auto& t : have) {
      bool known = false;
      for (auto& n : want) known |= (n == t.name);
      if (!known)
        throw Error("block " + name + " (" + s.path() + ") has an " + side + " '" + t.name +
                    "' that the " + spec_.layer_form + " form does not bind");
    }
  };
  check(s.inputs(), ins, "input");
  check(s.outputs(), outs, "output");
}

Model::Model(const ModelSpec& spec) : spec_(spec) {
  if (spec_.layers.empty()) throw Error("model spec has no layers");
  if (spec_.layer_form != "portable" && spec_.layer_form != "fused")
    throw Error("unknown layer_form '" + spec_.layer_form + "'");
  if (spec_.kv_fp16 && !fused()) throw Error("an fp16 KV cache needs the fused layer form");
  if (spec_.num_layers == 0 && spec_.layers_per_graph == 1) spec_.num_layers = int64_t(spec_.layers.size());
  if (spec_.layers_per_graph < 1 || spec_.layers_per_graph > spec_.num_layers)
    throw Error("layers_per_graph must be in [1, num_layers]");
  if (spec_.layers_per_graph > 1 && !fused()) throw Error("several layers per graph need the fused layer form");
  {
    const int64_t N = spec_.layers_per_graph, graphs = (spec_.num_layers + N - 1) / N;
    if (int64_t(spec_.layers.size()) != graphs)
      throw Error("model spec lists " + std::to_string(spec_.layers.size()) + " layer graphs; " +
                  std::to_string(spec_.num_layers) + " layers at " + std::to_string(N) + " per graph make " +
                  std::to_string(graphs));
    for (int64_t g = 0; g < graphs; ++g) {
      const int64_t n = std::min(N, spec_.num_layers - g * N);
      kv_names_.emplace_back();
      for (int64_t j = 0; j < n; ++j) kv_names_.back().push_back(fused_kv_names(size_t(j), size_t(N)));
    }
  }
  if (spec_.max_context < 2) throw Error("max_context must be at least 2");
  if (spec_.hidden < 1 || spec_.heads < 1 || spec_.head_dim < 2 || spec_.num_vq < 1 || spec_.vocab_code < 2 ||
      spec_.vocab_text < 2 || spec_.hidden != spec_.heads * spec_.head_dim)
    throw Error("model spec has inconsistent sizes");
  if (!(spec_.rope_theta > 0) || !std::isfinite(spec_.rope_theta)) throw Error("rope_theta must be > 0 and finite");
  kv_bytes_per_row(spec_.max_context);  // throws if the sizes overflow

  auto open = [&](const std::string& path) {
    return std::make_unique<Session>(path, spec_.device, spec_.threads, spec_.session_config);
  };
  embed_ = open(spec_.embed);
  for (auto& p : spec_.layers) layers_.push_back(open(p));
  head_code_ = open(spec_.head_code);
  head_text_ = open(spec_.head_text);
  sample_ = open(spec_.sample);

  const int64_t E = spec_.hidden, H = spec_.heads, D = spec_.head_dim;
  check_block(*embed_, "embed", kEmbedIn, kEmbedOut);
  expect_dim(*embed_, "embed", find(embed_->outputs(), "hidden"), 2, E, "hidden size");
  expect_dim(*embed_, "embed", find(embed_->inputs(), "speaker"), 1, E, "hidden size");
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Session& s = *layers_[i];
    const std::string name = layer_block_name(i);
    if (fused()) {
      std::vector<std::string> ins = {"hidden"}, outs = {"hidden_out"};
      for (auto& k : kv_names_[i]) {
        ins.insert(ins.end(), {k.past_key, k.past_value});
        outs.insert(outs.end(), {k.present_key, k.present_value});
      }
      ins.insert(ins.end(), {"seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"});
      check_block(s, name, ins, outs);
    } else {
      check_block(s, name, kLayerInPortable, kLayerOut);
    }
    expect_dim(s, name, find(s.inputs(), "hidden"), 2, E, "hidden size");
    expect_dim(s, name, find(s.outputs(), "hidden_out"), 2, E, "hidden size");
    for (auto& k : kv_names_[i]) {
      const TensorInfo* pk = find(s.inputs(), fused() ? k.past_key : "past_key");
      expect_dim(s, name, pk, fused() ? 1 : 2, H, "heads");
      expect_dim(s, name, pk, 3, D, "head size");
      if (fused() && pk &&
          pk->type != (spec_.kv_fp16 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT))
        throw Error("block " + name + " (" + s.path() + "): its KV cache is " + dtype_name(pk->type) +
                    ", the manifest says kv_dtype " + (spec_.kv_fp16 ? "fp16" : "fp32"));
    }
  }
  check_block(*head_code_, "head_code", kHeadIn, kHeadOut);
  check_block(*head_text_, "head_text", kHeadIn, kHeadOut);
  const TensorInfo* lc = find(head_code_->outputs(), "logits");
  expect_dim(*head_code_, "head_code", lc, 1, spec_.num_vq, "codebooks");
  expect_dim(*head_code_, "head_code", lc, 2, spec_.vocab_code, "vocabulary");
  expect_dim(*head_text_, "head_text", find(head_text_->outputs(), "logits"), 1, spec_.vocab_text, "vocabulary");
  check_block(*sample_, "sample", kSampleIn, kSampleOut);
  for (const char* name : {"penalty", "top_p", "top_k", "block_eos"}) {
    const TensorInfo* t = find(sample_->inputs(), name);
    const bool per_row = t->shape.size() == 1;
    if (t->shape.size() > 1 || (name != std::string("penalty") && per_row != sample_per_row_))
      throw Error("block sample (" + sample_->path() + "): '" + name + "' must be one value or one per row, "
                  "like the other sampling inputs");
    if (name == std::string("penalty")) sample_per_row_ = per_row;
  }

  if (fused()) {
    // Rotary tables as PyTorch computes them: fp32 inverse frequencies, one fp32 product, then cos/sin.
    const int64_t half = D / 2, M = spec_.max_context;
    cos_.resize(size_t(M * half));
    sin_.resize(size_t(M * half));
    for (int64_t i = 0; i < half; ++i) {
      const float ex = float(2 * i) / float(D);
      const float inv = 1.0f / std::pow(float(spec_.rope_theta), ex);
      for (int64_t p = 0; p < M; ++p) {
        const float f = float(p) * inv;
        cos_[size_t(p * half + i)] = float(std::cos(double(f)));
        sin_[size_t(p * half + i)] = float(std::sin(double(f)));
      }
    }
    if (spec_.kv_fp16) {
      cos16_.resize(cos_.size());
      sin16_.resize(sin_.size());
      for (size_t i = 0; i < cos_.size(); ++i) {
        cos16_[i] = Ort::Float16_t(cos_[i]).val;
        sin16_[i] = Ort::Float16_t(sin_[i]).val;
      }
    }
  }
}

Session& Model::block(const std::string& name) {
  if (name == "embed") return *embed_;
  if (name == "head_code") return *head_code_;
  if (name == "head_text") return *head_text_;
  if (name == "sample") return *sample_;
  for (size_t i = 0; i < layers_.size(); ++i)
    if (name == layer_block_name(i)) return *layers_[i];
  throw Error("no block named " + name);
}

int64_t Model::kv_bytes_per_row(int64_t max_context) const {
  return KVCache::bytes_per_row(spec_.num_layers, spec_.heads, spec_.head_dim, max_context, spec_.kv_fp16);
}

}  // namespace chattts
