// draftlm::int4_linear: y = x @ W.T for 4-bit weights in groups of 32, on AVX2 CPUs.
//
// Why a kernel of our own: PyTorch's int4 CPU kernel (_weight_int4pack_mm_for_cpu) runs
// on bfloat16 activations and, on AVX2 machines without AVX512-BF16, decodes slower than
// fbgemm's int8 even though it reads half the bytes. This is the scheme llama.cpp uses for
// its Q4_1 x Q8_1 dot products: activations are quantized to int8 per group of 32 (one
// scale each), the 4-bit codes stay unsigned, and _mm256_maddubs_epi16 multiplies 32 code
// and activation bytes at a time (|15 * 127 * 2| fits int16, so nothing saturates).
//
// Weight layout (GGUF's Q4_0/Q4_1 block order, so a file's codes copy straight in):
//   codes   uint8 [N, K/2]: per group of 32, byte i holds code i (low nibble) and code
//           i + 16 (high nibble);
//   scale   float16 [N, K/32], minimum float16 [N, K/32]: value = scale * code + minimum.
// Activations: float32 [M, K]. Output float32 [M, N].
//
// Up to 32 rows (decode steps, verify passes), every output element is computed by the
// same instructions in the same order whatever M is and however the rows are split into
// blocks or threads, so a row's result in a verify pass of 6 equals its result alone
// (greedy speculative == greedy AR). More rows (prefill) take a dequantize + BLAS path.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kRowBlock = 4;  // activation rows that share one pass over a weight row
constexpr int64_t kMaxDotRows = 32;  // more rows than this go to dequantized_matmul

inline float half_to_float(const at::Half h) { return _cvtsh_ss(h.x); }

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// One row of activations -> int8 codes, their scale and the float sum per group.
void quantize_row(const float* x, int64_t groups, int8_t* q, float* d, float* sum) {
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + g * kGroup;
    float amax = 0.f, s = 0.f;
    for (int64_t i = 0; i < kGroup; ++i) {
      amax = std::max(amax, std::fabs(xg[i]));
      s += xg[i];
    }
    const float scale = amax / 127.f;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t i = 0; i < kGroup; ++i) {
      q[g * kGroup + i] = static_cast<int8_t>(std::nearbyint(xg[i] * inv));
    }
    d[g] = scale;
    sum[g] = s;
  }
}

// Half-precision values [n] times floats [n], as floats (8 at a time, then the tail).
inline void scale_by(const at::Half* h, const float* f, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(a, _mm256_loadu_ps(f + i)));
  }
  for (; i < n; ++i) out[i] = half_to_float(h[i]) * f[i];
}

inline float sum_of(const float* v, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(v + i));
  float total = hsum(acc);
  for (; i < n; ++i) total += v[i];
  return total;
}

inline __m256 group_dot(__m256i q, const int8_t* a, const float* scale, __m256 acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(scale), acc);
}

// R activation rows against one weight row: the 4-bit codes are unpacked once (two groups
// per 32-byte load) and used by all R rows. `scales[r]` holds code scale x activation scale
// per group, `mins[r]` minimum x activation sum per group. Each row sums even and odd
// groups into two registers of its own, in the same order for every R, so a row's result
// does not depend on R.
template <int R>
inline void dot_rows(const uint8_t* w, int64_t groups, const int8_t* const* xq,
                     float* const* scales, float* const* mins, float* out) {
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  __m256 even[R], odd[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 16));
    const __m256i lo = _mm256_and_si256(packed, low_mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_mask);
    const __m256i q0 = _mm256_permute2x128_si256(lo, hi, 0x20);  // group g: lo | hi nibbles
    const __m256i q1 = _mm256_permute2x128_si256(lo, hi, 0x31);  // group g + 1
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      even[r] = group_dot(q0, xq[r] + g * kGroup, scales[r] + g, even[r]);
      odd[r] = group_dot(q1, xq[r] + (g + 1) * kGroup, scales[r] + g + 1, odd[r]);
    }
  }
  if (g < groups) {  // an odd number of groups: the last one
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * 16));
    const __m128i mask = _mm256_castsi256_si128(low_mask);
    const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask),
                                       _mm_and_si128(packed, mask));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) even[r] = group_dot(q, xq[r] + g * kGroup, scales[r] + g, even[r]);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    out[r] = hsum(_mm256_add_ps(even[r], odd[r])) + sum_of(mins[r], groups);
  }
}

// Many rows (a prompt's prefill) are compute-bound: per row and group the byte dot
// product costs about as much as a float multiply-add per weight would, while a float
// GEMM reuses each weight across rows. So weights are dequantized, a block of rows at a
// time, and multiplied by BLAS. Verify passes (at most kMaxDotRows rows) never come here,
// so their rows stay bit-identical to one-row decode steps.
at::Tensor dequantized_matmul(const at::Tensor& x, const at::Tensor& codes,
                              const at::Tensor& scale, const at::Tensor& minimum) {
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), G = K / kGroup;
  constexpr int64_t kBlock = 2048;  // weight rows dequantized at once (<= 2048 x K floats)
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor block = at::empty({std::min(kBlock, N), K}, x.options());
  const uint8_t* wp = codes.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* mp = minimum.data_ptr<at::Half>();
  for (int64_t b0 = 0; b0 < N; b0 += kBlock) {
    const int64_t rows = std::min(kBlock, N - b0);
    float* bp = block.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = b0 + r;
        for (int64_t g = 0; g < G; ++g) {
          const uint8_t* w = wp + n * (K / 2) + g * 16;
          const float sg = half_to_float(sp[n * G + g]), mg = half_to_float(mp[n * G + g]);
          float* dst = bp + r * K + g * kGroup;
          for (int i = 0; i < 16; ++i) {
            dst[i] = sg * static_cast<float>(w[i] & 0x0F) + mg;
            dst[i + 16] = sg * static_cast<float>(w[i] >> 4) + mg;
          }
        }
      }
    });
    out.narrow(1, b0, rows).copy_(at::mm(x, block.narrow(0, 0, rows).t()));
  }
  return out;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const at::Tensor& minimum) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [M, K]");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte, "codes must be uint8 [N, K/2]");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && minimum.scalar_type() == at::kHalf,
              "scale and minimum must be float16");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(K % kGroup == 0 && codes.size(1) * 2 == K, "codes do not match x's K");
  const int64_t G = K / kGroup;
  TORCH_CHECK(scale.size(0) == N && scale.size(1) == G && minimum.sizes() == scale.sizes(),
              "scale/minimum must be [N, K/32]");
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = codes.contiguous(), sc = scale.contiguous(), mc = minimum.contiguous();

  if (M > kMaxDotRows) return dequantized_matmul(xc, wc, sc, mc);

  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor xd = at::empty({M, G}, x.options());
  at::Tensor xs = at::empty({M, G}, x.options());
  const float* xp = xc.data_ptr<float>();
  int8_t* xqp = xq.data_ptr<int8_t>();
  float* xdp = xd.data_ptr<float>();
  float* xsp = xs.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      quantize_row(xp + m * K, G, xqp + m * K, xdp + m * G, xsp + m * G);
    }
  });

  at::Tensor out = at::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const at::Half* sp = sc.data_ptr<at::Half>();
  const at::Half* mp = mc.data_ptr<at::Half>();

  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(2 * kRowBlock * G);
    float* scales[kRowBlock];
    float* mins[kRowBlock];
    const int8_t* rows_q[kRowBlock];
    float result[kRowBlock];
    for (int r = 0; r < kRowBlock; ++r) {
      scales[r] = buf.data() + r * G;
      mins[r] = buf.data() + (kRowBlock + r) * G;
    }
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = wp + n * (K / 2);
      for (int64_t mb = 0; mb < M; mb += kRowBlock) {
        const int rows = static_cast<int>(std::min(kRowBlock, M - mb));
        for (int r = 0; r < rows; ++r) {
          const int64_t row = mb + r;
          rows_q[r] = xqp + row * K;
          scale_by(sp + n * G, xdp + row * G, G, scales[r]);
          scale_by(mp + n * G, xsp + row * G, G, mins[r]);
        }
        switch (rows) {
          case 1: dot_rows<1>(w, G, rows_q, scales, mins, result); break;
          case 2: dot_rows<2>(w, G, rows_q, scales, mins, result); break;
          case 3: dot_rows<3>(w, G, rows_q, scales, mins, result); break;
          default: dot_rows<4>(w, G, rows_q, scales, mins, result); break;
        }
        for (int r = 0; r < rows; ++r) op[(mb + r) * N + n] = result[r];
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(draftlm_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor codes, Tensor scale, Tensor minimum) -> Tensor");
}

TORCH_LIBRARY_IMPL(draftlm_cpu, CPU, m) { m.impl("int4_linear", &int4_linear); }
