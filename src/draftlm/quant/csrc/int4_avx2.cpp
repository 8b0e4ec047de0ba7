// draftlm::int4_linear: y = x @ W.T for 4-bit weights in super-blocks, on AVX2 CPUs.
//
// Why a kernel of our own: PyTorch's int4 CPU kernel (_weight_int4pack_mm_for_cpu) runs
// on bfloat16 activations and, on AVX2 machines without AVX512-BF16, decodes slower than
// fbgemm's int8 even though it reads half the bytes. The arithmetic is that of llama.cpp's
// Q4_K x Q8_K products: activations quantized to int8 with one scale per 256 values, the
// 4-bit codes unsigned, _mm256_maddubs_epi16 multiplying code and activation bytes, 8-bit
// group scales applied in integers, one conversion to float per super-block of 256.
//
// Layout: weight rows in panels of 8, interleaved (as llama.cpp's repacked q4_K_8x8 for
// the same reason). A 32-byte vector holds 4 consecutive codes of each of the panel's 8
// rows, and the activation's matching 4 bytes are broadcast to all 8 lanes; one maddubs
// then gives each row two int16 partial sums. A group's 8 such products add up in int16
// (|sum| <= 16 * 15 * 127 < 2^15) and meet the group scales in one _mm256_madd_epi16 for
// all 8 rows. Integer multiplies are what limits this kernel once activations are reused
// (a verify pass, a prefill: about one 256-bit multiply per cycle on a Zen 3 core), and
// this costs 9 of them per 256 products per row instead of 16 with one weight row per
// vector.
// Outputs come out 8 rows wide, with no horizontal sums.
//
//   codes  uint8 [P, G, 128]: per panel p and group g, 4 vectors of 32 bytes; byte
//          4c + i of vector q holds code (32g + 4q + i) of row 8p + c in its low nibble
//          and code (32g + 4(q + 4) + i) in its high nibble;
//   scales uint8 [P, G, 16]: the group scale of row c at bytes 2c and 2c + 1;
//   mins   int8  [P, ceil(G/2), 16]: for groups 2h, 2h + 1: row c's minimums at 2c, 2c + 1;
//   d, dmin float32 [P, S, 8]: per super-block of 8 groups (the last may hold fewer);
//   value = d * scale * code + dmin * min.   P = ceil(N / 8), padding rows are zeros.
// Activations: float32 [M, K], K = 32 G. Output float32 [M, N].
//
// Every output element goes through the same instructions in the same order whatever M
// is and however rows are split into blocks or threads (integer sums are exact; the float
// steps per element do not depend on the block), so a row's result in a verify pass of 6
// (or a prefill) equals its result alone: greedy speculative == greedy AR.
//
// Threads: at::parallel_for (OpenMP; the build passes -fopenmp, without which the pragma
// is ignored and the kernel silently runs on one thread).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace draftlm {  // layer_handles.cpp: layers reached by an integer handle
int64_t keep(std::vector<at::Tensor> tensors);
std::vector<at::Tensor> kept(int64_t handle);
}  // namespace draftlm

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kSuper = 8;       // groups per super-block (256 values)
constexpr int64_t kRowBlock = 4;    // activation rows that share each unpacked weight vector

// One row of activations -> int8 codes, one scale per super-block, and the int16 sum of
// each group's codes (|sum| <= 32 * 127), padded with zeros to whole super-blocks.
void quantize_row(const float* x, int64_t groups, int8_t* q, float* d, int16_t* sums) {
  for (int64_t g0 = 0, s = 0; g0 < groups; g0 += kSuper, ++s) {
    const int64_t ng = std::min(kSuper, groups - g0), n = ng * kGroup;
    const float* xs = x + g0 * kGroup;
    float amax = 0.f;
    for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(xs[i]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    d[s] = amax / 127.f;
    for (int64_t i = 0; i < n; ++i) {
      q[g0 * kGroup + i] = static_cast<int8_t>(std::nearbyint(xs[i] * inv));
    }
    for (int64_t j = 0; j < kSuper; ++j) {
      int32_t total = 0;
      if (j < ng) {
        for (int64_t i = 0; i < kGroup; ++i) total += q[(g0 + j) * kGroup + i];
      }
      sums[g0 + j] = static_cast<int16_t>(total);
    }
  }
}

struct Weights {
  const uint8_t* codes;
  const uint8_t* scales;
  const int8_t* mins;
  const float* d;
  const float* dmin;
  int64_t groups, pairs, supers;
};

struct Activations {
  const int8_t* q;
  const float* d;
  const int16_t* sums;  // [M, supers * 8]
  int64_t K, supers;
};

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// R activation rows (m0...) against the 8 weight rows of panel p: out[r * ldo + c].
template <int R>
inline void panel_rows(const Weights& w, int64_t p, const Activations& a, int64_t m0,
                       __m256 (&res)[R]) {
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  const uint8_t* codes = w.codes + p * w.groups * 128;
  const uint8_t* scales = w.scales + p * w.groups * 16;
  const int8_t* mins = w.mins + p * w.pairs * 16;
  const float* d = w.d + p * w.supers * 8;
  const float* dmin = w.dmin + p * w.supers * 8;
  const int8_t* xq[R];
  const float* xd[R];
  const int16_t* xs[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    xq[r] = a.q + (m0 + r) * a.K;
    xd[r] = a.d + (m0 + r) * a.supers;
    xs[r] = a.sums + (m0 + r) * a.supers * kSuper;
    res[r] = _mm256_setzero_ps();
  }
  for (int64_t s = 0, g0 = 0; g0 < w.groups; ++s, g0 += kSuper) {
    const int64_t g1 = std::min(g0 + kSuper, w.groups);
    __m256i isum[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* cg = codes + g * 128;
      // A super-block ahead: the hardware prefetcher alone leaves a decode step (one
      // activation row, little work per byte) waiting on memory.
      _mm_prefetch(reinterpret_cast<const char*>(cg + 1024), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(cg + 1088), _MM_HINT_T0);
      __m256i acc[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cg + q * 32));
        const __m256i lo = _mm256_and_si256(packed, low_mask);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_mask);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const int8_t* x = xq[r] + g * kGroup + 4 * q;
          acc[r] = _mm256_add_epi16(acc[r], _mm256_maddubs_epi16(lo, bcast4(x)));
          acc[r] = _mm256_add_epi16(acc[r], _mm256_maddubs_epi16(hi, bcast4(x + 16)));
        }
      }
      const __m256i sc = _mm256_cvtepu8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + g * 16)));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(acc[r], sc));
    }
    // The minimums: per row c, sum over groups of min * (sum of the group's activations).
    __m256i msum[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) msum[r] = _mm256_setzero_si256();
    for (int64_t h = g0 / 2; h < (g1 + 1) / 2; ++h) {
      const __m256i mn = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + h * 16)));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, xs[r] + 2 * h, 4);
        msum[r] = _mm256_add_epi32(msum[r], _mm256_madd_epi16(mn, _mm256_set1_epi32(pair)));
      }
    }
    const __m256 ds = _mm256_loadu_ps(d + s * 8), dms = _mm256_loadu_ps(dmin + s * 8);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 dx = _mm256_set1_ps(xd[r][s]);
      res[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_mul_ps(ds, dx), res[r]);
      res[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(msum[r]), _mm256_mul_ps(dms, dx), res[r]);
    }
  }
}

template <int R>
inline void panel_block(const Weights& w, int64_t p, const Activations& a, int64_t m0,
                        float* out, int64_t N) {
  __m256 res[R];
  panel_rows<R>(w, p, a, m0, res);
  const int64_t n0 = p * 8, cols = std::min<int64_t>(8, N - n0);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    float* o = out + (m0 + r) * N + n0;
    if (cols == 8) {
      _mm256_storeu_ps(o, res[r]);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, res[r]);
      std::copy(tmp, tmp + cols, o);
    }
  }
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const at::Tensor& mins, const at::Tensor& d, const at::Tensor& dmin,
                       int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [M, K]");
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.size(2) == 128,
              "codes must be uint8 [P, G, 128]");
  TORCH_CHECK(scales.scalar_type() == at::kByte && mins.scalar_type() == at::kChar,
              "scales must be uint8 and mins int8");
  TORCH_CHECK(d.scalar_type() == at::kFloat && dmin.scalar_type() == at::kFloat,
              "d and dmin must be float32");
  const int64_t M = x.size(0), K = x.size(1), P = codes.size(0);
  TORCH_CHECK(K % kGroup == 0, "K must be a multiple of 32");
  const int64_t G = K / kGroup, H = (G + 1) / 2, S = (G + kSuper - 1) / kSuper;
  TORCH_CHECK(codes.size(1) == G, "codes do not match x's K");
  TORCH_CHECK(N > 8 * (P - 1) && N <= 8 * P, "N does not match the panels");
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == P && scales.size(1) == G &&
                  scales.size(2) == 16, "scales must be [P, G, 16]");
  TORCH_CHECK(mins.dim() == 3 && mins.size(0) == P && mins.size(1) == H && mins.size(2) == 16,
              "mins must be [P, ceil(G/2), 16]");
  TORCH_CHECK(d.dim() == 3 && d.size(0) == P && d.size(1) == S && d.size(2) == 8 &&
                  dmin.sizes() == d.sizes(), "d/dmin must be [P, ceil(K/256), 8]");
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = codes.contiguous(), scc = scales.contiguous(), mnc = mins.contiguous(),
                   dc = d.contiguous(), dmc = dmin.contiguous();

  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor xd = at::empty({M, S}, x.options());
  at::Tensor xs = at::empty({M, S * kSuper}, x.options().dtype(at::kShort));
  const float* xp = xc.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      quantize_row(xp + m * K, G, xq.data_ptr<int8_t>() + m * K, xd.data_ptr<float>() + m * S,
                   xs.data_ptr<int16_t>() + m * S * kSuper);
    }
  });
  const Weights w{wc.data_ptr<uint8_t>(), scc.data_ptr<uint8_t>(), mnc.data_ptr<int8_t>(),
                  dc.data_ptr<float>(), dmc.data_ptr<float>(), G, H, S};
  const Activations a{xq.data_ptr<int8_t>(), xd.data_ptr<float>(), xs.data_ptr<int16_t>(), K, S};

  at::Tensor out = at::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  // Panels split across threads; each panel (G * 128 bytes: 6 KB at K = 1536) stays in
  // cache while every block of activation rows passes over it, so the weights stream from
  // memory once per call.
  at::parallel_for(0, P, 4, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t mb = 0; mb < M; mb += kRowBlock) {
        switch (std::min(kRowBlock, M - mb)) {
          case 1: panel_block<1>(w, p, a, mb, op, N); break;
          case 2: panel_block<2>(w, p, a, mb, op, N); break;
          case 3: panel_block<3>(w, p, a, mb, op, N); break;
          default: panel_block<4>(w, p, a, mb, op, N); break;
        }
      }
    }
  });
  return out;
}

int64_t int4_register(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                      const at::Tensor& d, const at::Tensor& dmin) {
  return draftlm::keep({codes, scales, mins, d, dmin});
}

at::Tensor int4_linear_handle(const at::Tensor& x, int64_t handle, int64_t N) {
  const std::vector<at::Tensor> w = draftlm::kept(handle);
  return int4_linear(x, w[0], w[1], w[2], w[3], w[4], N);
}

}  // namespace

TORCH_LIBRARY(draftlm_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor codes, Tensor scales, Tensor mins, Tensor d, "
        "Tensor dmin, int n) -> Tensor");
  m.def("int4_register(Tensor codes, Tensor scales, Tensor mins, Tensor d, Tensor dmin) -> int");
  m.def("int4_linear_handle(Tensor x, int handle, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(draftlm_cpu, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int4_linear_handle", &int4_linear_handle);
}

TORCH_LIBRARY_IMPL(draftlm_cpu, CompositeExplicitAutograd, m) {
  m.impl("int4_register", &int4_register);
}
