// One generation in progress over a shared Model: its KV cache, its rows, its step counter, its noise and
// its own IO bindings. prefill and decode run entirely in C++; nothing here allocates per step.
//
// Fused form: decode steps all have the same shapes and addresses, so the IO bindings made at the first decode
// step are reused; a later step only writes the new ids, positions and lengths into the bound buffers.
// Portable form: shapes grow with the past, so it binds views into the cache every step.
#pragma once

#include "kv_cache.h"
#include "model.h"

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace chattts {

// What to generate. Prompts cross as token ids (ragged, concatenated) plus one length per row; the state lays
// them out as its layer form needs (right-padded for fused, left-padded for portable).
struct GenerationSpec {
  bool text_mode = false;              // false: audio codes (code heads); true: text head
  std::vector<int64_t> prompt_ids;     // all rows' token ids, concatenated
  std::vector<int64_t> prompt_lens;    // tokens per row (B rows)
  std::vector<float> speaker;          // [B, E] speaker values, or empty (no [spk_emb] row is replaced)
  std::vector<float> temperature;      // [num_vq] (audio) or [1] (text)
  float repetition_penalty = 1.0f, top_p = 0.7f;
  int64_t top_k = 20, max_new_token = 2048, min_new_token = 0, eos_id = 625;
  bool greedy = false;                 // noise of ones: argmax of the processed distribution
  bool return_hidden = false;          // hand out each frame's final hidden state
  uint64_t seed = 0;
  std::vector<float> noise;            // optional [noise_steps, N, V] Exp(1) noise; empty: the seeded generator
  int64_t noise_steps = 0;
};

// What one step produced. Frames of rows that ended at this step (EOS) are not included.
struct StepResult {
  int64_t step = -1;
  int64_t k = 0;                   // ids per frame: num_vq (audio) or 1 (text)
  std::vector<int32_t> rows;       // batch row of each frame
  std::vector<int64_t> ids;        // [frames, k]
  std::vector<float> hidden;       // [frames, E] when asked
  std::vector<int32_t> ended_rows; // rows that hit EOS at this step
  bool done = false;
  std::string stop_reason;         // "eos", "max_new_token", "context_full" when done
};

class State {
 public:
  State(std::shared_ptr<Model> model, int64_t max_batch);

  void start(GenerationSpec g);
  StepResult step();                     // the first call runs the prefill
  bool prefill_pending() const { return active_ && step_ == 0; }
  void reset();                          // ends the generation; buffers stay for the next one
  void close();                          // ends it for good: later calls raise
  void terminate();                      // from another thread: cut a Run in flight
  // Frees KV rows grown beyond the load-time batch (a large batch earlier, or a failed allocation).
  void release_memory();
  int64_t kv_rows() const { return kv_.rows(); }

  // Per-block wall time (ms) summed over the steps since the last call; enabled by profile(true).
  void profile(bool on) { profile_ = on; }
  std::vector<std::pair<std::string, double>> take_profile();

 private:
  void ensure_capacity(int64_t batch, int64_t prompt_len);
  void layout_prompts();
  void bind_step(int64_t S, int64_t L);
  void run_layers(int64_t S, int64_t P, bool bind);
  void fill_noise(int64_t n_rows, int64_t vocab);
  void check_finite(const float* p, size_t n, const std::string& block) const;

  std::shared_ptr<Model> model_;
  int64_t base_rows_;
  KVCache kv_;
  Ort::RunOptions run_opts_;
  std::mutex mutex_;
  std::atomic<bool> closed_{false};

  // Every state binds its own memory to the shared sessions.
  Ort::IoBinding embed_b_{nullptr}, head_code_b_{nullptr}, head_text_b_{nullptr}, sample_b_{nullptr};
  std::vector<Ort::IoBinding> layer_b_;

  // Per-step work buffers, sized for the largest batch and prompt seen.
  std::vector<int64_t> ids_, pos_, key_mask_, key_valid_, history_, next_ids_;
  std::vector<uint8_t> text_mask_;
  std::vector<float> speaker_, h0_, h1_, cos_, sin_, bias_, logits_, last_hidden_, gather_;
  std::vector<float> temperature_, noise_;
  std::vector<int32_t> seqlens_;  // fused form: per-row length - 1
  std::vector<int64_t> lens_;     // tokens per row (cached, fused form)
  int32_t total_len_ = 0;
  // Sampling values: one per row (the sample head's per-row form) or the first entry for all rows.
  std::vector<float> penalty_, top_p_;
  std::vector<int64_t> top_k_;
  std::vector<uint8_t> block_eos_;
  int64_t eos_id_ = 625;
  bool decode_bound_ = false;
  float* out_ = nullptr;  // the buffer holding the last layer's output

  // Generation state.
  GenerationSpec g_;
  bool active_ = false;
  int64_t B_ = 0, T_ = 0, P_ = 0, step_ = 0;
  std::vector<int64_t> last_pos_;
  std::vector<uint8_t> finished_;
  uint64_t rng_[4] = {0, 0, 0, 0};
  bool profile_ = false;
  double prof_embed_ = 0, prof_layers_ = 0, prof_head_ = 0, prof_noise_ = 0, prof_sample_ = 0, prof_other_ = 0;
  int64_t prof_steps_ = 0;
};

}  // namespace chattts
