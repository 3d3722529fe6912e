#include "audio.h"

#include "util.h"

#include <algorithm>
#include <chrono>

namespace chattts {

struct AudioEngine::Stream {
  int64_t id = 0, lookahead = 0, chunk = 1;
  std::vector<float> pending;  // frames pushed and not yet stepped, [n, hidden]
  int64_t frames_in = 0;       // pushed in all
  int64_t frames_done = 0;     // stepped in all
  bool finished = false, done = false, busy = false, cancelled = false;
  std::string error;
  std::vector<float> state[2];  // ping-pong: state[cur] is the live one
  int cur = 0;
  int64_t emitted = 0;  // index of the next sample to emit
  std::chrono::steady_clock::time_point opened = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point first_emit;  // when sample 0 was emitted (the listener's clock)
  std::vector<float> out;  // emitted, not yet pulled
  int64_t out_first = 0;   // index of out[0]
};

namespace {

void expect_io(const Session& s, const std::vector<std::string>& ins, const std::vector<std::string>& outs) {
  std::vector<std::string> gi, go;
  for (auto& t : s.inputs()) gi.push_back(t.name);
  for (auto& t : s.outputs()) go.push_back(t.name);
  if (gi != ins || go != outs) {
    auto join = [](const std::vector<std::string>& v) {
      std::string r;
      for (auto& x : v) r += (r.empty() ? "" : ", ") + x;
      return r;
    };
    throw Error(s.path() + ": graph IO (" + join(gi) + " -> " + join(go) + ") is not the audio block's (" +
                join(ins) + " -> " + join(outs) + "); the file is not this block or from another version");
  }
}

// A fixed dimension of a graph's tensor must equal `want` (a symbolic one, -1, passes).
void expect_dim(const Session& s, const TensorInfo& t, size_t axis, int64_t want, const char* what) {
  if (axis >= t.shape.size())
    throw Error(s.path() + ": " + t.name + " has " + std::to_string(t.shape.size()) + " dimensions");
  if (t.shape[axis] >= 0 && t.shape[axis] != want)
    throw Error(s.path() + ": " + t.name + " has " + std::to_string(t.shape[axis]) + " " + what + ", the manifest says " +
                std::to_string(want));
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

AudioEngine::AudioEngine(const AudioSpec& spec) : spec_(spec) {
  if (spec.hidden < 2 || spec.state_size < 1 || spec.flush_samples < 1 || spec.samples_per_frame < 1 ||
      spec.hop < 1 || spec.exact_lookahead < 0 || spec.max_chunk < 1 || spec.max_chunk > 4096 ||
      spec.sample_rate < 1)
    throw Error("AudioSpec: sizes out of range");
  step_ = std::make_unique<Session>(spec.step, spec.device, spec.threads, spec.session_config, spec.own_threads);
  flush_ = std::make_unique<Session>(spec.flush, spec.device, spec.threads, spec.session_config, spec.own_threads);
  for (auto* s : {step_.get(), flush_.get()}) {
    const std::string want = s == step_.get() ? "audio_step" : "audio_flush";
    if (!s->block_tag().empty() && s->block_tag() != want)
      throw Error(s->path() + ": the file is the '" + s->block_tag() + "' block, not '" + want + "'");
  }
  expect_io(*step_, {"hidden", "state", "frames_done"}, {"audio", "state_out", "first_sample"});
  expect_io(*flush_, {"state", "frames_done"}, {"audio", "first_sample"});
  expect_dim(*step_, step_->inputs()[0], 2, spec.hidden, "channels per frame");
  expect_dim(*step_, step_->inputs()[1], 1, spec.state_size, "state floats");
  expect_dim(*step_, step_->outputs()[1], 1, spec.state_size, "state floats");
  expect_dim(*flush_, flush_->inputs()[0], 1, spec.state_size, "state floats");
  expect_dim(*flush_, flush_->outputs()[0], 1, spec.flush_samples, "samples");
  for (auto* s : {step_.get(), flush_.get()})
    for (auto& t : s->inputs())
      if (t.type != (t.name == "frames_done" ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT))
        throw Error(s->path() + ": input " + t.name + " is " + dtype_name(t.type));
  grow(in_, checked_product({spec.max_chunk, spec.hidden}, "audio input"));
  grow(out_, checked_product({spec.max_chunk, spec.samples_per_frame}, "audio output"));
  grow(flush_out_, spec.flush_samples);
  warm_up();
  thread_ = std::thread([this] { worker(); });
}

// One step and one flush on silence at load: the first Run of a graph allocates its arena and prepacks its
// weights, which would otherwise land on the first stream's first audio.
void AudioEngine::warm_up() {
  const int64_t E = spec_.hidden, S = spec_.state_size, spf = spec_.samples_per_frame;
  std::vector<float> state(size_t(S), 0.0f), state_out(size_t(S), 0.0f);
  std::fill(in_.begin(), in_.begin() + E, 0.0f);
  int64_t done = 0, first = 0;
  Ort::Value ins[] = {view(in_.data(), {1, 1, E}), view(state.data(), {1, S}), view(&done, {1})};
  Ort::Value outs[] = {view(out_.data(), {1, spf}), view(state_out.data(), {1, S}), view(&first, {1})};
  step_->run(run_opts_, ins, 3, outs, 3);
  done = 1;
  Ort::Value fins[] = {view(state_out.data(), {1, S}), view(&done, {1})};
  Ort::Value fouts[] = {view(flush_out_.data(), {1, spec_.flush_samples}), view(&first, {1})};
  flush_->run(run_opts_, fins, 2, fouts, 2);
}

AudioEngine::~AudioEngine() { close(); }

void AudioEngine::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closing_ && !thread_.joinable()) return;
    closing_ = true;
    run_opts_.SetTerminate();
    for (auto& kv : streams_)
      if (!kv.second->done) {
        kv.second->done = true;
        kv.second->error = "the audio engine was closed";
      }
  }
  work_cv_.notify_all();
  out_cv_.notify_all();
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

std::shared_ptr<AudioEngine::Stream> AudioEngine::find(int64_t id) {
  auto it = streams_.find(id);
  if (it == streams_.end()) throw Error("unknown audio stream " + std::to_string(id));
  return it->second;
}

int64_t AudioEngine::open(int64_t lookahead, int64_t chunk) {
  if (lookahead < 0 || lookahead > spec_.exact_lookahead)
    throw Error("lookahead must be in [0, " + std::to_string(spec_.exact_lookahead) + "], got " +
                std::to_string(lookahead));
  if (chunk < 1 || chunk > spec_.max_chunk)
    throw Error("chunk must be in [1, " + std::to_string(spec_.max_chunk) + "] frames, got " + std::to_string(chunk));
  auto s = std::make_shared<Stream>();
  s->lookahead = lookahead;
  s->chunk = chunk;
  for (auto& st : s->state) st.assign(size_t(spec_.state_size), 0.0f);  // zeros: nothing before the first frame
  std::lock_guard<std::mutex> lock(mu_);
  if (closing_) throw Error("the audio engine is closed");
  s->id = next_id_++;
  streams_[s->id] = s;
  return s->id;
}

void AudioEngine::push(int64_t id, const float* frames, int64_t n) {
  if (n < 0) throw Error("negative frame count");
  const size_t count = size_t(checked_product({n, spec_.hidden}, "audio frames"));
  if (!all_finite(frames, count)) throw Error("hidden states for the audio path are not finite");
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closing_) throw Error("the audio engine is closed");
    auto s = find(id);
    if (s->finished) throw Error("audio stream " + std::to_string(id) + " was finished; no more frames");
    s->pending.insert(s->pending.end(), frames, frames + count);
    s->frames_in += n;
  }
  work_cv_.notify_all();
}

void AudioEngine::finish(int64_t id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closing_) throw Error("the audio engine is closed");
    find(id)->finished = true;
  }
  work_cv_.notify_all();
}

AudioPulled AudioEngine::pull(int64_t id, int64_t max_wait_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  auto s = find(id);
  auto ready = [&] { return !s->out.empty() || s->done; };
  if (max_wait_ms > 0 && !ready()) out_cv_.wait_for(lock, std::chrono::milliseconds(max_wait_ms), ready);
  AudioPulled p;
  p.first = s->out_first;
  p.samples.swap(s->out);
  s->out_first += int64_t(p.samples.size());
  p.done = s->done;
  p.error = s->error;
  return p;
}

void AudioEngine::cancel(int64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = streams_.find(id);
  if (it == streams_.end()) return;
  it->second->cancelled = true;
  streams_.erase(it);  // the worker keeps its own reference while it runs this stream
}

AudioStats AudioEngine::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

// Steps end at fixed frame counts: every multiple of the chunk, the frame that makes the first audio (lookahead +
// 1: do not wait for a full chunk then), and the end. So what a stream computes does not depend on when its
// frames arrived or how busy the worker was: a stream's audio is the same, bit for bit, alone or among others.
int64_t AudioEngine::next_boundary(const Stream& s, int64_t done) const {
  int64_t b = (done / s.chunk + 1) * s.chunk;
  if (done < s.lookahead + 1) b = std::min(b, s.lookahead + 1);
  return b;
}

bool AudioEngine::has_work(const Stream& s) const {
  if (s.busy || s.done || s.cancelled) return false;
  if (s.finished) return true;
  const int64_t pending = int64_t(s.pending.size()) / spec_.hidden;
  return pending > 0 && s.frames_done + pending >= next_boundary(s, s.frames_done);
}

void AudioEngine::worker() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    std::shared_ptr<Stream> pick;
    work_cv_.wait(lock, [&] {
      if (closing_) return true;
      for (auto& kv : streams_)
        if (has_work(*kv.second)) return true;
      return false;
    });
    if (closing_) return;
    // Earliest deadline first: a stream's deadline is when its listener runs out of audio (playing from its
    // first sample in real time); one still waiting for its first audio is due since it opened. So first audio
    // and a stream about to run dry go before streams that are well ahead.
    std::chrono::steady_clock::time_point best{};
    for (auto& kv : streams_) {
      const Stream& s = *kv.second;
      if (!has_work(s)) continue;
      const auto due = s.emitted == 0 ? s.opened
                                      : s.first_emit + std::chrono::microseconds(
                                            int64_t(1e6 * double(s.emitted) / double(spec_.sample_rate)));
      if (!pick || due < best) {
        pick = kv.second;
        best = due;
      }
    }
    if (!pick) continue;
    run_stream(*pick, lock);
    out_cv_.notify_all();
  }
}

void AudioEngine::emit(Stream& s, const float* sig, int64_t first, int64_t n, int64_t upto) {
  const int64_t lo = std::max(s.emitted, std::max<int64_t>(first, 0));
  const int64_t hi = std::min(first + n, upto);
  if (hi <= lo) return;
  if (lo != s.emitted)  // the graphs return contiguous ranges; a gap would be a bug, never silent
    throw Error("audio stream " + std::to_string(s.id) + ": samples from " + std::to_string(lo) + " after " +
                std::to_string(s.emitted));
  if (s.out.empty()) s.out_first = lo;
  if (s.emitted == 0) s.first_emit = std::chrono::steady_clock::now();
  s.out.insert(s.out.end(), sig + (lo - first), sig + (hi - first));
  s.emitted = hi;
  stats_.samples += hi - lo;
}

void AudioEngine::run_stream(Stream& s, std::unique_lock<std::mutex>& lock) {
  const int64_t E = spec_.hidden, spf = spec_.samples_per_frame, S = spec_.state_size;
  const bool final = s.finished;
  const bool speculate = s.lookahead < spec_.exact_lookahead;
  // The steps this run makes: up to each boundary the waiting frames reach (all of them at the end).
  std::vector<int64_t> steps;
  int64_t avail = int64_t(s.pending.size()) / E, pos = s.frames_done;
  while (avail > 0) {
    const int64_t need = std::min(next_boundary(s, pos) - pos, spec_.max_chunk);
    if (avail < need && !final) break;
    const int64_t m = std::min(need, avail);
    steps.push_back(m);
    pos += m;
    avail -= m;
  }
  const int64_t n = pos - s.frames_done;
  std::vector<float>& frames = taken_;  // the worker's own buffer: it only grows
  frames.assign(s.pending.begin(), s.pending.begin() + n * E);
  s.pending.erase(s.pending.begin(), s.pending.begin() + n * E);  // later frames stay for the next run
  s.busy = true;
  lock.unlock();
  std::string error;
  try {
    int64_t off = 0;
    for (const int64_t m : steps) {
      std::copy(frames.begin() + off * E, frames.begin() + (off + m) * E, in_.begin());
      int64_t done = s.frames_done, first = 0;
      Ort::Value ins[] = {view(in_.data(), {1, m, E}), view(s.state[s.cur].data(), {1, S}), view(&done, {1})};
      Ort::Value outs[] = {view(out_.data(), {1, m * spf}), view(s.state[1 - s.cur].data(), {1, S}), view(&first, {1})};
      auto t0 = std::chrono::steady_clock::now();
      step_->run(run_opts_, ins, 3, outs, 3);
      const double ms = ms_since(t0);
      s.cur = 1 - s.cur;
      off += m;
      lock.lock();
      s.frames_done += m;
      stats_.steps += 1;
      stats_.frames += m;
      stats_.step_ms += ms;
      emit(s, out_.data(), first, m * spf, INT64_MAX);  // samples no later frame changes
      lock.unlock();
      out_cv_.notify_all();
    }
    const int64_t total = std::max<int64_t>(0, spf * s.frames_done - spec_.hop);
    int64_t upto = -1;
    if (final) {
      upto = total;
    } else if (speculate) {
      // Speculate while the exact samples would not stay half a chunk ahead of real-time playback from the
      // first sample (before the first sample: always). Half a chunk: the audio a listener plays while the GPT
      // makes the next chunk at twice real time.
      const int64_t exact_front = spf * (s.frames_done - spec_.exact_lookahead);
      bool behind = s.emitted == 0;
      if (!behind) {
        const double played_s =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - s.first_emit).count();
        behind = exact_front < int64_t(played_s * double(spec_.sample_rate)) + spf * s.chunk / 2;
      }
      const int64_t target = std::min(total, spf * (s.frames_done - s.lookahead));
      if (behind && target > s.emitted) upto = target;
    }
    if (upto >= 0) {  // the rest as if the utterance ended here (final: it does)
      int64_t done = s.frames_done, first = 0;
      Ort::Value ins[] = {view(s.state[s.cur].data(), {1, S}), view(&done, {1})};
      Ort::Value outs[] = {view(flush_out_.data(), {1, spec_.flush_samples}), view(&first, {1})};
      auto t0 = std::chrono::steady_clock::now();
      flush_->run(run_opts_, ins, 2, outs, 2);
      const double ms = ms_since(t0);
      lock.lock();
      stats_.flushes += 1;
      stats_.flush_ms += ms;
      emit(s, flush_out_.data(), first, spec_.flush_samples, upto);
      lock.unlock();
    }
  } catch (const std::exception& e) {
    error = e.what();
  }
  lock.lock();
  s.busy = false;
  if (!error.empty()) {
    s.error = closing_ ? "the audio engine was closed" : error;
    s.done = true;
  } else if (final) {
    s.done = true;
  }
}

}  // namespace chattts
