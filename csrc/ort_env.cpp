#include "ort_env.h"

#include <dlfcn.h>
#include <sys/stat.h>

#include <memory>
#include <mutex>

namespace chattts {
namespace {

std::mutex g_mutex;
void* g_handle = nullptr;
const OrtApiBase* g_base = nullptr;
std::string g_path;
std::unique_ptr<Ort::Env> g_env;
bool g_spin = true;

void require_ready() {
  if (!g_base) throw Error("ONNX Runtime is not loaded: call chattts_ort._core.init_runtime(path) first");
}

}  // namespace

void init_runtime(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_base) {
    if (path != g_path)
      throw Error("ONNX Runtime already loaded from " + g_path + "; cannot load a second copy from " + path);
    return;
  }
  struct stat st;
  if (stat(path.c_str(), &st) != 0) throw Error("libonnxruntime not found: " + path);
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    const char* why = dlerror();
    throw Error("cannot load libonnxruntime " + path + ": " + (why ? why : "unknown dlopen error"));
  }
  using GetApiBaseFn = const OrtApiBase* (*)();
  auto get_base = reinterpret_cast<GetApiBaseFn>(dlsym(handle, "OrtGetApiBase"));
  if (!get_base) {
    dlclose(handle);
    throw Error(path + " is not an ONNX Runtime library (no OrtGetApiBase symbol)");
  }
  const OrtApiBase* base = get_base();
  const OrtApi* api = base ? base->GetApi(ORT_API_VERSION) : nullptr;
  if (!api) {
    dlclose(handle);
    throw Error(path + " (ONNX Runtime " + std::string(base ? base->GetVersionString() : "?") +
                ") does not provide C API version " + std::to_string(ORT_API_VERSION));
  }
  Ort::InitApi(api);
  g_handle = handle;
  g_base = base;
  g_path = path;
}

bool runtime_ready() { return g_base != nullptr; }
std::string runtime_library_path() { return g_path; }

std::string runtime_version() {
  require_ready();
  return g_base->GetVersionString();
}

std::vector<std::string> available_providers() {
  require_ready();
  return Ort::GetAvailableProviders();
}

Ort::Env& env(int threads) {
  require_ready();
  if (threads < 0 || threads > kMaxThreads)
    throw Error("threads must be between 0 (ONNX Runtime's default) and " + std::to_string(kMaxThreads) + ", got " +
                std::to_string(threads));
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_env) {
    Ort::ThreadingOptions tp;
    tp.SetGlobalIntraOpNumThreads(threads > 0 ? threads : 0);
    tp.SetGlobalInterOpNumThreads(1);
    // Spinning keeps a worker hot between the short back-to-back Runs of one decode step; under load it burns
    // the cores other processes need (see set_spinning).
    tp.SetGlobalSpinControl(g_spin ? 1 : 0);
    g_env = std::make_unique<Ort::Env>(tp, ORT_LOGGING_LEVEL_ERROR, "chattts-ort");
  }
  return *g_env;
}

void set_spinning(bool on) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_env) g_spin = on;
}

bool spinning() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_spin;
}

bool env_created() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_env != nullptr;
}

Ort::SessionOptions make_session_options(const std::string& device, int threads,
                                         const std::vector<std::pair<std::string, std::string>>& config,
                                         int own_threads) {
  env(threads);
  Ort::SessionOptions so;
  for (auto& kv : config) so.AddConfigEntry(kv.first.c_str(), kv.second.c_str());
  if (own_threads > 0) {
    if (own_threads > kMaxThreads) throw Error("own_threads must be at most " + std::to_string(kMaxThreads));
    so.SetIntraOpNumThreads(own_threads);
    so.SetInterOpNumThreads(1);
    so.AddConfigEntry("session.intra_op.allow_spinning", "0");
  } else {
    so.DisablePerSessionThreads();
  }
  so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  so.SetExecutionMode(ExecutionMode::ORT_SEQUENTIAL);
  if (device.rfind("cuda", 0) == 0) {
    int device_id = 0;
    if (device.size() > 5 && device[4] == ':') device_id = std::stoi(device.substr(5));
    auto providers = available_providers();
    bool has_cuda = false;
    for (auto& p : providers) has_cuda |= (p == "CUDAExecutionProvider");
    if (!has_cuda)
      throw Error("device='" + device + "' asked for, but this onnxruntime build has no CUDAExecutionProvider "
                  "(install onnxruntime-gpu)");
    const OrtApi& api = Ort::GetApi();
    OrtCUDAProviderOptionsV2* cuda = nullptr;
    Ort::ThrowOnError(api.CreateCUDAProviderOptions(&cuda));
    std::unique_ptr<OrtCUDAProviderOptionsV2, void (*)(OrtCUDAProviderOptionsV2*)> guard(
        cuda, [](OrtCUDAProviderOptionsV2* p) { Ort::GetApi().ReleaseCUDAProviderOptions(p); });
    std::string id = std::to_string(device_id);
    const char* keys[] = {"device_id"};
    const char* values[] = {id.c_str()};
    Ort::ThrowOnError(api.UpdateCUDAProviderOptions(cuda, keys, values, 1));
    so.AppendExecutionProvider_CUDA_V2(*cuda);
  } else if (device != "cpu") {
    throw Error("unknown device '" + device + "' (use 'cpu' or 'cuda[:N]')");
  }
  return so;
}

}  // namespace chattts
