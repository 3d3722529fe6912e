#include "state.h"

#include "util.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

namespace chattts {
namespace {

using Clock = std::chrono::steady_clock;
inline double ms_since(Clock::time_point& t) {
  auto now = Clock::now();
  double ms = std::chrono::duration<double, std::milli>(now - t).count();
  t = now;
  return ms;
}

}  // namespace

State::State(std::shared_ptr<Model> model, int64_t max_batch)
    : model_(std::move(model)), base_rows_(max_batch),
      kv_(int64_t(model_->num_layers()), model_->spec().heads, model_->spec().head_dim, model_->spec().max_context,
          model_->spec().kv_fp16) {
  if (max_batch < 1) throw Error("max_batch must be at least 1");
  embed_b_ = model_->embed().make_binding();
  head_code_b_ = model_->head(false).make_binding();
  head_text_b_ = model_->head(true).make_binding();
  sample_b_ = model_->sample().make_binding();
  for (size_t g = 0; g < model_->num_graphs(); ++g) layer_b_.push_back(model_->layer_graph(g).make_binding());
  // The KV cache for max_batch rows at the full context is allocated here, once.
  ensure_capacity(max_batch, 1);
}

void State::ensure_capacity(int64_t B, int64_t T) {
  const ModelSpec& m = model_->spec();
  const int64_t E = m.hidden, D = m.head_dim, M = m.max_context;
  kv_.reserve(B);
  const int64_t N = checked_product({B, std::max<int64_t>(m.num_vq, 1)}, "the sampled rows");
  const int64_t Vmax = std::max(m.vocab_code, m.vocab_text);
  const int64_t BT = checked_product({B, T}, "the prompt batch");
  grow(ids_, checked_product({BT, 4}, "the prompt ids"));
  grow(text_mask_, BT);
  grow(pos_, BT);
  grow(key_valid_, checked_product({B, M}, "the key mask"));
  grow(key_mask_, checked_product({B, M}, "the key mask"));
  grow(speaker_, checked_product({B, E}, "the speakers"));
  grow(h0_, checked_product({BT, E}, "the hidden states"));
  grow(h1_, checked_product({BT, E}, "the hidden states"));
  grow(cos_, checked_product({BT, D}, "the rotary tables"));
  grow(sin_, checked_product({BT, D}, "the rotary tables"));
  // The portable form's bias covers [B, 1, S, L]; the fused form binds a [B, 1, S, 1] stub.
  grow(bias_, model_->fused() ? BT : std::max(checked_product({BT, T}, "the attention bias"),
                                               checked_product({B, M}, "the attention bias")));
  grow(logits_, checked_product({B, std::max(m.num_vq * m.vocab_code, m.vocab_text)}, "the logits"));
  grow(last_hidden_, checked_product({B, E}, "the hidden states"));
  grow(temperature_, N);
  grow(penalty_, N);
  grow(top_p_, N);
  grow(top_k_, N);
  grow(block_eos_, N);
  grow(history_, checked_product({N, 16}, "the history"));
  grow(next_ids_, N);
  grow(noise_, checked_product({N, Vmax}, "the noise"));
  grow(gather_, checked_product({B, E}, "the hidden states"));
  grow(seqlens_, B);
}

void State::start(GenerationSpec g) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_) throw Error("this Runtime is closed");
  const ModelSpec& m = model_->spec();
  const int64_t B = int64_t(g.prompt_lens.size()), E = m.hidden, M = m.max_context;
  if (B < 1) throw Error("no prompt rows");
  int64_t T = 0, total = 0;
  for (int64_t n : g.prompt_lens) {
    if (n < 1) throw Error("a prompt row has no tokens");
    if (n >= M)
      throw Error("prompt of " + std::to_string(n) + " tokens does not fit max_context=" + std::to_string(M));
    T = std::max(T, n);
    total += n;
  }
  if (int64_t(g.prompt_ids.size()) != total) throw Error("prompt_ids must hold sum(prompt_lens) ids");
  for (int64_t id : g.prompt_ids)
    if (id < 0 || id >= m.vocab_text) throw Error("token id " + std::to_string(id) + " out of the vocabulary");
  if (!g.speaker.empty() && int64_t(g.speaker.size()) != B * E) throw Error("speaker must be [B, hidden]");
  for (float v : g.speaker)
    if (!std::isfinite(v)) throw Error("speaker has non-finite values");
  const int64_t k = g.text_mode ? 1 : m.num_vq;
  const int64_t N = B * k, V = g.text_mode ? m.vocab_text : m.vocab_code;
  if (int64_t(g.temperature.size()) != k) throw Error("temperature must have one value per codebook");
  for (float t : g.temperature)
    if (!(t > 0) || !std::isfinite(t) || !std::isfinite(1.0f / t)) throw Error("temperature must be > 0 and finite");
  if (!(g.repetition_penalty > 0) || !std::isfinite(g.repetition_penalty)) throw Error("bad repetition_penalty");
  if (!(g.top_p > 0 && g.top_p <= 1)) throw Error("top_p must be in (0, 1]");
  if (g.top_k < 1 || g.max_new_token < 1 || g.min_new_token < 0) throw Error("bad top_k / max_new_token / min_new_token");
  if (g.eos_id < 0 || g.eos_id >= V) throw Error("eos_id out of the vocabulary");
  if (!g.noise.empty() && int64_t(g.noise.size()) != checked_product({g.noise_steps, N, V}, "the noise"))
    throw Error("noise must be [steps, N, V]");
  ensure_capacity(B, T);

  g_ = std::move(g);
  B_ = B; T_ = T; P_ = 0; step_ = 0;
  for (int64_t n = 0; n < N; ++n) temperature_[size_t(n)] = g_.temperature[size_t(n % k)];
  std::fill(history_.begin(), history_.begin() + N * 16, int64_t(-1));
  if (g_.speaker.empty())
    std::fill(speaker_.begin(), speaker_.begin() + B * E, 0.0f);
  else
    std::copy(g_.speaker.begin(), g_.speaker.end(), speaker_.begin());
  std::fill(penalty_.begin(), penalty_.begin() + N, g_.repetition_penalty);
  std::fill(top_p_.begin(), top_p_.begin() + N, g_.top_p);
  std::fill(top_k_.begin(), top_k_.begin() + N, g_.top_k);
  eos_id_ = g_.eos_id;
  last_pos_.assign(size_t(B), 0);
  finished_.assign(size_t(B), 0);
  lens_.assign(g_.prompt_lens.begin(), g_.prompt_lens.end());
  seed_rng(g_.seed, rng_);
  if (g_.greedy) std::fill(noise_.begin(), noise_.begin() + N * V, 1.0f);
  layout_prompts();
  run_opts_.UnsetTerminate();
  decode_bound_ = false;
  active_ = true;
}

// The prefill's inputs: fused rows right-padded (each row's cache starts at position 0), portable rows
// left-padded as ChatTTS batches them (positions = cumsum(mask) - 1, padded slots 1, padded keys masked).
void State::layout_prompts() {
  const int64_t B = B_, T = T_, M = model_->spec().max_context;
  std::fill(ids_.begin(), ids_.begin() + B * T * 4, int64_t(0));
  std::fill(text_mask_.begin(), text_mask_.begin() + B * T, uint8_t(1));
  std::fill(key_valid_.begin(), key_valid_.begin() + B * M, int64_t(0));
  const int64_t* src = g_.prompt_ids.data();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = lens_[size_t(b)], pad = model_->fused() ? 0 : T - n;
    for (int64_t t = 0; t < T; ++t) {
      const bool real = t >= pad && t < pad + n;
      if (real)
        for (int64_t c = 0; c < 4; ++c) ids_[size_t((b * T + t) * 4 + c)] = src[t - pad];
      pos_[size_t(b * T + t)] = model_->fused() ? t : (real ? t - pad : 1);  // padded slots get 1, as ChatTTS
      key_valid_[size_t(b * M + t)] = real ? 1 : 0;
    }
    last_pos_[size_t(b)] = n - 1;
    src += n;
  }
}

void State::check_finite(const float* p, size_t n, const std::string& block) const {
  if (!all_finite(p, n))
    throw Error("non-finite values (NaN or inf) in the output of block " + block + " at step " +
                std::to_string(step_) + (step_ == 0 ? " (prefill)" : "") +
                ": the model's weights or this generation's inputs (speaker, temperature, penalty) are out of range");
}

void State::bind_step(int64_t S, int64_t L) {
  const ModelSpec& m = model_->spec();
  const int64_t B = B_, E = m.hidden, D = m.head_dim;
  const int64_t Le = model_->fused() ? 1 : L;  // the fused form needs neither rotary tables nor the bias
  embed_b_.BindInput("input_ids", view(ids_.data(), {B, S, 4}));
  embed_b_.BindInput("text_mask", view(reinterpret_cast<bool*>(text_mask_.data()), {B, S}));
  embed_b_.BindInput("speaker", view(speaker_.data(), {B, E}));
  embed_b_.BindInput("position_ids", view(pos_.data(), {B, S}));
  embed_b_.BindInput("key_mask", view(key_mask_.data(), {B, Le}));
  embed_b_.BindOutput("hidden", view(h0_.data(), {B, S, E}));
  embed_b_.BindOutput("cos", view(cos_.data(), {B, S, D}));
  embed_b_.BindOutput("sin", view(sin_.data(), {B, S, D}));
  embed_b_.BindOutput("attn_bias", view(bias_.data(), {B, 1, S, Le}));
}

void State::run_layers(int64_t S, int64_t P, bool bind) {
  const ModelSpec& m = model_->spec();
  const int64_t B = B_, E = m.hidden, D = m.head_dim, H = m.heads, M = m.max_context, L = P + S;
  float* cur = h0_.data();
  float* nxt = h1_.data();
  // Rows' real positions in this step's [B, S, E] output: only those must be finite (padded slots of a
  // prefill may hold anything).
  auto check = [&](const float* h, size_t l) {
    if (S == 1) return check_finite(h, size_t(B * E), layer_block_name(l));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = lens_[size_t(b)], first = model_->fused() ? 0 : S - n;
      check_finite(h + (b * S + first) * E, size_t(n * E), layer_block_name(l));
    }
  };
  if (model_->fused()) {
    const auto kv_type = kv_.type();
    if (bind) {
      Ort::Value seqlens = view(seqlens_.data(), ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {B});
      Ort::Value total = view(&total_len_, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {});
      Ort::Value cosc = view(model_->cos_cache(), kv_type, {M, D / 2});
      Ort::Value sinc = view(model_->sin_cache(), kv_type, {M, D / 2});
      float* a = cur;
      float* b = nxt;
      for (size_t g = 0; g < model_->num_graphs(); ++g) {
        bind_fused_common(layer_b_[g], view(a, {B, S, E}), view(b, {B, S, E}), seqlens, total, cosc, sinc);
        for (size_t j = 0, l = model_->first_layer(g); j < model_->graph_layers(g); ++j, ++l)
          bind_fused_kv(layer_b_[g], model_->kv_names(g, j), view(kv_.key(l), kv_type, {B, H, M, D}),
                        view(kv_.value(l), kv_type, {B, H, M, D}));
        std::swap(a, b);
      }
    }
    for (size_t g = 0; g < model_->num_graphs(); ++g) {
      model_->layer_graph(g).run(run_opts_, layer_b_[g]);
      std::swap(cur, nxt);
      check(cur, g);
    }
  } else {
    Ort::Value cos = view(cos_.data(), {B, S, D}), sin = view(sin_.data(), {B, S, D});
    Ort::Value bias = view(bias_.data(), {B, 1, S, L});
    const int64_t slot = P * B * H * D;
    for (size_t l = 0; l < model_->num_layers(); ++l) {
      Ort::IoBinding& io = layer_b_[l];
      io.BindInput("hidden", view(cur, {B, S, E}));
      io.BindInput("cos", cos);
      io.BindInput("sin", sin);
      io.BindInput("attn_bias", bias);
      io.BindInput("past_key", view(static_cast<float*>(kv_.key(l)), {P, B, H, D}));
      io.BindInput("past_value", view(static_cast<float*>(kv_.value(l)), {P, B, H, D}));
      io.BindOutput("hidden_out", view(nxt, {B, S, E}));
      io.BindOutput("present_key", view(static_cast<float*>(kv_.key(l, slot)), {S, B, H, D}));
      io.BindOutput("present_value", view(static_cast<float*>(kv_.value(l, slot)), {S, B, H, D}));
      model_->layer_graph(l).run(run_opts_, io);
      std::swap(cur, nxt);
      check(cur, l);
    }
  }
  out_ = cur;
}

void State::fill_noise(int64_t n_rows, int64_t vocab) { exp_noise(rng_, noise_.data(), n_rows * vocab); }

void State::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  active_ = false;
  g_.noise.clear();
  g_.noise.shrink_to_fit();
  g_.prompt_ids.clear();
}

void State::close() {
  // No lock: a step in flight holds it. The flag and the terminate request are enough; that step fails
  // and every later call raises.
  closed_ = true;
  run_opts_.SetTerminate();
}

void State::terminate() { run_opts_.SetTerminate(); }

void State::release_memory() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (active_) throw Error("cannot release memory while generating");
  kv_.shrink(base_rows_);
}

std::vector<std::pair<std::string, double>> State::take_profile() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::pair<std::string, double>> out = {
      {"steps", double(prof_steps_)}, {"embed", prof_embed_}, {"layers", prof_layers_}, {"head", prof_head_},
      {"noise", prof_noise_}, {"sample", prof_sample_}, {"other", prof_other_}};
  prof_embed_ = prof_layers_ = prof_head_ = prof_noise_ = prof_sample_ = prof_other_ = 0;
  prof_steps_ = 0;
  return out;
}

StepResult State::step() {
  std::lock_guard<std::mutex> lock(mutex_);
  Clock::time_point tp = Clock::now();
  if (closed_) throw Error("this Runtime is closed");
  if (!active_) throw Error("no generation in progress");
  StepResult res;
  const ModelSpec& m = model_->spec();
  const bool text = g_.text_mode, fused = model_->fused();
  const int64_t B = B_, E = m.hidden, M = m.max_context;
  const int64_t k = text ? 1 : m.num_vq;
  const int64_t N = B * k, V = text ? m.vocab_text : m.vocab_code;
  const bool first = (step_ == 0);
  const int64_t S = first ? T_ : 1, P = P_, L = P + S;

  // 1. Inputs of this step (the prefill's were laid out by start()).
  if (!first) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < 4; ++i) ids_[size_t(b * 4 + i)] = next_ids_[size_t(text ? b : b * k + (i % k))];
      text_mask_[size_t(b)] = text ? 1 : 0;
      pos_[size_t(b)] = ++last_pos_[size_t(b)];
      key_valid_[size_t(b * M + P)] = 1;
    }
  }
  if (fused) {
    std::fill(key_mask_.begin(), key_mask_.begin() + B, int64_t(1));
  } else {
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(&key_mask_[size_t(b * L)], &key_valid_[size_t(b * M)], size_t(L) * sizeof(int64_t));
  }
  // Fused decode steps reuse the bindings of the first decode step (same shapes and addresses).
  const bool bind = first || !fused || !decode_bound_;

  // 2. Embedding (+ the portable form's rotary tables and attention bias, shared by every layer).
  if (bind) bind_step(S, L);
  if (profile_) prof_other_ += ms_since(tp);
  model_->embed().run(run_opts_, embed_b_);
  check_finite(h0_.data(), size_t(B * S * E), "embed");
  if (profile_) prof_embed_ += ms_since(tp);

  // 3. The layer chain; each layer's new K/V land in their place in the cache.
  if (fused) {
    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t total = first ? lens_[size_t(b)] : lens_[size_t(b)] + 1;
      seqlens_[size_t(b)] = int32_t(total - 1);
      longest = std::max(longest, total);
    }
    total_len_ = int32_t(first ? S : longest);
  }
  run_layers(S, P, bind);
  float* cur = out_;
  int64_t S_head = S;
  if (fused) {
    if (first) {
      // Rows are right-padded: each row's last real position feeds the head.
      for (int64_t b = 0; b < B; ++b)
        std::memcpy(&gather_[size_t(b * E)], cur + (b * S + lens_[size_t(b)] - 1) * E, size_t(E) * sizeof(float));
      cur = gather_.data();
      S_head = 1;
    } else {
      for (int64_t b = 0; b < B; ++b) lens_[size_t(b)] += 1;
    }
  }
  if (profile_) prof_layers_ += ms_since(tp);

  // 4. Head: logits of the last position and the final hidden state.
  Session& head = model_->head(text);
  Ort::IoBinding& head_b = text ? head_text_b_ : head_code_b_;
  if (bind) {
    head_b.BindInput("hidden", view(cur, {B, S_head, E}));
    if (text)
      head_b.BindOutput("logits", view(logits_.data(), {B, V}));
    else
      head_b.BindOutput("logits", view(logits_.data(), {B, k, V}));
    head_b.BindOutput("last_hidden", view(last_hidden_.data(), {B, E}));
  }
  head.run(run_opts_, head_b);
  const char* head_name = text ? "head_text" : "head_code";
  check_finite(last_hidden_.data(), size_t(B * E), head_name);
  check_finite(logits_.data(), size_t(N * V), head_name);
  if (profile_) prof_head_ += ms_since(tp);

  // 5. Sample head: temperature, repetition penalty, top-p, top-k, EOS gate, draw.
  float* noise = noise_.data();
  if (!g_.noise.empty()) {
    if (step_ >= g_.noise_steps)
      throw Error("the supplied noise covers only " + std::to_string(g_.noise_steps) + " steps");
    noise = g_.noise.data() + step_ * N * V;
  } else if (!g_.greedy) {
    fill_noise(N, V);
  }
  if (profile_) prof_noise_ += ms_since(tp);
  std::fill(block_eos_.begin(), block_eos_.begin() + N, uint8_t(step_ < g_.min_new_token));
  if (bind) {
    // Per-row sampling inputs are [N]; a sample head of the older form takes row 0's value for all rows.
    const std::vector<int64_t> rows = model_->sample_per_row() ? std::vector<int64_t>{N} : std::vector<int64_t>{};
    sample_b_.BindInput("logits", view(logits_.data(), {N, V}));
    sample_b_.BindInput("temperature", view(temperature_.data(), {N}));
    sample_b_.BindInput("penalty", view(penalty_.data(), rows));
    sample_b_.BindInput("history", view(history_.data(), {N, 16}));
    sample_b_.BindInput("top_p", view(top_p_.data(), rows));
    sample_b_.BindInput("top_k", view(top_k_.data(), rows));
    sample_b_.BindInput("eos_id", view(&eos_id_, {}));
    sample_b_.BindInput("block_eos", view(reinterpret_cast<bool*>(block_eos_.data()), rows));
    sample_b_.BindOutput("next_ids", view(next_ids_.data(), {N}));
  }
  if (bind || !g_.noise.empty()) sample_b_.BindInput("noise", view(noise, {N, V}));  // supplied noise moves
  model_->sample().run(run_opts_, sample_b_);
  for (int64_t n = 0; n < N; ++n)
    if (next_ids_[size_t(n)] < 0 || next_ids_[size_t(n)] >= V)
      throw Error("block sample drew id " + std::to_string(next_ids_[size_t(n)]) + " outside the vocabulary");
  if (profile_) prof_sample_ += ms_since(tp);

  // 6. Stop logic: a row ends when any of its codes is EOS (that frame is dropped).
  res.step = step_;
  res.k = k;
  for (int64_t b = 0; b < B; ++b) {
    if (finished_[size_t(b)]) continue;
    bool eos = false;
    for (int64_t i = 0; i < k; ++i) eos |= (next_ids_[size_t(b * k + i)] == eos_id_);
    if (eos) {
      finished_[size_t(b)] = 1;
      res.ended_rows.push_back(int32_t(b));
      continue;
    }
    res.rows.push_back(int32_t(b));
    for (int64_t i = 0; i < k; ++i) res.ids.push_back(next_ids_[size_t(b * k + i)]);
    if (g_.return_hidden)
      res.hidden.insert(res.hidden.end(), &last_hidden_[size_t(b * E)], &last_hidden_[size_t((b + 1) * E)]);
  }
  for (int64_t n = 0; n < N; ++n) history_[size_t(n * 16 + (step_ % 16))] = next_ids_[size_t(n)];
  P_ = L;
  if (fused && !first) decode_bound_ = true;
  ++step_;
  if (profile_) {
    prof_other_ += ms_since(tp);
    ++prof_steps_;
  }

  bool all_done = std::all_of(finished_.begin(), finished_.end(), [](uint8_t f) { return f != 0; });
  if (all_done) res.stop_reason = "eos";
  else if (step_ >= g_.max_new_token) res.stop_reason = "max_new_token";
  else if (fused ? (*std::max_element(lens_.begin(), lens_.end()) + 1 > M) : (P_ + 1 > M))
    res.stop_reason = "context_full";
  if (!res.stop_reason.empty()) {
    res.done = true;
    active_ = false;
  }
  return res;
}

}  // namespace chattts
