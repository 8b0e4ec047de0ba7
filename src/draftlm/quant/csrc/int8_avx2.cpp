// draftlm_cpu::int8_linear: y = x @ W.T for int8 weights (one scale per output channel)
// and float32 activations, on AVX2 CPUs: weight-only int8.
//
// Why a kernel of our own: fbgemm (PyTorch's quantized::linear_dynamic) quantizes the
// activations too, with one scale for the whole batch, costs far more per call than a
// small layer's bytes need, and is reached from a compiled decode step only through a
// Python custom op; PyTorch's own weight-only op (_weight_int8pack_mm) is slower still on
// AVX2. Here the activations stay float32 (no activation error at all, and no batch-wide
// scale), the weights are full 8-bit (|q| <= 127: no int16 pair sums to keep from
// saturating), and the call is one C++ op on an integer handle. Measured figures:
// benchmarks/reports/cpu-kernels_*.md.
//
// Arithmetic: each weight byte is sign-extended and converted to float (8 per vector) and
// multiplied into float accumulators; each activation row keeps 4 accumulators (k mod 4)
// to hide the FMA latency, and rows go in blocks of 3 (12 accumulators in registers).
// A decode step (one row) is memory-bound. Beyond a few rows the float multiplies bound
// it (8 products per FMA where fbgemm's byte products do 32), which is why rows go in
// blocks of 3 (more rows share each converted weight vector) and why each row block
// converts the panel's bytes itself rather than reading a float copy made once (the FMAs,
// not the conversions, are the limit). Timings per row count: benchmarks/int4_kernel.py.
//
// Layout: weight rows in panels of 8, column-interleaved, as the int4 kernel: codes int8
// [P, K, 8], byte c of position k in panel p is W[8p + c, k]; scale float32 [8P] (zero
// for padding rows). One vector of the panel's 8 bytes at position k meets the broadcast
// activation x[k]: outputs come out 8 rows wide, with no horizontal sums.
//
// Every output element goes through the same instructions in the same order whatever M
// is, and however rows are split into blocks or threads: a row's result in a verify pass
// of 6 (or a prefill) is bit-for-bit its result alone, so greedy speculative == greedy AR.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace draftlm {  // layer_handles.cpp: layers reached by an integer handle
int64_t keep(std::vector<at::Tensor> tensors);
std::vector<at::Tensor> kept(int64_t handle);
}  // namespace draftlm

namespace {

constexpr int64_t kRowBlock = 3;  // activation rows per pass over a panel (12 accumulators)

inline __m256 widen8(const int8_t* w) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}

// The panel's 8 weights at position k as floats: converted from the bytes, or read from a
// panel converted once beforehand (same values, so the same results bit for bit).
inline __m256 weights8(const int8_t* w, int64_t k) { return widen8(w + k * 8); }
inline __m256 weights8(const float* w, int64_t k) { return _mm256_loadu_ps(w + k * 8); }

// R activation rows (x[0..R)) against one panel [K, 8]: out[r * N + c] = scale[c] * dot.
template <int R, typename W>
inline void panel_block(const W* w, const float* scale, int64_t K, const float* x,
                        float* out, int64_t N, int64_t cols) {
  __m256 acc[R][4];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    // A kilobyte ahead, as in the int4 kernel: with one activation row there is little
    // work per byte and the hardware prefetcher alone leaves the step waiting on memory.
    if constexpr (sizeof(W) == 1) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k * 8 + 1024), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m256 wf = weights8(w, k + j);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        acc[r][j & 3] = _mm256_fmadd_ps(wf, _mm256_broadcast_ss(x + r * K + k + j), acc[r][j & 3]);
      }
    }
  }
  // The tail (K mod 8 positions) keeps each position's accumulator (k mod 4, and k is a
  // multiple of 8 here); constant indices keep the accumulators in registers.
#pragma GCC unroll 8
  for (int j = 0; j < 7; ++j) {
    if (k + j < K) {
      const __m256 wf = weights8(w, k + j);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        acc[r][j & 3] = _mm256_fmadd_ps(wf, _mm256_broadcast_ss(x + r * K + k + j), acc[r][j & 3]);
      }
    }
  }
  const __m256 s = _mm256_loadu_ps(scale);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]),
                                     _mm256_add_ps(acc[r][2], acc[r][3]));
    const __m256 y = _mm256_mul_ps(sum, s);
    float* o = out + r * N;
    if (cols == 8) {
      _mm256_storeu_ps(o, y);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, y);
      std::copy(tmp, tmp + cols, o);
    }
  }
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [M, K]");
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kChar && codes.size(2) == 8,
              "codes must be int8 [P, K, 8]");
  const int64_t M = x.size(0), K = x.size(1), P = codes.size(0);
  TORCH_CHECK(codes.size(1) == K, "codes do not match x's K");
  TORCH_CHECK(N > 8 * (P - 1) && N <= 8 * P, "N does not match the panels");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == 8 * P,
              "scale must be float32 [8 * panels]");
  const at::Tensor xc = x.contiguous(), wc = codes.contiguous(), sc = scale.contiguous();
  const float* xp = xc.data_ptr<float>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  at::Tensor out = at::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  // Panels split across threads; a panel (K * 8 bytes) stays in cache while every block of
  // activation rows passes over it, so the weights stream from memory once per call.
  at::parallel_for(0, P, 8, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int8_t* w = wp + p * K * 8;
      const float* s = sp + p * 8;
      const int64_t cols = std::min<int64_t>(8, N - p * 8);
      for (int64_t m = 0; m < M; m += kRowBlock) {
        const float* xm = xp + m * K;
        float* om = op + m * N + p * 8;
        switch (std::min(kRowBlock, M - m)) {
          case 1: panel_block<1>(w, s, K, xm, om, N, cols); break;
          case 2: panel_block<2>(w, s, K, xm, om, N, cols); break;
          default: panel_block<3>(w, s, K, xm, om, N, cols); break;
        }
      }
    }
  });
  return out;
}

int64_t int8_register(const at::Tensor& codes, const at::Tensor& scale) {
  return draftlm::keep({codes, scale});
}

at::Tensor int8_linear_handle(const at::Tensor& x, int64_t handle, int64_t N) {
  const std::vector<at::Tensor> w = draftlm::kept(handle);
  return int8_linear(x, w[0], w[1], N);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(draftlm_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor codes, Tensor scale, int n) -> Tensor");
  m.def("int8_register(Tensor codes, Tensor scale) -> int");
  m.def("int8_linear_handle(Tensor x, int handle, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(draftlm_cpu, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int8_linear_handle", &int8_linear_handle);
}

TORCH_LIBRARY_IMPL(draftlm_cpu, CompositeExplicitAutograd, m) {
  m.impl("int8_register", &int8_register);
}
