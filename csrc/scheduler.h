// Many concurrent streams over one Model: each stream is a row of one KV cache, and one worker thread runs
// a batched decode step over all of them (llama.cpp's server "slots" are the closest design).
//
// - A new stream waits in a FIFO until a row is free, is prefilled on its own (its prompt into its row's slab
//   of the fused [rows, H, M, D] cache), and joins the batch at the next step boundary.
// - A decode step runs rows [0, hi), hi = 1 + the highest row in use (new streams take the lowest free row).
//   Each row has its own sampling values (the sample head's per-row form), its own noise generator and its
//   own stop reason, so what a stream samples does not depend on who else runs, up to the float rounding of
//   batched kernels.
// - Frames go to a bounded queue per stream. A stream whose queue is full is paused: its row is recomputed at
//   the same position (an idempotent rewrite of the same K/V) and its result discarded until the consumer
//   reads again; the others go on.
// - Fused layer form only (the portable form interleaves rows in its cache).
#pragma once

#include "kv_cache.h"
#include "model.h"

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace chattts {

struct StreamSpec {
  std::vector<int64_t> prompt_ids;   // one row's token ids
  std::vector<float> speaker;        // [hidden] or empty (no speaker)
  std::vector<float> temperature;    // [num_vq]
  float repetition_penalty = 1.05f, top_p = 0.7f;
  int64_t top_k = 20, max_new_token = 2048, min_new_token = 0;
  bool greedy = false, return_hidden = false;
  uint64_t seed = 0;
  std::vector<float> noise;          // optional [noise_steps, num_vq, V]
  int64_t noise_steps = 0;
  double queue_timeout_s = -1;       // how long to wait for a free row (< 0: as long as it takes)
};

struct StreamFrame {
  int64_t step = 0;
  std::vector<int64_t> codes;        // [num_vq]
  std::vector<float> hidden;         // [hidden] when asked
};

// What pull() hands a consumer: the frames queued since the last pull and, at the end, why it ended.
struct Pulled {
  std::vector<StreamFrame> frames;
  bool done = false;
  std::string stop_reason;           // "eos", "max_new_token", "context_full"
  std::string error;                 // non-empty when the stream failed (closed, timed out, a bad block)
};

struct SchedulerStats {
  int64_t rows = 0, active = 0, waiting = 0, steps = 0, frames = 0, prefills = 0;
};

class Scheduler {
 public:
  // batch_invariant: every decode step runs at least two rows. ONNX Runtime's 4-bit MatMulNBits kernel takes
  // another path for a single row, whose results differ by ~1e-2; with two or more rows, a stream's codes are
  // bit-identical whatever else runs (fp32 and int8 are identical either way). Costs one extra row when a
  // stream runs alone.
  Scheduler(std::shared_ptr<Model> model, int64_t max_streams, int64_t queue_frames, bool batch_invariant = false);
  ~Scheduler();

  int64_t submit(StreamSpec spec);                 // returns the stream id; never blocks
  Pulled pull(int64_t id, int64_t max_wait_ms);    // waits up to max_wait_ms for frames or the end
  void cancel(int64_t id);                         // the stream leaves at the next step boundary
  void close();                                    // ends every stream with an error, stops the worker
  SchedulerStats stats();

 private:
  struct Row {
    int64_t stream = -1;  // -1: free
    StreamSpec spec;
    bool prefilled = false;
    int64_t len = 0, step = 0;
    std::vector<int64_t> last, history;  // [num_vq], [num_vq * 16]
    uint64_t rng[4] = {0, 0, 0, 0};
  };
  struct Stream {
    int64_t row = -1;
    StreamSpec spec;  // until admitted
    std::deque<StreamFrame> queue;
    bool done = false, cancelled = false;
    std::string reason, error;
    std::chrono::steady_clock::time_point deadline;
    bool has_deadline = false;
  };
  // What a step produced for one row (handed to the stream's queue under the lock).
  struct Outcome {
    int64_t row = -1;
    bool has_frame = false;
    StreamFrame frame;
    bool done = false;
    std::string reason, error;
  };

  void loop();
  void prefill(int64_t r, std::vector<Outcome>& out);
  void decode(const std::vector<int64_t>& runnable, int64_t hi, std::vector<Outcome>& out);
  void sample_rows(const std::vector<int64_t>& rows, int64_t n_rows, bool prefill, std::vector<Outcome>& out);
  void fill_noise(Row& row, float* dst);
  void check_finite(const float* p, size_t n, const std::string& block, const Row& row) const;
  void finish(Stream& s, const std::string& reason, const std::string& error);

  std::shared_ptr<Model> model_;
  int64_t max_streams_, queue_frames_, min_rows_;
  KVCache kv_;
  Ort::RunOptions run_opts_;

  std::mutex mu_;
  std::condition_variable work_cv_, frame_cv_;
  bool stop_ = false;
  int64_t next_id_ = 1;
  std::map<int64_t, Stream> streams_;
  std::deque<int64_t> pending_;
  std::vector<Row> rows_;
  SchedulerStats stats_;
  std::thread worker_;

  // Worker-only buffers and bindings (prefill: one row; decode: rows [0, hi)). The prefill has buffers of its
  // own, grown to the longest prompt: the decode bindings point into the decode buffers, which never move.
  Ort::IoBinding p_embed_{nullptr}, p_head_{nullptr}, p_sample_{nullptr};
  std::vector<Ort::IoBinding> p_layers_;
  Ort::IoBinding d_embed_{nullptr}, d_head_{nullptr}, d_sample_{nullptr};
  std::vector<Ort::IoBinding> d_layers_;
  int64_t bound_hi_ = 0;
  std::vector<int64_t> ids_, pos_, key_mask_, history_, next_ids_, top_k_;
  std::vector<uint8_t> text_mask_, block_eos_;
  std::vector<float> speaker_, h0_, h1_, rope_, bias_, logits_, last_hidden_, temperature_, penalty_, top_p_, noise_;
  std::vector<int32_t> seqlens_;
  std::vector<int64_t> p_ids_, p_pos_;
  std::vector<uint8_t> p_text_mask_;
  std::vector<float> p_speaker_, p_h0_, p_h1_, p_rope_, p_bias_;
  int32_t total_len_ = 0;
  int64_t eos_id_ = 0;
};

}  // namespace chattts
