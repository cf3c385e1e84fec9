// The fused DDIM step shared by the CPU and CUDA kernels: argument block and per-element math.
// The math rounds in the order of fastddim/reference.py's ddim_step (one rounding per torch op);
// built with -ffp-contract=off (CPU) and --fmad=false (CUDA) it matches it to the bit except the
// noise's libm ulps.
#pragma once
#include <cstdint>

#include "philox.h"

namespace fastddim {

enum Pred : int { kEpsilon = 0, kSample = 1, kVPrediction = 2 };
enum Clip : int { kClipNone = 0, kClipRange = 1, kClipThreshold = 2 };
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kNone = -1 };

// Pointers are on the kernel's device. table is the plan's (S, 6) table (fastddim.plan.COLUMNS);
// rng = (seed bits, first_index) as int64, read in the kernel so a CUDA graph replays with new ones.
struct StepArgs {
  const float* x;
  const void* out;
  int out_dtype;
  const float* table;
  int64_t j;
  const int64_t* rng;
  const float* s;  // (B,) dynamic-thresholding scales when clip == kClipThreshold
  float* prev;
  float* x0;       // nullptr: not written
  void* low;       // nullptr: not written
  int low_dtype;
  int64_t batch, numel;  // numel per sample
  int pred, clip;
  float clip_range;
  bool clipped_eps, sigma_hat, noise;
};

struct Coefs {
  float sqrt_a, sqrt_1ma, c_x0, c_eps, c_xt, sigma;
};

// x_{t-1} without the noise term; x0 gets the clipped x0 prediction. s: this sample's threshold.
template <int PRED>
FASTDDIM_HD float step_mean(float x, float o, const Coefs& c, int clip, float clip_range, float s,
                            bool clipped_eps, bool sigma_hat, float& x0) {
  float eps;
  if (PRED == kEpsilon) {
    x0 = (x - c.sqrt_1ma * o) / c.sqrt_a;
    eps = o;
  } else if (PRED == kSample) {
    x0 = o;
    eps = (x - c.sqrt_a * o) / c.sqrt_1ma;
  } else {
    x0 = c.sqrt_a * x - c.sqrt_1ma * o;
    eps = c.sqrt_a * o + c.sqrt_1ma * x;
  }
  // Written with comparisons so a NaN passes through, as torch.clamp does.
  if (clip == kClipRange) {
    x0 = x0 < -clip_range ? -clip_range : (x0 > clip_range ? clip_range : x0);
  } else if (clip == kClipThreshold) {
    x0 = (x0 < -s ? -s : (x0 > s ? s : x0)) / s;
  }
  if (clipped_eps) eps = (x - c.sqrt_a * x0) / c.sqrt_1ma;
  return sigma_hat ? c.c_x0 * x0 + c.c_xt * x : c.c_x0 * x0 + c.c_eps * eps;
}

void ddim_step_cpu(const StepArgs& a);
void normal_cpu(float* res, int64_t n, int64_t numel, uint64_t seed, int64_t first_index, int64_t step);
void philox_cpu(const int64_t* ctr, int64_t* res, int64_t m, uint64_t seed);
#ifdef FASTDDIM_WITH_CUDA
void ddim_step_cuda(const StepArgs& a);
void normal_cuda(float* res, int64_t n, int64_t numel, uint64_t seed, int64_t first_index, int64_t step);
void philox_cuda(const int64_t* ctr, int64_t* res, int64_t m, uint64_t seed);
#endif

}  // namespace fastddim
