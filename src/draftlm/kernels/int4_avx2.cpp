// draftlm::int4_linear: y = x @ W.T for 4-bit weights in super-blocks, on AVX2 CPUs.
//
// Why a kernel of our own: PyTorch's int4 CPU kernel (_weight_int4pack_mm_for_cpu) runs
// on bfloat16 activations and, on AVX2 machines without AVX512-BF16, decodes slower than
// fbgemm's int8 even though it reads half the bytes. This is the scheme llama.cpp uses for
// its Q4_K x Q8_K dot products: activations are quantized to int8 with one scale per 256
// values, the 4-bit codes stay unsigned, _mm256_maddubs_epi16 multiplies 32 code and
// activation bytes at a time (|15 * 127 * 2| fits int16, so nothing saturates), and the
// 8-bit group scales multiply in integers (_mm256_madd_epi16), so a super-block of 8 groups
// costs one conversion to float instead of eight.
//
// Weight layout (GGUF's Q4_K order, so a file's Q4_K blocks copy straight in):
//   codes  uint8 [N, ceil(G/2) * 32]: groups of 32 in pairs; byte i of a pair holds code i
//          of the first group (low nibble) and code i of the second (high nibble); a lone
//          last group uses the low nibbles only;
//   sub_scale uint8 [N, G], sub_min int8 [N, G]: per group of 32;
//   d, dmin float32 [N, S]: per super-block of 8 groups (the last may hold fewer);
//   value = d * sub_scale * code + dmin * sub_min.
// Activations: float32 [M, K], K = 32 G. Output float32 [M, N].
//
// Every output element is computed by the same instructions in the same order whatever M
// is and however rows are split into blocks or threads, so a row's result in a verify pass
// of 6 (or a prefill) equals its result alone: greedy speculative == greedy AR.
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

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kSuper = 8;       // groups per super-block (256 values)
constexpr int64_t kRowBlock = 4;    // activation rows that share one pass over a weight row
constexpr int64_t kRowChunk = 32;   // activation rows kept in cache while weights stream

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

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
  const uint8_t* sub_scale;
  const int8_t* sub_min;
  const float* d;
  const float* dmin;
  int64_t groups, supers, row_bytes;
};

struct Activations {
  const int8_t* q;
  const float* d;
  const int16_t* sums;  // [M, supers * 8]
  int64_t K, groups, supers;
};

// 8 int16 values of one 128-bit lane: a group's scale to all 16 words of both lanes.
inline __m256i word(const __m256i v, int j) {
  return _mm256_shuffle_epi8(v, _mm256_set1_epi16(static_cast<int16_t>((2 * j + 1) << 8 | 2 * j)));
}

inline float hsum128(__m128 v) {
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}

// R activation rows against weight row n: each 32-byte load of codes (two groups) is
// unpacked once and used by all R rows. Per super-block a row sums its group products in
// int32 (scaled by the 8-bit group scales, broadcast by byte shuffles), the minimums' part
// as one 8-wide integer dot product with the activation sums, then adds both to float
// registers once.
template <int R>
inline void dot_rows(const Weights& w, int64_t n, const Activations& a, int64_t m0,
                     float* out) {
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  const uint8_t* codes = w.codes + n * w.row_bytes;
  const uint8_t* sc = w.sub_scale + n * w.groups;
  const int8_t* mn = w.sub_min + n * w.groups;
  const float* d = w.d + n * w.supers;
  const float* dmin = w.dmin + n * w.supers;
  const int8_t* xq[R];
  const float* xd[R];
  const int16_t* xs[R];
  __m256 acc[R];
  __m128 macc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    xq[r] = a.q + (m0 + r) * a.K;
    xd[r] = a.d + (m0 + r) * a.supers;
    xs[r] = a.sums + (m0 + r) * a.supers * kSuper;
    acc[r] = _mm256_setzero_ps();
    macc[r] = _mm_setzero_ps();
  }
  for (int64_t s = 0, g0 = 0; g0 < w.groups; ++s, g0 += kSuper) {
    const int64_t ng = std::min(kSuper, w.groups - g0);
    __m128i sc8, mn8;
    if (ng == kSuper) {
      sc8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + g0));
      mn8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + g0));
    } else {  // a short last super-block: zeros past its groups
      alignas(16) uint8_t tsc[16] = {0};
      alignas(16) int8_t tmn[16] = {0};
      std::copy(sc + g0, sc + g0 + ng, tsc);
      std::copy(mn + g0, mn + g0 + ng, tmn);
      sc8 = _mm_load_si128(reinterpret_cast<const __m128i*>(tsc));
      mn8 = _mm_load_si128(reinterpret_cast<const __m128i*>(tmn));
    }
    const __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sc8));
    const __m128i mins = _mm_cvtepi8_epi16(mn8);
    const uint8_t* cs = codes + g0 * 16;
    // Two super-blocks ahead: the hardware prefetcher alone leaves a decode step (one
    // activation row, little work per byte) waiting on memory.
    _mm_prefetch(reinterpret_cast<const char*>(cs + 256), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(cs + 320), _MM_HINT_T0);
    __m256i isum[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
    int j = 0;
    for (; j + 2 <= ng; j += 2) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cs + j * 16));
      const __m256i lo = _mm256_and_si256(packed, low_mask);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_mask);
      const __m256i s0 = word(scales, j), s1 = word(scales, j + 1);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int8_t* x = xq[r] + (g0 + j) * kGroup;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + kGroup));
        const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), s0);
        const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), s1);
        isum[r] = _mm256_add_epi32(isum[r], _mm256_add_epi32(p0, p1));
      }
    }
    if (j < ng) {  // a lone last group: the low nibbles of a padded pair
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cs + j * 16));
      const __m256i lo = _mm256_and_si256(packed, low_mask);
      const __m256i s0 = word(scales, j);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256i x0 =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[r] + (g0 + j) * kGroup));
        isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), s0));
      }
    }
    const float ds = d[s], dm = dmin[s];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const float dx = xd[r][s];
      const __m128i sums = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xs[r] + g0));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(ds * dx), acc[r]);
      macc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_madd_epi16(mins, sums)), _mm_set1_ps(dm * dx),
                             macc[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + hsum128(macc[r]);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& sub_scale,
                       const at::Tensor& sub_min, const at::Tensor& d, const at::Tensor& dmin) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [M, K]");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte, "codes must be uint8");
  TORCH_CHECK(sub_scale.scalar_type() == at::kByte && sub_min.scalar_type() == at::kChar,
              "sub_scale must be uint8 and sub_min int8");
  TORCH_CHECK(d.scalar_type() == at::kFloat && dmin.scalar_type() == at::kFloat,
              "d and dmin must be float32");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(K % kGroup == 0, "K must be a multiple of 32");
  const int64_t G = K / kGroup, S = (G + kSuper - 1) / kSuper;
  TORCH_CHECK(codes.size(1) == (G + 1) / 2 * 32, "codes do not match x's K");
  TORCH_CHECK(sub_scale.size(0) == N && sub_scale.size(1) == G && sub_min.sizes() == sub_scale.sizes(),
              "sub_scale/sub_min must be [N, K/32]");
  TORCH_CHECK(d.size(0) == N && d.size(1) == S && dmin.sizes() == d.sizes(),
              "d/dmin must be [N, ceil(K/256)]");
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = codes.contiguous(), scc = sub_scale.contiguous(),
                   mnc = sub_min.contiguous(), dc = d.contiguous(), dmc = dmin.contiguous();

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
                  dc.data_ptr<float>(), dmc.data_ptr<float>(), G, S, codes.size(1)};
  const Activations a{xq.data_ptr<int8_t>(), xd.data_ptr<float>(), xs.data_ptr<int16_t>(), K, G, S};

  at::Tensor out = at::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  // Rows in chunks (a prefill's activations stay in cache while the weights stream past
  // once per chunk); weight rows split across threads.
  for (int64_t c0 = 0; c0 < M; c0 += kRowChunk) {
    const int64_t c1 = std::min(M, c0 + kRowChunk);
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      float result[kRowBlock];
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t mb = c0; mb < c1; mb += kRowBlock) {
          const int rows = static_cast<int>(std::min(kRowBlock, c1 - mb));
          switch (rows) {
            case 1: dot_rows<1>(w, n, a, mb, result); break;
            case 2: dot_rows<2>(w, n, a, mb, result); break;
            case 3: dot_rows<3>(w, n, a, mb, result); break;
            default: dot_rows<4>(w, n, a, mb, result); break;
          }
          for (int r = 0; r < rows; ++r) op[(mb + r) * N + n] = result[r];
        }
      }
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(draftlm_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor codes, Tensor sub_scale, Tensor sub_min, Tensor d, "
        "Tensor dmin) -> Tensor");
}

TORCH_LIBRARY_IMPL(draftlm_cpu, CPU, m) { m.impl("int4_linear", &int4_linear); }
