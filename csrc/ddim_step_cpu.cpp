// Fused DDIM step on the CPU: one pass over x_t and the model output, noise made in the loop.
// Reads 4 B (x_t) + 4 or 2 B (model output) and writes 4 B (x_{t-1}) per element, plus 4 B (x0)
// and 2 B (low-precision copy) when asked. Parallel over Philox groups with at::parallel_for;
// each task works in chunks of kChunk groups: first the chunk's normals into a small buffer
// (Philox + Box-Muller, one group of 4 per call: libm calls, scalar), then a branch-free element
// loop that the compiler vectorises (noise and x0 are template flags, clipping is per-sample data).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "ddim_step.h"

namespace fastddim {
namespace {

constexpr int64_t kChunk = 256;   // groups: 1024 elements, 4 KB of noise, stays in L1
constexpr int64_t kGrain = 2048;  // groups per parallel task at least (8192 elements)

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

template <typename T>
void store_low(void* low, int64_t base, const float* prev, int64_t n) {
  T* dst = static_cast<T*>(low) + base;
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(prev[i]);
}

template <typename OutT, int PRED, bool NOISE, bool WRITE_X0>
void step_loop(const StepArgs& a) {
  const float* row = a.table + a.j * 6;
  const Coefs c{row[0], row[1], row[2], row[3], row[4], row[5]};
  const int64_t n = a.numel, groups = (n + 3) / 4;
  const uint64_t seed = static_cast<uint64_t>(a.rng[0]);
  const int64_t first = a.rng[1];
  const uint32_t step = static_cast<uint32_t>(a.j + 1);
  const OutT* out = static_cast<const OutT*>(a.out);

  at::parallel_for(0, a.batch * groups, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float z[kChunk * 4];
    for (int64_t p = begin; p < end;) {
      const int64_t b = p / groups, g0 = p - b * groups;
      const int64_t g1 = std::min({groups, g0 + (end - p), g0 + kChunk});
      if (NOISE) {
        const uint32_t sample = static_cast<uint32_t>(first + b);
        for (int64_t g = g0; g < g1; ++g) gaussian4(seed, static_cast<uint32_t>(g), sample, step, z + 4 * (g - g0));
      }
      const int64_t e0 = 4 * g0, len = std::min(n, 4 * g1) - e0, base = b * n + e0;
      const Mode m = sample_mode(a, b);
      const float* __restrict__ x = a.x + base;
      const OutT* __restrict__ o = out + base;
      float* __restrict__ prev = a.prev + base;
      float* __restrict__ x0 = WRITE_X0 ? a.x0 + base : nullptr;
      for (int64_t i = 0; i < len; ++i) {
        float x0v;
        const float v = step_mean<PRED>(x[i], to_float(o[i]), c, m, x0v);
        prev[i] = NOISE ? v + c.sigma * z[i] : v;
        if (WRITE_X0) x0[i] = x0v;
      }
      if (a.low_dtype == kBF16) store_low<c10::BFloat16>(a.low, base, prev, len);
      if (a.low_dtype == kF16) store_low<c10::Half>(a.low, base, prev, len);
      p += g1 - g0;
    }
  });
}

template <typename OutT, int PRED>
void step_flags(const StepArgs& a) {
  if (a.noise) {
    a.x0 ? step_loop<OutT, PRED, true, true>(a) : step_loop<OutT, PRED, true, false>(a);
  } else {
    a.x0 ? step_loop<OutT, PRED, false, true>(a) : step_loop<OutT, PRED, false, false>(a);
  }
}

template <typename OutT>
void step_pred(const StepArgs& a) {
  switch (a.pred) {
    case kEpsilon: return step_flags<OutT, kEpsilon>(a);
    case kSample: return step_flags<OutT, kSample>(a);
    default: return step_flags<OutT, kVPrediction>(a);
  }
}

}  // namespace

void ddim_step_cpu(const StepArgs& a) {
  switch (a.out_dtype) {
    case kF32: return step_pred<float>(a);
    case kBF16: return step_pred<c10::BFloat16>(a);
    default: return step_pred<c10::Half>(a);
  }
}

void normal_cpu(float* res, int64_t n, int64_t numel, uint64_t seed, int64_t first_index, int64_t step) {
  const int64_t groups = (numel + 3) / 4;
  at::parallel_for(0, n * groups, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / groups, g = p - b * groups;
      float z[4];
      gaussian4(seed, static_cast<uint32_t>(g), static_cast<uint32_t>(first_index + b), static_cast<uint32_t>(step), z);
      for (int64_t k = 0; k < 4 && 4 * g + k < numel; ++k) res[b * numel + 4 * g + k] = z[k];
    }
  });
}

void philox_cpu(const int64_t* ctr, int64_t* res, int64_t m, uint64_t seed) {
  for (int64_t i = 0; i < m; ++i) {
    uint32_t c[4];
    for (int k = 0; k < 4; ++k) c[k] = static_cast<uint32_t>(ctr[4 * i + k]);
    philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    for (int k = 0; k < 4; ++k) res[4 * i + k] = c[k];
  }
}

}  // namespace fastddim
