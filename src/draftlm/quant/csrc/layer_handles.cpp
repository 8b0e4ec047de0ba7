// Packed layer weights held in C++ and reached by an integer handle (draftlm::keep/kept,
// op draftlm_cpu::release).
//
// Why: torch.compile checks a guard for every tensor a compiled step reads from the model
// before each call, and with five weight tensors per int4 layer those checks were a large
// share of a small model's decode step (benchmarks/reports/compiled-step_*.md); an
// integer attribute costs next to nothing to check.
// The int4 and int8 kernels both register their layers here; Python frees a handle when
// its layer is collected (weakref.finalize -> release).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace draftlm {

namespace {
std::mutex registry_mutex;
std::unordered_map<int64_t, std::vector<at::Tensor>> registry;
int64_t next_handle = 0;
}  // namespace

int64_t keep(std::vector<at::Tensor> tensors) {
  for (auto& t : tensors) t = t.contiguous();
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry[next_handle] = std::move(tensors);
  return next_handle++;
}

std::vector<at::Tensor> kept(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry.find(handle);
  TORCH_CHECK(it != registry.end(), "no registered layer with handle ", handle);
  return it->second;
}

void release(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.erase(handle);
}

}  // namespace draftlm

TORCH_LIBRARY_FRAGMENT(draftlm_cpu, m) { m.def("release(int handle) -> ()"); }

TORCH_LIBRARY_IMPL(draftlm_cpu, CompositeExplicitAutograd, m) {
  m.impl("release", &draftlm::release);
}
