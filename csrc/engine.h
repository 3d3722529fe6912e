// The decode loop: embedding -> layers -> head -> sample head, all ONNX sessions, all in C++.
//
// Every buffer is allocated at load for max_batch rows and max_context positions (grown once if a bigger
// batch arrives) and reused by every step; no step allocates a buffer or copies the cache.
// - fused form (default): the KV cache of layer l is one [B, H, S_max, D] buffer bound as both past and
//   present of GroupQueryAttention, which appends the new positions in place. Decode steps all have the same
//   shapes and addresses, so the IO bindings made at the first decode step are reused: a later step writes
//   the new ids, positions and lengths into the bound buffers and runs the graphs.
// - portable form: the cache is [S_max, B, H, D] (sequence outermost), so the first P positions are one
//   contiguous "past" view and the S new positions are the contiguous slot right after it; each layer writes
//   its present K/V straight into that slot. Its shapes grow with P, so it binds views every step.
#pragma once

#include "session.h"

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace chattts {

struct EngineSpec {
  std::string embed, head_code, head_text, sample;
  std::vector<std::string> layers;
  int hidden = 768, heads = 12, head_dim = 64, num_vq = 4;
  int vocab_code = 626, vocab_text = 21178;
  int64_t max_context = 2048;
  int max_batch = 1;
  std::string device = "cpu";
  int threads = 0;
  // "portable": KV [S_max, B, H, D], layer reads a past view and writes its present slot.
  // "fused": KV [B, H, S_max, D] shared by past and present (GroupQueryAttention); rows right-padded.
  std::string layer_form = "portable";
  std::vector<std::pair<std::string, std::string>> session_config;  // extra ORT session config entries
  double rope_theta = 10000.0;
  bool kv_fp16 = false;  // fused form only: KV buffers and rotary caches in fp16
};

struct GenerationSpec {
  bool text_mode = false;              // false: audio codes (code heads); true: text head
  int64_t batch = 1, prompt_len = 0;
  std::vector<int64_t> input_ids;      // [B, T, 4], left padded
  std::vector<int64_t> attention_mask; // [B, T], 1 = token, 0 = padding
  std::vector<float> speaker;          // [B, E]; zeros where a row has no speaker
  std::vector<float> temperature;      // [num_vq] (audio) or [1] (text)
  float repetition_penalty = 1.0f, top_p = 0.7f;
  int64_t top_k = 20, max_new_token = 2048, min_new_token = 0, eos_id = 625;
  bool greedy = false;
  uint64_t seed = 0;
  std::vector<float> noise;            // optional [steps, N, V] Exp(1) noise; empty -> seeded generator
  int64_t noise_steps = 0;
};

// What one step produced. Frames of rows that ended at this step (EOS) are not included.
struct StepResult {
  int64_t step = -1;
  std::vector<int32_t> rows;       // batch row of each frame
  std::vector<int64_t> ids;        // [frames, k], k = num_vq (audio) or 1 (text)
  std::vector<float> hidden;       // [frames, E] when asked
  std::vector<int32_t> ended_rows; // rows that hit EOS at this step
  bool done = false;
  std::string stop_reason;         // "eos", "max_new_token", "context_full" when done
};

class Engine {
 public:
  explicit Engine(const EngineSpec& spec);
  const EngineSpec& spec() const { return spec_; }
  const Session& session(const std::string& which, int layer = 0) const;

  void start(GenerationSpec g);
  StepResult step(bool return_hidden);   // the first call runs the prefill
  bool active() const { return active_; }
  void reset();                          // ends the generation; buffers stay for the next one
  // Per-block wall time (ms) summed over the steps since the last call; enabled by profile(true).
  void profile(bool on) { profile_ = on; }
  std::vector<std::pair<std::string, double>> take_profile();
  void terminate();                      // from another thread: cut a Run in flight

 private:
  void ensure_capacity(int64_t batch, int64_t prompt_len);
  void run_layers_portable(int64_t S, int64_t P, float*& cur, float*& nxt);
  void run_layers_fused(int64_t S, float*& cur, float*& nxt, bool bind);
  void fill_noise(int64_t n_rows, int64_t vocab);

  EngineSpec spec_;
  std::unique_ptr<Session> embed_, head_code_, head_text_, sample_;
  std::vector<std::unique_ptr<Session>> layers_;
  Ort::RunOptions run_opts_;
  std::mutex mutex_;

  // KV buffers and per-step work buffers (see the comment at the top).
  int64_t kv_capacity_ = 0;  // floats per buffer
  std::vector<std::vector<float>> K_, V_;
  std::vector<int64_t> ids_, pos_, key_mask_, key_valid_, history_, next_ids_;
  std::vector<uint8_t> text_mask_;
  std::vector<float> speaker_, h0_, h1_, cos_, sin_, bias_, logits_, last_hidden_;
  std::vector<float> temperature_, noise_;
  bool fused_ = false;
  std::vector<float> cos_cache_, sin_cache_, gather_;  // fused form: rotary caches [S_max, D/2]
  std::vector<uint16_t> cos16_, sin16_;                // the same in fp16 (kv_fp16)
  std::vector<int32_t> seqlens_;                       // fused form: per-row length - 1
  std::vector<int64_t> lens_;                          // fused form: tokens cached per row
  int32_t total_len_ = 0;
  float penalty_ = 1.0f, top_p_ = 0.7f;
  int64_t top_k_ = 20, eos_id_ = 625;
  bool block_eos_ = false;
  bool decode_bound_ = false;  // fused form: the decode bindings are in place (see step())

  // Generation state.
  GenerationSpec g_;
  bool active_ = false;
  int64_t B_ = 0, T_ = 0, P_ = 0, step_ = 0, S_max_ = 0;
  std::vector<int64_t> last_pos_;
  std::vector<uint8_t> finished_;
  uint64_t rng_[4] = {0, 0, 0, 0};
  bool profile_ = false;
  double prof_embed_ = 0, prof_layers_ = 0, prof_head_ = 0, prof_noise_ = 0, prof_sample_ = 0, prof_other_ = 0;
  int64_t prof_steps_ = 0;
};

}  // namespace chattts
