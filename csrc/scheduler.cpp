#include "scheduler.h"

#include "util.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace chattts {

using Clock = std::chrono::steady_clock;

Scheduler::Scheduler(std::shared_ptr<Model> model, int64_t max_streams, int64_t queue_frames, bool batch_invariant)
    : model_(std::move(model)), max_streams_(max_streams), queue_frames_(queue_frames),
      min_rows_(batch_invariant ? std::min<int64_t>(2, max_streams) : 1),
      kv_(int64_t(model_->num_layers()), model_->spec().heads, model_->spec().head_dim, model_->spec().max_context,
          model_->spec().kv_fp16) {
  if (!model_->fused()) throw Error("several streams need the fused layer form (export --layer-form fused)");
  if (!model_->sample_per_row())
    throw Error("several streams need the per-row sample head: this export's sample head takes one set of "
                "sampling values for all rows (exported by an older chattts-ort); export it again");
  if (max_streams < 1 || max_streams > 4096) throw Error("max_streams must be in [1, 4096]");
  if (queue_frames < 1) throw Error("queue_frames must be at least 1");
  const ModelSpec& m = model_->spec();
  kv_.reserve(max_streams);
  rows_.resize(size_t(max_streams));
  for (auto& r : rows_) {
    r.last.assign(size_t(m.num_vq), 0);
    r.history.assign(size_t(m.num_vq * 16), -1);
  }
  const int64_t R = max_streams, E = m.hidden, N = checked_product({R, m.num_vq}, "the sampled rows");
  grow(ids_, R * 4);
  grow(pos_, R);
  grow(key_mask_, R);
  grow(text_mask_, R);
  grow(speaker_, checked_product({R, E}, "the speakers"));
  grow(h0_, R * E);
  grow(h1_, R * E);
  grow(rope_, checked_product({R, m.head_dim}, "the rotary tables"));
  grow(bias_, R);
  grow(logits_, checked_product({N, m.vocab_code}, "the logits"));
  grow(last_hidden_, R * E);
  grow(temperature_, N);
  grow(penalty_, N);
  grow(top_p_, N);
  grow(top_k_, N);
  grow(block_eos_, N);
  grow(history_, N * 16);
  grow(next_ids_, N);
  grow(noise_, checked_product({N, m.vocab_code}, "the noise"));
  grow(seqlens_, R);
  eos_id_ = m.vocab_code - 1;
  p_embed_ = model_->embed().make_binding();
  p_head_ = model_->head(false).make_binding();
  p_sample_ = model_->sample().make_binding();
  d_embed_ = model_->embed().make_binding();
  d_head_ = model_->head(false).make_binding();
  d_sample_ = model_->sample().make_binding();
  for (size_t g = 0; g < model_->num_graphs(); ++g) {
    p_layers_.push_back(model_->layer_graph(g).make_binding());
    d_layers_.push_back(model_->layer_graph(g).make_binding());
  }
  worker_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() { close(); }

int64_t Scheduler::submit(StreamSpec spec) {
  const ModelSpec& m = model_->spec();
  const int64_t T = int64_t(spec.prompt_ids.size()), V = m.vocab_code;
  if (T < 1) throw Error("a prompt has no tokens");
  if (T >= m.max_context)
    throw Error("prompt of " + std::to_string(T) + " tokens does not fit max_context=" + std::to_string(m.max_context));
  for (int64_t id : spec.prompt_ids)
    if (id < 0 || id >= m.vocab_text) throw Error("token id " + std::to_string(id) + " out of the vocabulary");
  if (!spec.speaker.empty() && int64_t(spec.speaker.size()) != m.hidden) throw Error("speaker must be [hidden]");
  for (float v : spec.speaker)
    if (!std::isfinite(v)) throw Error("speaker has non-finite values");
  if (int64_t(spec.temperature.size()) != m.num_vq) throw Error("temperature must have one value per codebook");
  for (float t : spec.temperature)
    if (!(t > 0) || !std::isfinite(t) || !std::isfinite(1.0f / t)) throw Error("temperature must be > 0 and finite");
  if (!(spec.repetition_penalty > 0) || !std::isfinite(spec.repetition_penalty)) throw Error("bad repetition_penalty");
  if (!(spec.top_p > 0 && spec.top_p <= 1)) throw Error("top_p must be in (0, 1]");
  if (spec.top_k < 1 || spec.max_new_token < 1 || spec.min_new_token < 0)
    throw Error("bad top_k / max_new_token / min_new_token");
  if (!spec.noise.empty() && int64_t(spec.noise.size()) != checked_product({spec.noise_steps, m.num_vq, V}, "the noise"))
    throw Error("noise must be [steps, num_vq, V]");
  std::lock_guard<std::mutex> lock(mu_);
  if (stop_) throw Error("this Runtime is closed");
  const int64_t id = next_id_++;
  Stream& s = streams_[id];
  if (spec.queue_timeout_s >= 0) {
    s.has_deadline = true;
    s.deadline = Clock::now() + std::chrono::microseconds(int64_t(spec.queue_timeout_s * 1e6));
  }
  s.spec = std::move(spec);
  pending_.push_back(id);
  work_cv_.notify_one();
  return id;
}

Pulled Scheduler::pull(int64_t id, int64_t max_wait_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  Pulled out;
  auto it = streams_.find(id);
  if (it == streams_.end()) {
    out.done = true;
    out.error = stop_ ? "this Runtime is closed" : "no such stream (it ended or was cancelled)";
    return out;
  }
  frame_cv_.wait_for(lock, std::chrono::milliseconds(std::max<int64_t>(max_wait_ms, 0)), [&] {
    return !it->second.queue.empty() || it->second.done;
  });
  Stream& s = it->second;
  const bool was_full = int64_t(s.queue.size()) >= queue_frames_;
  out.frames.assign(std::make_move_iterator(s.queue.begin()), std::make_move_iterator(s.queue.end()));
  s.queue.clear();
  if (s.done) {
    out.done = true;
    out.stop_reason = s.reason;
    out.error = s.error;
    if (s.row < 0) streams_.erase(it);  // its row is already free: nothing refers to it any more
  }
  if (was_full) work_cv_.notify_one();  // a paused row can run again
  return out;
}

void Scheduler::cancel(int64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = streams_.find(id);
  if (it == streams_.end()) return;
  Stream& s = it->second;
  if (s.row < 0) {  // waiting, or already off its row
    pending_.erase(std::remove(pending_.begin(), pending_.end(), id), pending_.end());
    streams_.erase(it);
  } else {
    s.cancelled = true;  // the worker frees the row at the next step boundary
    work_cv_.notify_one();
  }
}

void Scheduler::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_ && !worker_.joinable()) return;
    stop_ = true;
    run_opts_.SetTerminate();
    for (auto& kv : streams_)
      if (!kv.second.done) finish(kv.second, "", "this Runtime was closed");
    pending_.clear();
    work_cv_.notify_all();
    frame_cv_.notify_all();
  }
  if (worker_.joinable() && worker_.get_id() != std::this_thread::get_id()) worker_.join();
}

SchedulerStats Scheduler::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  SchedulerStats s = stats_;
  s.rows = max_streams_;
  s.waiting = int64_t(pending_.size());
  s.active = 0;
  for (auto& r : rows_) s.active += r.stream >= 0;
  return s;
}

void Scheduler::finish(Stream& s, const std::string& reason, const std::string& error) {
  s.done = true;
  s.reason = reason;
  s.error = error;
}

void Scheduler::check_finite(const float* p, size_t n, const std::string& block, const Row& row) const {
  if (!all_finite(p, n))
    throw Error("non-finite values (NaN or inf) in the output of block " + block + " at step " +
                std::to_string(row.step) + (row.prefilled ? "" : " (prefill)") +
                ": the model's weights or this stream's inputs are out of range");
}

void Scheduler::fill_noise(Row& row, float* dst) {
  const int64_t k = model_->spec().num_vq, V = model_->spec().vocab_code;
  if (row.spec.greedy) {
    std::fill(dst, dst + k * V, 1.0f);
  } else if (!row.spec.noise.empty()) {
    if (row.step >= row.spec.noise_steps)
      throw Error("the supplied noise covers only " + std::to_string(row.spec.noise_steps) + " steps");
    const float* src = row.spec.noise.data() + row.step * k * V;
    std::copy(src, src + k * V, dst);
  } else {
    exp_noise(row.rng, dst, k * V);
  }
}

// The worker: admit, prefill newcomers, one decode step over the runnable rows, hand the frames out.
void Scheduler::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    const auto now = Clock::now();
    // Streams that waited too long for a row.
    for (auto it = pending_.begin(); it != pending_.end();) {
      Stream& s = streams_[*it];
      if (s.has_deadline && now > s.deadline) {
        char secs[32];
        std::snprintf(secs, sizeof secs, "%g", s.spec.queue_timeout_s);
        finish(s, "", std::string("waited ") + secs + " s for a free stream (all " + std::to_string(max_streams_) +
                          " streams of this Runtime are busy)");
        it = pending_.erase(it);
        frame_cv_.notify_all();
      } else {
        ++it;
      }
    }
    // Rows of cancelled streams are freed here, at a step boundary.
    for (size_t r = 0; r < rows_.size(); ++r) {
      Row& row = rows_[r];
      if (row.stream < 0) continue;
      auto it = streams_.find(row.stream);
      if (it == streams_.end() || it->second.cancelled) {
        if (it != streams_.end()) streams_.erase(it);
        row.stream = -1;
      }
    }
    // Admission: the lowest free row for the oldest waiting stream.
    std::vector<int64_t> admitted;
    for (size_t r = 0; r < rows_.size() && !pending_.empty(); ++r) {
      if (rows_[r].stream >= 0) continue;
      const int64_t id = pending_.front();
      pending_.pop_front();
      Stream& s = streams_[id];
      Row& row = rows_[r];
      row.stream = id;
      row.spec = std::move(s.spec);
      row.prefilled = false;
      row.len = row.step = 0;
      std::fill(row.history.begin(), row.history.end(), int64_t(-1));
      seed_rng(row.spec.seed, row.rng);
      s.row = int64_t(r);
      admitted.push_back(int64_t(r));
    }
    std::vector<int64_t> runnable;
    int64_t hi = 0;
    for (size_t r = 0; r < rows_.size(); ++r) {
      const Row& row = rows_[r];
      if (row.stream < 0) continue;
      hi = int64_t(r) + 1;
      const Stream& s = streams_[row.stream];
      if (row.prefilled && !s.done && int64_t(s.queue.size()) < queue_frames_) runnable.push_back(int64_t(r));
    }
    if (admitted.empty() && runnable.empty()) {
      work_cv_.wait_for(lock, std::chrono::milliseconds(50));
      continue;
    }
    lock.unlock();
    std::vector<Outcome> out;
    for (int64_t r : admitted) {
      try {
        prefill(r, out);
      } catch (const std::exception& e) {
        out.push_back(Outcome{r, false, {}, true, "", e.what()});
      }
    }
    if (!runnable.empty()) {
      try {
        decode(runnable, hi, out);
      } catch (const std::exception& e) {
        for (int64_t r : runnable) out.push_back(Outcome{r, false, {}, true, "", e.what()});
      }
    }
    lock.lock();
    if (!runnable.empty()) ++stats_.steps;
    stats_.prefills += int64_t(admitted.size());
    for (Outcome& o : out) {
      Row& row = rows_[size_t(o.row)];
      auto it = streams_.find(row.stream);
      if (it == streams_.end()) continue;
      Stream& s = it->second;
      if (o.has_frame && !s.cancelled) {
        s.queue.push_back(std::move(o.frame));
        ++stats_.frames;
      }
      if (o.done && !s.done) {
        finish(s, o.reason, o.error);
        s.row = -1;
        row.stream = -1;  // the row is free for the next stream now
        if (s.cancelled) streams_.erase(it);
      }
    }
    frame_cv_.notify_all();
  }
}

// One stream's prompt into its row's slab of the cache, then its first frame.
void Scheduler::prefill(int64_t r, std::vector<Outcome>& out) {
  const ModelSpec& m = model_->spec();
  Row& row = rows_[size_t(r)];
  const int64_t T = int64_t(row.spec.prompt_ids.size()), E = m.hidden, D = m.head_dim, H = m.heads;
  const int64_t M = m.max_context;
  grow(p_ids_, T * 4);
  grow(p_pos_, T);
  grow(p_text_mask_, T);
  grow(p_h0_, T * E);
  grow(p_h1_, T * E);
  grow(p_rope_, T * D);
  grow(p_bias_, T);
  grow(p_speaker_, E);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < 4; ++c) p_ids_[size_t(t * 4 + c)] = row.spec.prompt_ids[size_t(t)];
    p_pos_[size_t(t)] = t;
    p_text_mask_[size_t(t)] = 1;
  }
  int64_t one = 1;
  if (row.spec.speaker.empty())
    std::fill(p_speaker_.begin(), p_speaker_.begin() + E, 0.0f);
  else
    std::copy(row.spec.speaker.begin(), row.spec.speaker.end(), p_speaker_.begin());
  p_embed_.BindInput("input_ids", view(p_ids_.data(), {1, T, 4}));
  p_embed_.BindInput("text_mask", view(reinterpret_cast<bool*>(p_text_mask_.data()), {1, T}));
  p_embed_.BindInput("speaker", view(p_speaker_.data(), {1, E}));
  p_embed_.BindInput("position_ids", view(p_pos_.data(), {1, T}));
  p_embed_.BindInput("key_mask", view(&one, {1, 1}));
  p_embed_.BindOutput("hidden", view(p_h0_.data(), {1, T, E}));
  p_embed_.BindOutput("cos", view(p_rope_.data(), {1, T, D}));
  p_embed_.BindOutput("sin", view(p_rope_.data(), {1, T, D}));  // unused in the fused form: one scratch buffer
  p_embed_.BindOutput("attn_bias", view(p_bias_.data(), {1, 1, T, 1}));
  model_->embed().run(run_opts_, p_embed_);
  check_finite(p_h0_.data(), size_t(T * E), "embed", row);
  int32_t seqlen = int32_t(T - 1), total = int32_t(T);
  const auto kv_type = kv_.type();
  Ort::Value sl = view(&seqlen, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {1});
  Ort::Value tot = view(&total, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {});
  Ort::Value cosc = view(model_->cos_cache(), kv_type, {M, D / 2});
  Ort::Value sinc = view(model_->sin_cache(), kv_type, {M, D / 2});
  const int64_t slab = r * H * M * D;  // row r's [1, H, M, D] slab of the cache
  float* cur = p_h0_.data();
  float* nxt = p_h1_.data();
  for (size_t g = 0; g < model_->num_graphs(); ++g) {
    Ort::IoBinding& io = p_layers_[g];
    bind_fused_common(io, view(cur, {1, T, E}), view(nxt, {1, T, E}), sl, tot, cosc, sinc);
    for (size_t j = 0, l = model_->first_layer(g); j < model_->graph_layers(g); ++j, ++l)
      bind_fused_kv(io, model_->kv_names(g, j), view(kv_.key(l, slab), kv_type, {1, H, M, D}),
                    view(kv_.value(l, slab), kv_type, {1, H, M, D}));
    model_->layer_graph(g).run(run_opts_, io);
    std::swap(cur, nxt);
    check_finite(cur, size_t(T * E), layer_block_name(g), row);
  }
  p_head_.BindInput("hidden", view(cur + (T - 1) * E, {1, 1, E}));
  p_head_.BindOutput("logits", view(logits_.data(), {1, m.num_vq, m.vocab_code}));
  p_head_.BindOutput("last_hidden", view(last_hidden_.data(), {1, E}));
  model_->head(false).run(run_opts_, p_head_);
  row.len = T;
  sample_rows({r}, 1, true, out);
  row.prefilled = true;
}

// One decode step over rows [0, hi): the runnable ones advance; the others in that range (paused, or free)
// are computed and ignored (a paused row rewrites the same K/V at its position; a free row writes position 0
// of a slab the next prefill overwrites).
void Scheduler::decode(const std::vector<int64_t>& runnable, int64_t hi, std::vector<Outcome>& out) {
  const ModelSpec& m = model_->spec();
  hi = std::max(hi, min_rows_);
  const int64_t B = hi, E = m.hidden, D = m.head_dim, H = m.heads, M = m.max_context, k = m.num_vq;
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    const Row& row = rows_[size_t(b)];
    const bool live = row.stream >= 0 && row.prefilled;
    for (int64_t c = 0; c < 4; ++c) ids_[size_t(b * 4 + c)] = live ? row.last[size_t(c % k)] : 0;
    text_mask_[size_t(b)] = 0;
    pos_[size_t(b)] = live ? row.len : 0;
    key_mask_[size_t(b)] = 1;
    seqlens_[size_t(b)] = int32_t(live ? row.len : 0);
    longest = std::max(longest, live ? row.len + 1 : 1);
  }
  total_len_ = int32_t(longest);
  const auto kv_type = kv_.type();
  if (B != bound_hi_) {
    std::fill(speaker_.begin(), speaker_.begin() + B * E, 0.0f);  // audio rows never read the speaker
    d_embed_.BindInput("input_ids", view(ids_.data(), {B, 1, 4}));
    d_embed_.BindInput("text_mask", view(reinterpret_cast<bool*>(text_mask_.data()), {B, 1}));
    d_embed_.BindInput("speaker", view(speaker_.data(), {B, E}));
    d_embed_.BindInput("position_ids", view(pos_.data(), {B, 1}));
    d_embed_.BindInput("key_mask", view(key_mask_.data(), {B, 1}));
    d_embed_.BindOutput("hidden", view(h0_.data(), {B, 1, E}));
    d_embed_.BindOutput("cos", view(rope_.data(), {B, 1, D}));
    d_embed_.BindOutput("sin", view(rope_.data(), {B, 1, D}));
    d_embed_.BindOutput("attn_bias", view(bias_.data(), {B, 1, 1, 1}));
    Ort::Value sl = view(seqlens_.data(), ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {B});
    Ort::Value tot = view(&total_len_, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {});
    Ort::Value cosc = view(model_->cos_cache(), kv_type, {M, D / 2});
    Ort::Value sinc = view(model_->sin_cache(), kv_type, {M, D / 2});
    float* a = h0_.data();
    float* b = h1_.data();
    for (size_t g = 0; g < model_->num_graphs(); ++g) {
      bind_fused_common(d_layers_[g], view(a, {B, 1, E}), view(b, {B, 1, E}), sl, tot, cosc, sinc);
      for (size_t j = 0, l = model_->first_layer(g); j < model_->graph_layers(g); ++j, ++l)
        bind_fused_kv(d_layers_[g], model_->kv_names(g, j), view(kv_.key(l), kv_type, {B, H, M, D}),
                      view(kv_.value(l), kv_type, {B, H, M, D}));
      std::swap(a, b);
    }
    d_head_.BindInput("hidden", view(a, {B, 1, E}));
    d_head_.BindOutput("logits", view(logits_.data(), {B, k, m.vocab_code}));
    d_head_.BindOutput("last_hidden", view(last_hidden_.data(), {B, E}));
    bound_hi_ = B;
  }
  model_->embed().run(run_opts_, d_embed_);
  float* cur = h0_.data();
  float* nxt = h1_.data();
  for (size_t g = 0; g < model_->num_graphs(); ++g) {
    model_->layer_graph(g).run(run_opts_, d_layers_[g]);
    std::swap(cur, nxt);
    for (int64_t r : runnable) check_finite(cur + r * E, size_t(E), layer_block_name(g), rows_[size_t(r)]);
  }
  model_->head(false).run(run_opts_, d_head_);
  sample_rows(runnable, B, false, out);
}

// The sample head over rows [0, n_rows), then each listed row's frame and stop logic.
void Scheduler::sample_rows(const std::vector<int64_t>& rows, int64_t n_rows, bool prefill, std::vector<Outcome>& out) {
  const ModelSpec& m = model_->spec();
  const int64_t k = m.num_vq, V = m.vocab_code, E = m.hidden, N = n_rows * k;
  // Rows not listed get neutral values and noise of ones: computed, never used, no draw taken from them.
  std::fill(temperature_.begin(), temperature_.begin() + N, 1.0f);
  std::fill(penalty_.begin(), penalty_.begin() + N, 1.0f);
  std::fill(top_p_.begin(), top_p_.begin() + N, 1.0f);
  std::fill(top_k_.begin(), top_k_.begin() + N, int64_t(20));
  std::fill(block_eos_.begin(), block_eos_.begin() + N, uint8_t(0));
  std::fill(history_.begin(), history_.begin() + N * 16, int64_t(-1));
  std::fill(noise_.begin(), noise_.begin() + N * V, 1.0f);
  for (int64_t r : rows) {
    Row& row = rows_[size_t(r)];
    const int64_t b = prefill ? 0 : r;  // the prefill runs its row alone, as batch row 0
    check_finite(last_hidden_.data() + b * E, size_t(E), "head_code", row);
    check_finite(logits_.data() + b * k * V, size_t(k * V), "head_code", row);
    for (int64_t i = 0; i < k; ++i) {
      const int64_t n = b * k + i;
      temperature_[size_t(n)] = row.spec.temperature[size_t(i)];
      penalty_[size_t(n)] = row.spec.repetition_penalty;
      top_p_[size_t(n)] = row.spec.top_p;
      top_k_[size_t(n)] = row.spec.top_k;
      block_eos_[size_t(n)] = row.step < row.spec.min_new_token;
      std::copy(row.history.begin() + i * 16, row.history.begin() + (i + 1) * 16, history_.begin() + n * 16);
    }
    fill_noise(row, noise_.data() + b * k * V);
  }
  Ort::IoBinding& io = prefill ? p_sample_ : d_sample_;
  io.BindInput("logits", view(logits_.data(), {N, V}));
  io.BindInput("temperature", view(temperature_.data(), {N}));
  io.BindInput("penalty", view(penalty_.data(), {N}));
  io.BindInput("history", view(history_.data(), {N, 16}));
  io.BindInput("top_p", view(top_p_.data(), {N}));
  io.BindInput("top_k", view(top_k_.data(), {N}));
  io.BindInput("eos_id", view(&eos_id_, {}));
  io.BindInput("block_eos", view(reinterpret_cast<bool*>(block_eos_.data()), {N}));
  io.BindInput("noise", view(noise_.data(), {N, V}));
  io.BindOutput("next_ids", view(next_ids_.data(), {N}));
  model_->sample().run(run_opts_, io);
  for (int64_t r : rows) {
    Row& row = rows_[size_t(r)];
    const int64_t b = prefill ? 0 : r;
    Outcome o;
    o.row = r;
    bool eos = false;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t id = next_ids_[size_t(b * k + i)];
      if (id < 0 || id >= V) throw Error("block sample drew id " + std::to_string(id) + " outside the vocabulary");
      eos |= id == eos_id_;
      row.history[size_t(i * 16 + row.step % 16)] = id;
      row.last[size_t(i)] = id;
    }
    if (eos) {
      o.done = true;
      o.reason = "eos";
    } else {
      o.has_frame = true;
      o.frame.step = row.step;
      o.frame.codes.assign(row.last.begin(), row.last.end());
      if (row.spec.return_hidden)
        o.frame.hidden.assign(last_hidden_.begin() + b * E, last_hidden_.begin() + (b + 1) * E);
    }
    if (!prefill) row.len += 1;
    row.step += 1;
    if (!o.done) {
      if (row.step >= row.spec.max_new_token) {
        o.done = true;
        o.reason = "max_new_token";
      } else if (row.len + 1 > m.max_context) {
        o.done = true;
        o.reason = "context_full";
      }
    }
    out.push_back(std::move(o));
  }
}

}  // namespace chattts
