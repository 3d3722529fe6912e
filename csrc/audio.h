// The audio path: GPT hidden states in, 24 kHz samples out, streamed (docs/AUDIO.md).
//
// One AudioEngine holds the streaming graphs (audio_step: a chunk of new frames through the Decoder and Vocos,
// every conv keeping a cache of its last inputs in a per-stream state; audio_flush: the rest of the utterance
// from a state) and one worker thread that serves every open stream (earliest deadline first: the stream whose
// listener would run out of audio soonest), so the audio work runs beside the GPT's and neither waits for the
// other. Each stream:
// - takes frames as the GPT samples them (push) and the end of its utterance (finish);
// - runs a step at every multiple of `chunk` frames and at the frame that makes its first audio (fixed
//   boundaries: its audio does not depend on timing or on other streams), ping-ponging two state buffers;
// - with lookahead = exact (52 for ChatTTS) emits only samples no later frame can change: the stream equals
//   the whole-utterance decode to float rounding. With a smaller lookahead L it emits up to L frames from the
//   newest one, computed by a flush of a copy-free read of the state as if the utterance ended there (the
//   error decays fast with L; docs/AUDIO.md has the measurements) — but only while the exact samples would not
//   stay half a chunk ahead of a listener who started playing at the first sample: once the GPT has run that far
//   ahead of real time, the stream is exact again and the flushes stop;
// - queues the emitted samples, with the index of the first, for pull.
#pragma once

#include "session.h"

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

struct AudioSpec {
  std::string step, flush;        // graph files
  int64_t hidden = 768;           // GPT hidden size (floats per frame)
  int64_t state_size = 0;         // floats of one stream's state
  int64_t flush_samples = 0;      // samples the flush graph returns
  int64_t samples_per_frame = 512;
  int64_t hop = 256;              // the utterance has samples_per_frame * frames - hop samples
  int64_t exact_lookahead = 52;
  int64_t sample_rate = 24000;
  int64_t max_chunk = 64;         // frames per step at most (bounds the work buffers)
  std::string device = "cpu";
  int threads = 0;                // the process pool's size (creates the Env if this comes first)
  int own_threads = 1;            // intra-op threads of the audio sessions (1: the worker thread itself)
  std::vector<std::pair<std::string, std::string>> session_config;
};

struct AudioPulled {
  std::vector<float> samples;
  int64_t first = 0;  // index in the utterance of samples[0]
  bool done = false;
  std::string error;
};

struct AudioStats {
  int64_t steps = 0, flushes = 0, frames = 0, samples = 0;
  double step_ms = 0, flush_ms = 0;  // total time in each graph
};

class AudioEngine {
 public:
  explicit AudioEngine(const AudioSpec& spec);
  ~AudioEngine();
  AudioEngine(const AudioEngine&) = delete;
  AudioEngine& operator=(const AudioEngine&) = delete;

  const AudioSpec& spec() const { return spec_; }
  const Session& step_session() const { return *step_; }
  const Session& flush_session() const { return *flush_; }

  // A new stream; lookahead in [0, exact_lookahead], chunk in [1, max_chunk] frames per step.
  int64_t open(int64_t lookahead, int64_t chunk);
  // n frames of `hidden` floats each, in order.
  void push(int64_t id, const float* frames, int64_t n);
  // No more frames: the worker flushes the rest.
  void finish(int64_t id);
  // Samples emitted since the last pull (waits up to max_wait_ms for some, or for the end).
  AudioPulled pull(int64_t id, int64_t max_wait_ms);
  // Forget a stream (a no-op for an unknown id).
  void cancel(int64_t id);
  // Stop the worker; later calls raise. Idempotent.
  void close();
  AudioStats stats();

 private:
  struct Stream;
  void worker();
  void warm_up();
  bool has_work(const Stream& s) const;
  int64_t next_boundary(const Stream& s, int64_t done) const;
  void run_stream(Stream& s, std::unique_lock<std::mutex>& lock);
  void emit(Stream& s, const float* sig, int64_t first, int64_t n, int64_t upto);
  std::shared_ptr<Stream> find(int64_t id);

  AudioSpec spec_;
  std::unique_ptr<Session> step_, flush_;
  Ort::RunOptions run_opts_;
  std::mutex mu_;
  std::condition_variable work_cv_, out_cv_;
  std::map<int64_t, std::shared_ptr<Stream>> streams_;
  int64_t next_id_ = 1;
  bool closing_ = false;
  AudioStats stats_;
  // Work buffers of the one worker thread.
  std::vector<float> in_, out_, flush_out_, taken_;
  std::thread thread_;
};

}  // namespace chattts
