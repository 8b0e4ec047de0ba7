// draftlm_cpu::int4_quantize: float weights -> 4-bit codes in super-blocks, error-minimising.
//
// Why a search instead of min-max: a group's extreme values set a min-max grid, so one
// outlier widens every step of its 32 values. llama.cpp's Q4_K quantizer (make_qkx2_quants
// / make_qkx3_quants) instead tries a few grids around the min-max one and, for the codes
// each gives, fits the group's scale and minimum by weighted least squares, keeping the
// fit with the smallest weighted squared error. On Qwen2.5-Coder-0.5B this is what most
// tensors need (its file stores 89% of the linear weights above 4 bits: Q5_0, Q6_K, Q8_0).
// The weight of a value is |x| + rms(group) by default (large weights matter more), or,
// with `importance` (mean squared activation per input column, from calibration text),
// importance[c] * sqrt(sigma2 + x^2): llama.cpp's importance-matrix weighting, which
// spends the grid on the columns whose errors reach the output.
//
// Output, as gguf_int4.Int4Groups: codes uint8 [N, K] (0..15), sub_scale uint8 [N, G],
// sub_min int8 [N, G], d and dmin float32 [N, S]; value = d * sub_scale * code + dmin *
// sub_min. The minimum is signed here (Q4_K's is not), so the fit is unconstrained.
// Each group's float scale and minimum are rounded onto their super-block's 8-bit grids
// and the codes chosen again against the rounded pair.
//
// Plain scalar C++ over 32-value groups (-O3 vectorises some inner loops), rows in parallel
// (at::parallel_for); it runs once per model load. Its speed against min-max groups:
// benchmarks/reports/cpu-kernels_*.md.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kSuper = 8;  // groups per super-block
constexpr float kLevels = 15.f;

struct Fit {
  float scale, minimum;
};

inline float level(float v) { return std::min(kLevels, std::max(0.f, std::nearbyint(v))); }

// Best (scale, minimum) for one group of 32 values `x` with weights `w` (see the top).
Fit fit_group(const float* x, const float* w, int nstep, float rmin, float rdelta) {
  float lo = x[0], hi = x[0], sum_w = 0.f, sum_x = 0.f;
  for (int i = 0; i < kGroup; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (hi - lo <= 0.f) return {0.f, lo};
  Fit best{(hi - lo) / kLevels, lo};
  float best_err = 0.f;
  for (int i = 0; i < kGroup; ++i) {
    const float diff = best.scale * level((x[i] - lo) / best.scale) + lo - x[i];
    best_err += w[i] * diff * diff;
  }
  for (int step = 0; step <= nstep; ++step) {
    const float iscale = (kLevels + rmin + rdelta * step) / (hi - lo);
    float sum_l = 0.f, sum_l2 = 0.f, sum_xl = 0.f;
    float l[kGroup];
    for (int i = 0; i < kGroup; ++i) {
      l[i] = level(iscale * (x[i] - lo));
      sum_l += w[i] * l[i];
      sum_l2 += w[i] * l[i] * l[i];
      sum_xl += w[i] * l[i] * x[i];
    }
    const float det = sum_w * sum_l2 - sum_l * sum_l;
    if (det <= 0.f) continue;
    const float scale = (sum_w * sum_xl - sum_x * sum_l) / det;
    const float minimum = (sum_l2 * sum_x - sum_l * sum_xl) / det;
    if (scale <= 0.f) continue;
    float err = 0.f;
    for (int i = 0; i < kGroup; ++i) {
      const float diff = scale * l[i] + minimum - x[i];
      err += w[i] * diff * diff;
    }
    if (err < best_err) {
      best_err = err;
      best = {scale, minimum};
    }
  }
  return best;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> int4_quantize(
    const at::Tensor& weight, const at::Tensor& importance, int64_t nstep, double rmin_,
    double rdelta_) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) % kGroup == 0,
              "int4_quantize: weight must be [N, K] with K a multiple of 32");
  const at::Tensor x = weight.to(at::kFloat).contiguous();
  const int64_t N = x.size(0), K = x.size(1), G = K / kGroup, S = (G + kSuper - 1) / kSuper;
  const bool weighted = importance.numel() > 0;
  TORCH_CHECK(!weighted || importance.numel() == K, "int4_quantize: importance must have ",
              K, " values (one per input column), got ", importance.numel());
  const at::Tensor imp = weighted ? importance.to(at::kFloat).contiguous() : importance;
  const float* imp_p = weighted ? imp.data_ptr<float>() : nullptr;
  const float rmin = static_cast<float>(rmin_), rdelta = static_cast<float>(rdelta_);
  const int steps = static_cast<int>(nstep);

  auto codes = at::empty({N, K}, x.options().dtype(at::kByte));
  auto sub_scale = at::zeros({N, G}, x.options().dtype(at::kByte));
  auto sub_min = at::zeros({N, G}, x.options().dtype(at::kChar));
  auto d = at::zeros({N, S}, x.options());
  auto dmin = at::zeros({N, S}, x.options());
  const float* xp = x.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  uint8_t* sp = sub_scale.data_ptr<uint8_t>();
  int8_t* mp = sub_min.data_ptr<int8_t>();
  float* dp = d.data_ptr<float>();
  float* dmp = dmin.data_ptr<float>();

  at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
    float w[kGroup];
    Fit fits[kSuper];
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = xp + r * K;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t g0 = s * kSuper, g1 = std::min(G, g0 + kSuper);
        float sumsq = 0.f;
        for (int64_t c = g0 * kGroup; c < g1 * kGroup; ++c) sumsq += row[c] * row[c];
        const float sigma2 = 2.f * sumsq / static_cast<float>((g1 - g0) * kGroup);
        float max_scale = 0.f, max_min = 0.f;
        for (int64_t g = g0; g < g1; ++g) {
          const float* xg = row + g * kGroup;
          if (weighted) {
            for (int i = 0; i < kGroup; ++i)
              w[i] = imp_p[g * kGroup + i] * std::sqrt(sigma2 + xg[i] * xg[i]);
          } else {
            float group_sq = 0.f;
            for (int i = 0; i < kGroup; ++i) group_sq += xg[i] * xg[i];
            const float rms = std::sqrt(group_sq / kGroup);
            for (int i = 0; i < kGroup; ++i) w[i] = rms + std::fabs(xg[i]);
          }
          fits[g - g0] = fit_group(xg, w, steps, rmin, rdelta);
          max_scale = std::max(max_scale, fits[g - g0].scale);
          max_min = std::max(max_min, std::fabs(fits[g - g0].minimum));
        }
        const float step_scale = max_scale / 255.f, step_min = max_min / 127.f;
        dp[r * S + s] = step_scale;
        dmp[r * S + s] = step_min;
        for (int64_t g = g0; g < g1; ++g) {
          const Fit& f = fits[g - g0];
          const float q_scale =
              step_scale > 0.f ? std::min(255.f, std::nearbyint(f.scale / step_scale)) : 0.f;
          const float q_min = step_min > 0.f
              ? std::min(127.f, std::max(-127.f, std::nearbyint(f.minimum / step_min))) : 0.f;
          sp[r * G + g] = static_cast<uint8_t>(q_scale);
          mp[r * G + g] = static_cast<int8_t>(q_min);
          const float scale = q_scale * step_scale, minimum = q_min * step_min;
          const float* xg = row + g * kGroup;
          uint8_t* cg = cp + r * K + g * kGroup;
          for (int i = 0; i < kGroup; ++i)
            cg[i] = scale > 0.f ? static_cast<uint8_t>(level((xg[i] - minimum) / scale)) : 0;
        }
      }
    }
  });
  return {codes, sub_scale, sub_min, d, dmin};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(draftlm_cpu, m) {
  m.def("int4_quantize(Tensor weight, Tensor importance, int nstep, float rmin, float rdelta) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(draftlm_cpu, CPU, m) { m.impl("int4_quantize", &int4_quantize); }
