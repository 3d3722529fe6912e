#include "engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

namespace chattts {
namespace {

template <typename T>
void grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// xoshiro256**: small, fast, and the same stream on every platform for a given seed.
inline uint64_t next_u64(uint64_t* s) {
  uint64_t result = rotl(s[1] * 5, 7) * 9;
  uint64_t t = s[1] << 17;
  s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
  s[2] ^= t; s[3] = rotl(s[3], 45);
  return result;
}

}  // namespace

Engine::Engine(const EngineSpec& spec) : spec_(spec) {
  if (spec_.layers.empty()) throw Error("engine spec has no layers");
  if (spec_.max_context < 2) throw Error("max_context must be at least 2");
  if (spec_.max_batch < 1) throw Error("max_batch must be at least 1");
  auto open = [&](const std::string& path) {
    return std::make_unique<Session>(path, spec_.device, spec_.threads, spec_.session_config);
  };
  embed_ = open(spec_.embed);
  for (auto& p : spec_.layers) layers_.push_back(open(p));
  head_code_ = open(spec_.head_code);
  head_text_ = open(spec_.head_text);
  sample_ = open(spec_.sample);
  if (spec_.layer_form != "portable" && spec_.layer_form != "fused")
    throw Error("unknown layer_form '" + spec_.layer_form + "'");
  fused_ = spec_.layer_form == "fused";
  if (spec_.kv_fp16 && !fused_) throw Error("an fp16 KV cache needs the fused layer form");
  if (fused_) {
    // Rotary tables as PyTorch computes them: fp32 inverse frequencies, one fp32 product, then cos/sin.
    const int64_t half = spec_.head_dim / 2;
    cos_cache_.resize(size_t(spec_.max_context * half));
    sin_cache_.resize(size_t(spec_.max_context * half));
    for (int64_t i = 0; i < half; ++i) {
      const float ex = float(2 * i) / float(spec_.head_dim);
      const float inv = 1.0f / std::pow(float(spec_.rope_theta), ex);
      for (int64_t p = 0; p < spec_.max_context; ++p) {
        const float f = float(p) * inv;
        cos_cache_[p * half + i] = float(std::cos(double(f)));
        sin_cache_[p * half + i] = float(std::sin(double(f)));
      }
    }
    if (spec_.kv_fp16) {
      cos16_.resize(cos_cache_.size());
      sin16_.resize(sin_cache_.size());
      for (size_t i = 0; i < cos_cache_.size(); ++i) {
        cos16_[i] = Ort::Float16_t(cos_cache_[i]).val;
        sin16_[i] = Ort::Float16_t(sin_cache_[i]).val;
      }
    }
  }
  K_.resize(layers_.size());
  V_.resize(layers_.size());
  // The KV cache for max_batch rows at max_context is allocated here, once.
  ensure_capacity(spec_.max_batch, 1);
}

const Session& Engine::session(const std::string& which, int layer) const {
  if (which == "embed") return *embed_;
  if (which == "head_code") return *head_code_;
  if (which == "head_text") return *head_text_;
  if (which == "sample") return *sample_;
  if (which == "layer") {
    if (layer < 0 || size_t(layer) >= layers_.size()) throw Error("no layer " + std::to_string(layer));
    return *layers_[layer];
  }
  throw Error("no block named " + which);
}

void Engine::ensure_capacity(int64_t B, int64_t T) {
  const int64_t E = spec_.hidden, D = spec_.head_dim, HD = int64_t(spec_.heads) * D;
  S_max_ = spec_.max_context;
  const int64_t kv = S_max_ * B * HD;
  if (kv > kv_capacity_) {
    // fp16 elements are stored two to a float slot (the fused form never does float arithmetic on them).
    const size_t floats = spec_.kv_fp16 ? size_t((kv + 1) / 2) : size_t(kv);
    for (size_t l = 0; l < layers_.size(); ++l) {
      K_[l].assign(floats, 0.0f);
      V_[l].assign(floats, 0.0f);
    }
    kv_capacity_ = kv;
  }
  const int64_t N = B * std::max<int64_t>(spec_.num_vq, 1);
  const int64_t Vmax = std::max<int64_t>(spec_.vocab_code, spec_.vocab_text);
  grow(ids_, size_t(B * T * 4));
  grow(text_mask_, size_t(B * T));
  grow(pos_, size_t(B * T));
  grow(key_valid_, size_t(B * S_max_));
  grow(key_mask_, size_t(B * S_max_));
  grow(speaker_, size_t(B * E));
  grow(h0_, size_t(B * T * E));
  grow(h1_, size_t(B * T * E));
  grow(cos_, size_t(B * T * D));
  grow(sin_, size_t(B * T * D));
  grow(bias_, size_t(std::max(B * T * T, B * S_max_)));
  grow(logits_, size_t(B * std::max<int64_t>(int64_t(spec_.num_vq) * spec_.vocab_code, spec_.vocab_text)));
  grow(last_hidden_, size_t(B * E));
  grow(temperature_, size_t(N));
  grow(history_, size_t(N * 16));
  grow(next_ids_, size_t(N));
  grow(noise_, size_t(N * Vmax));
  grow(gather_, size_t(B * E));
  grow(seqlens_, size_t(B));
}

void Engine::start(GenerationSpec g) {
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t B = g.batch, T = g.prompt_len, E = spec_.hidden;
  if (B < 1 || T < 1) throw Error("empty batch or prompt");
  if (int64_t(g.input_ids.size()) != B * T * 4) throw Error("input_ids must be [B, T, 4]");
  if (int64_t(g.attention_mask.size()) != B * T) throw Error("attention_mask must be [B, T]");
  if (int64_t(g.speaker.size()) != B * E) throw Error("speaker must be [B, hidden]");
  if (T >= spec_.max_context)
    throw Error("prompt of " + std::to_string(T) + " tokens does not fit max_context=" +
                std::to_string(spec_.max_context));
  const int64_t k = g.text_mode ? 1 : spec_.num_vq;
  const int64_t N = B * k, V = g.text_mode ? spec_.vocab_text : spec_.vocab_code;
  if (int64_t(g.temperature.size()) != k) throw Error("temperature must have one value per codebook");
  if (!g.noise.empty() && int64_t(g.noise.size()) != g.noise_steps * N * V)
    throw Error("noise must be [steps, N, V]");
  ensure_capacity(B, T);

  g_ = std::move(g);
  B_ = B; T_ = T; P_ = 0; step_ = 0;
  for (int64_t n = 0; n < N; ++n) temperature_[n] = g_.temperature[n % k];
  std::fill(history_.begin(), history_.begin() + N * 16, int64_t(-1));
  std::copy(g_.speaker.begin(), g_.speaker.end(), speaker_.begin());
  penalty_ = g_.repetition_penalty; top_p_ = g_.top_p; top_k_ = g_.top_k; eos_id_ = g_.eos_id;
  last_pos_.assign(size_t(B), 0);
  finished_.assign(size_t(B), 0);
  std::fill(key_valid_.begin(), key_valid_.begin() + B * S_max_, int64_t(0));
  uint64_t seed = g_.seed;
  for (auto& s : rng_) s = splitmix64(seed);
  if (g_.greedy) std::fill(noise_.begin(), noise_.begin() + N * V, 1.0f);
  if (fused_) {
    // Right-pad the left-padded prompts: in this form each row's cache starts at position 0.
    lens_.assign(size_t(B), 0);
    std::vector<int64_t> ids(size_t(B * T * 4), 0);
    for (int64_t b = 0; b < B; ++b) {
      int64_t n = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (!g_.attention_mask[b * T + t]) continue;
        for (int64_t c = 0; c < 4; ++c) ids[(b * T + n) * 4 + c] = g_.input_ids[(b * T + t) * 4 + c];
        ++n;
      }
      if (n == 0) throw Error("a prompt row has no tokens");
      lens_[b] = n;
    }
    g_.input_ids.swap(ids);
  }
  run_opts_.UnsetTerminate();
  decode_bound_ = false;
  active_ = true;
}

void Engine::run_layers_portable(int64_t S, int64_t P, float*& cur, float*& nxt) {
  const int64_t B = B_, E = spec_.hidden, D = spec_.head_dim, H = spec_.heads, L = P + S;
  Ort::Value cos = view(cos_.data(), {B, S, D}), sin = view(sin_.data(), {B, S, D});
  Ort::Value bias = view(bias_.data(), {B, 1, S, L});
  const int64_t slot = P * B * H * D;
  for (size_t l = 0; l < layers_.size(); ++l) {
    Session& s = *layers_[l];
    s.bind_input("hidden", view(cur, {B, S, E}));
    s.bind_input("cos", cos);
    s.bind_input("sin", sin);
    s.bind_input("attn_bias", bias);
    s.bind_input("past_key", view(K_[l].data(), {P, B, H, D}));
    s.bind_input("past_value", view(V_[l].data(), {P, B, H, D}));
    s.bind_output("hidden_out", view(nxt, {B, S, E}));
    s.bind_output("present_key", view(K_[l].data() + slot, {S, B, H, D}));
    s.bind_output("present_value", view(V_[l].data() + slot, {S, B, H, D}));
    s.run(run_opts_);
    std::swap(cur, nxt);
  }
}

void Engine::run_layers_fused(int64_t S, float*& cur, float*& nxt, bool bind) {
  if (!bind) {
    // Decode with the bindings of the previous step: same shapes, same addresses, new values in place.
    for (size_t l = 0; l < layers_.size(); ++l) {
      layers_[l]->run(run_opts_);
      std::swap(cur, nxt);
    }
    return;
  }
  const int64_t B = B_, E = spec_.hidden, D = spec_.head_dim, H = spec_.heads, M = S_max_;
  Ort::Value seqlens = view(seqlens_.data(), ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {B});
  Ort::Value total = view(&total_len_, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {});
  const auto kv_type = spec_.kv_fp16 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  Ort::Value cosc = spec_.kv_fp16 ? view(cos16_.data(), kv_type, {M, D / 2}) : view(cos_cache_.data(), {M, D / 2});
  Ort::Value sinc = spec_.kv_fp16 ? view(sin16_.data(), kv_type, {M, D / 2}) : view(sin_cache_.data(), {M, D / 2});
  for (size_t l = 0; l < layers_.size(); ++l) {
    Session& s = *layers_[l];
    // Past and present are the same buffer: GroupQueryAttention appends in place.
    Ort::Value k = view(K_[l].data(), kv_type, {B, H, M, D}), v = view(V_[l].data(), kv_type, {B, H, M, D});
    s.bind_input("hidden", view(cur, {B, S, E}));
    s.bind_input("past_key", k);
    s.bind_input("past_value", v);
    s.bind_input("seqlens_k", seqlens);
    s.bind_input("total_sequence_length", total);
    s.bind_input("cos_cache", cosc);
    s.bind_input("sin_cache", sinc);
    s.bind_output("hidden_out", view(nxt, {B, S, E}));
    s.bind_output("present_key", k);
    s.bind_output("present_value", v);
    s.run(run_opts_);
    std::swap(cur, nxt);
  }
}

void Engine::fill_noise(int64_t n_rows, int64_t vocab) {
  // Exp(1) noise: -log(u), u uniform in (0, 1]; floored so p / q never divides by zero.
  const int64_t n = n_rows * vocab;
  for (int64_t i = 0; i < n; ++i) {
    double u = double((next_u64(rng_) >> 11) + 1) * (1.0 / 9007199254740992.0);
    noise_[i] = std::max(float(-std::log(u)), 1e-30f);
  }
}

void Engine::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  active_ = false;
  g_.noise.clear();
  g_.noise.shrink_to_fit();
}

void Engine::terminate() { run_opts_.SetTerminate(); }

namespace {
using Clock = std::chrono::steady_clock;
inline double ms_since(Clock::time_point& t) {
  auto now = Clock::now();
  double ms = std::chrono::duration<double, std::milli>(now - t).count();
  t = now;
  return ms;
}
}  // namespace

std::vector<std::pair<std::string, double>> Engine::take_profile() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::pair<std::string, double>> out = {
      {"steps", double(prof_steps_)}, {"embed", prof_embed_}, {"layers", prof_layers_}, {"head", prof_head_},
      {"noise", prof_noise_}, {"sample", prof_sample_}, {"other", prof_other_}};
  prof_embed_ = prof_layers_ = prof_head_ = prof_noise_ = prof_sample_ = prof_other_ = 0;
  prof_steps_ = 0;
  return out;
}

StepResult Engine::step(bool return_hidden) {
  std::lock_guard<std::mutex> lock(mutex_);
  Clock::time_point tp = Clock::now();
  if (!active_) throw Error("no generation in progress");
  StepResult res;
  const bool text = g_.text_mode;
  const int64_t B = B_, E = spec_.hidden, D = spec_.head_dim, H = spec_.heads;
  const int64_t k = text ? 1 : spec_.num_vq;
  const int64_t N = B * k, V = text ? spec_.vocab_text : spec_.vocab_code;
  const bool first = (step_ == 0);
  const int64_t S = first ? T_ : 1, P = P_, L = P + S;

  // 1. Inputs of this step.
  if (first) {
    std::copy(g_.input_ids.begin(), g_.input_ids.end(), ids_.begin());
    std::fill(text_mask_.begin(), text_mask_.begin() + B * S, uint8_t(1));
    for (int64_t b = 0; b < B; ++b) {
      int64_t c = 0;
      for (int64_t t = 0; t < S; ++t) {
        const int64_t m = g_.attention_mask[b * S + t];
        c += m;
        pos_[b * S + t] = m ? c - 1 : 1;  // padded slots get 1, as transformers/ChatTTS do
        key_valid_[b * S_max_ + t] = m;
      }
      last_pos_[b] = pos_[b * S + S - 1];
    }
  } else {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < 4; ++i) ids_[b * 4 + i] = next_ids_[text ? b : b * k + (i % k)];
      text_mask_[b] = text ? 1 : 0;
      pos_[b] = ++last_pos_[b];
      key_valid_[b * S_max_ + P] = 1;
    }
  }
  // The fused form needs neither the rotary tables nor the bias of the embedding graph: bind them small.
  const int64_t Le = fused_ ? S : L;
  if (fused_) {
    std::fill(key_mask_.begin(), key_mask_.begin() + B * S, int64_t(1));
  } else {
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(&key_mask_[b * L], &key_valid_[b * S_max_], size_t(L) * sizeof(int64_t));
  }

  // In the fused form every decode step has the same shapes and buffer addresses, so the bindings made
  // at the first decode step serve all later ones: a step then only writes values and runs the graphs.
  const bool bind = first || !fused_ || !decode_bound_;

  // 2. Embedding (+ rotary tables and the attention bias shared by every portable layer).
  if (bind) {
    embed_->bind_input("input_ids", view(ids_.data(), {B, S, 4}));
    embed_->bind_input("text_mask", view(reinterpret_cast<bool*>(text_mask_.data()), {B, S}));
    embed_->bind_input("speaker", view(speaker_.data(), {B, E}));
    embed_->bind_input("position_ids", view(pos_.data(), {B, S}));
    embed_->bind_input("key_mask", view(key_mask_.data(), {B, Le}));
    embed_->bind_output("hidden", view(h0_.data(), {B, S, E}));
    embed_->bind_output("cos", view(cos_.data(), {B, S, D}));
    embed_->bind_output("sin", view(sin_.data(), {B, S, D}));
    embed_->bind_output("attn_bias", view(bias_.data(), {B, 1, S, Le}));
  }
  if (profile_) prof_other_ += ms_since(tp);
  embed_->run(run_opts_);
  if (profile_) prof_embed_ += ms_since(tp);

  // 3. The layer chain; each present K/V lands in its place in the cache.
  float* cur = h0_.data();
  float* nxt = h1_.data();
  int64_t S_head = S;
  if (fused_) {
    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t total = first ? lens_[b] : lens_[b] + 1;
      seqlens_[b] = int32_t(total - 1);
      longest = std::max(longest, total);
    }
    total_len_ = int32_t(first ? S : longest);
    run_layers_fused(S, cur, nxt, bind);
    if (first) {
      // Rows are right-padded: each row's last real position feeds the head.
      for (int64_t b = 0; b < B; ++b)
        std::memcpy(&gather_[b * E], cur + (b * S + lens_[b] - 1) * E, size_t(E) * sizeof(float));
      cur = gather_.data();
      S_head = 1;
    } else {
      for (int64_t b = 0; b < B; ++b) lens_[b] += 1;
    }
  } else {
    run_layers_portable(S, P, cur, nxt);
  }

  if (profile_) prof_layers_ += ms_since(tp);
  // 4. Head: logits of the last position and the final hidden state.
  Session& head = text ? *head_text_ : *head_code_;
  if (bind) {
    head.bind_input("hidden", view(cur, {B, S_head, E}));
    if (text)
      head.bind_output("logits", view(logits_.data(), {B, V}));
    else
      head.bind_output("logits", view(logits_.data(), {B, k, V}));
    head.bind_output("last_hidden", view(last_hidden_.data(), {B, E}));
  }
  head.run(run_opts_);
  if (profile_) prof_head_ += ms_since(tp);

  // 5. Sample head: temperature, repetition penalty, top-p, top-k, EOS gate, draw.
  float* noise = noise_.data();
  if (!g_.noise.empty()) {
    if (step_ >= g_.noise_steps) throw Error("the supplied noise covers only " + std::to_string(g_.noise_steps) + " steps");
    noise = g_.noise.data() + step_ * N * V;
  } else if (!g_.greedy) {
    fill_noise(N, V);
  }
  if (profile_) prof_noise_ += ms_since(tp);
  block_eos_ = step_ < g_.min_new_token;
  if (bind) {
    sample_->bind_input("logits", view(logits_.data(), {N, V}));
    sample_->bind_input("temperature", view(temperature_.data(), {N}));
    sample_->bind_input("penalty", view(&penalty_, {}));
    sample_->bind_input("history", view(history_.data(), {N, 16}));
    sample_->bind_input("top_p", view(&top_p_, {}));
    sample_->bind_input("top_k", view(&top_k_, {}));
    sample_->bind_input("eos_id", view(&eos_id_, {}));
    sample_->bind_input("block_eos", view(&block_eos_, {}));
    sample_->bind_output("next_ids", view(next_ids_.data(), {N}));
  }
  if (bind || !g_.noise.empty()) sample_->bind_input("noise", view(noise, {N, V}));  // supplied noise moves
  sample_->run(run_opts_);
  if (profile_) prof_sample_ += ms_since(tp);

  // 6. Stop logic: a row ends when any of its codes is EOS (that frame is dropped).
  res.step = step_;
  for (int64_t b = 0; b < B; ++b) {
    if (finished_[b]) continue;
    bool eos = false;
    for (int64_t i = 0; i < k; ++i) eos |= (next_ids_[b * k + i] == eos_id_);
    if (eos) {
      finished_[b] = 1;
      res.ended_rows.push_back(int32_t(b));
      continue;
    }
    res.rows.push_back(int32_t(b));
    for (int64_t i = 0; i < k; ++i) res.ids.push_back(next_ids_[b * k + i]);
    if (return_hidden) res.hidden.insert(res.hidden.end(), &last_hidden_[b * E], &last_hidden_[(b + 1) * E]);
  }
  for (int64_t n = 0; n < N; ++n) history_[n * 16 + (step_ % 16)] = next_ids_[n];
  P_ = L;
  if (fused_ && !first) decode_bound_ = true;
  ++step_;
  if (profile_) {
    prof_other_ += ms_since(tp);
    ++prof_steps_;
  }

  bool all_done = std::all_of(finished_.begin(), finished_.end(), [](uint8_t f) { return f != 0; });
  if (all_done) res.stop_reason = "eos";
  else if (step_ >= g_.max_new_token) res.stop_reason = "max_new_token";
  else if (fused_ ? (*std::max_element(lens_.begin(), lens_.end()) + 1 > S_max_) : (P_ + 1 > S_max_))
    res.stop_reason = "context_full";
  if (!res.stop_reason.empty()) {
    res.done = true;
    active_ = false;
  }
  return res;
}

}  // namespace chattts
