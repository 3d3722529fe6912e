// Loading ONNX Runtime at run time and the process-wide Ort::Env.
//
// Nothing links to libonnxruntime: the Python side finds the library inside the installed onnxruntime
// wheel (CPU or GPU build) and hands us its path; we dlopen it, take OrtGetApiBase and ask for the API
// version our headers were written for (ORT_API_MANUAL_INIT). One build so serves both wheels.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace chattts {

// Raised for every error that should reach Python as a RuntimeError with a clear message.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Loads the library at `path` once per process. Throws Error when the file is missing, is not an
// ONNX Runtime library, or is older than the API version we need. Later calls with another path throw.
void init_runtime(const std::string& path);
bool runtime_ready();
std::string runtime_library_path();
std::string runtime_version();                 // base->GetVersionString(), never Ort::GetVersionString()
std::vector<std::string> available_providers();

// The one Env of the process. Created on first use with a global intra-op pool of `threads` threads
// (0 = ONNX Runtime's default, at most kMaxThreads); every session shares it, so the threads of 23 chained
// sessions do not spin against each other. The thread count is fixed by the first caller.
constexpr int kMaxThreads = 1024;
Ort::Env& env(int threads);

// Whether the pool's threads spin between the short back-to-back Runs of a step (fast on an idle machine) or
// sleep (steadier when other processes want the cores). Like the thread count, fixed when the Env is created:
// set it before the first session; spinning() says what the Env uses.
void set_spinning(bool on);
bool spinning();
bool env_created();

// Session options every session of ours uses: global threads, full graph optimisation, and the
// execution provider ("cpu" or "cuda[:N]").
// `config` holds extra ONNX Runtime session config entries (key, value), e.g. session.disable_prepacking.
// own_threads > 0: the session gets its own intra-op pool of that many threads instead of the global one, and
// they never spin (1 = the calling thread alone: the audio path, which runs beside the GPT's pool).
Ort::SessionOptions make_session_options(const std::string& device, int threads,
                                         const std::vector<std::pair<std::string, std::string>>& config = {},
                                         int own_threads = 0);

}  // namespace chattts
