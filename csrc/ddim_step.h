// The fused step shared by the CPU and CUDA kernels: argument block and per-element math, for
// DDIM and for DPM-Solver++(2M) (the solver code: one op, one kernel per backend with a switch),
// unguided or guided (the guide code: CFG, CFG++), and the rescale's per-sample reduction.
// The math rounds in the order of fastddim/reference.py's ddim_step / dpm_solver_step (one
// rounding per torch op); built with -ffp-contract=off (CPU) and --fmad=false (CUDA) it matches
// it to the bit except the noise's libm ulps.
#pragma once
#include <cstdint>

#include "philox.h"

namespace fastddim {

enum Pred : int { kEpsilon = 0, kSample = 1, kVPrediction = 2 };
enum Clip : int { kClipNone = 0, kClipRange = 1, kClipThreshold = 2 };
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kNone = -1 };
// As fastddim/_ops.py's SOLVER_*: DDIM, DPM-Solver++ first order, second order (reads x0_prev).
enum Solver : int { kSolverDdim = 0, kSolverDpm1 = 1, kSolverDpm2 = 2 };
// As fastddim/_ops.py's GUIDE_*: none; CFG (g = u + w (c - u), optionally rescaled per sample);
// CFG++ (x0 from g, the direction's eps from u; DDIM only).
enum Guide : int { kGuideNone = 0, kGuideCfg = 1, kGuideCfgpp = 2 };

// Pointers are on the kernel's device. table is the plan's (S, 6) table (fastddim.plan.COLUMNS,
// or DPM_COLUMNS for the DPM solver codes);
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
  float* x0;       // nullptr: not written (the DPM solver codes always write it)
  void* low;       // nullptr: not written
  int low_dtype;
  int64_t batch, numel;  // numel per sample
  int pred, clip;
  float clip_range;
  bool clipped_eps, sigma_hat, noise;
};

// The solver's own arguments, apart from StepArgs: a larger StepArgs (a CUDA kernel parameter, by
// value) changed the DDIM kernels' registers (nvcc 13, sm_90: 43-45 -> 48 and other spills); an
// extra kernel parameter does not.
struct SolverArgs {
  int solver;            // kSolverDdim, kSolverDpm1, kSolverDpm2
  const float* x0_prev;  // the previous step's x0, read by kSolverDpm2 only (else nullptr)
};

// Guidance's arguments, apart from StepArgs for the same reason as SolverArgs. out (StepArgs) is
// the conditional output c, out_uncond the unconditional one u (out's dtype). With ratio (B,)
// (std(c) / std(g) per sample, rescale_ratio) g = phi * (g * ratio[b]) + one_m_phi * g, as
// diffusers' rescale_noise_cfg with (1 - phi) rounded once from double, as torch does a Python float.
struct GuideArgs {
  const void* out_uncond;  // nullptr when guide == kGuideNone
  int guide;               // kGuideNone, kGuideCfg, kGuideCfgpp
  float w, phi, one_m_phi;
  const float* ratio;      // (B,) or nullptr: no rescale (kGuideCfg only)
};

struct Coefs {
  float sqrt_a, sqrt_1ma, c_x0, c_eps, c_xt, sigma;
};

// The same six table columns under DPM_COLUMNS' names (a DPM plan's row j).
struct DpmCoefs {
  float sqrt_a, sqrt_1ma, c_x, c_d0, c_d1, r_inv;
};

FASTDDIM_HD DpmCoefs dpm_coefs(const Coefs& c) { return {c.sqrt_a, c.sqrt_1ma, c.c_x0, c.c_eps, c.c_xt, c.sigma}; }

// How x0 is clipped and which update is used, resolved per sample so the element math has no
// branches (the CPU loop vectorises, GPU warps do not diverge): x0 = clamp(x0, lo, hi) / div with
// (lo, hi, div) = (-inf, inf, 1) for no clipping, (-r, r, 1) for a range, (-s, s, s) for dynamic
// thresholding. Dividing by 1 and clamping to +-inf are exact, so this rounds as the reference.
struct Mode {
  float lo, hi, div;
  bool clipped_eps, sigma_hat;
};

FASTDDIM_HD Mode sample_mode(const StepArgs& a, int64_t b) {
  const float inf = INFINITY;
  if (a.clip == kClipThreshold) {
    const float s = a.s[b];
    return {-s, s, s, a.clipped_eps, a.sigma_hat};
  }
  if (a.clip == kClipRange) return {-a.clip_range, a.clip_range, 1.0f, a.clipped_eps, a.sigma_hat};
  return {-inf, inf, 1.0f, a.clipped_eps, a.sigma_hat};
}

// The x0 prediction from the model output (reference.predict_x0), before clipping.
template <int PRED>
FASTDDIM_HD float predict_x0(float x, float o, float sqrt_a, float sqrt_1ma) {
  if (PRED == kEpsilon) return (x - sqrt_1ma * o) / sqrt_a;
  if (PRED == kSample) return o;
  return sqrt_a * x - sqrt_1ma * o;
}

// Written with comparisons so a NaN passes through, as torch.clamp does.
FASTDDIM_HD float clip_x0(float x0, const Mode& m) { return (x0 < m.lo ? m.lo : (x0 > m.hi ? m.hi : x0)) / m.div; }

// CFG's combine in diffusers' op order (sub, mul, add): the step's and the rescale reduction's.
FASTDDIM_HD float combine(float u, float c, float w) { return u + w * (c - u); }

// The output the step converts to x0, from c (out) and u (out_uncond): c itself unguided; the
// combine, then with rescale the rescale by this sample's ratio r (a select, not a multiply by 1:
// an inf or NaN g passes as it is); CFG++: the combine (its eps is u's, in step_mean).
template <int GUIDE>
FASTDDIM_HD float guided(float u, float c, const GuideArgs& ga, bool rescale, float r) {
  if (GUIDE == kGuideNone) return c;
  const float g = combine(u, c, ga.w);
  if (GUIDE == kGuideCfgpp) return g;
  return rescale ? ga.phi * (g * r) + ga.one_m_phi * g : g;
}

// x_{t-1} without the noise term; x0 gets the clipped x0 prediction, made from o; the direction's
// eps is made from oe (o itself, or CFG++'s unconditional output). Every candidate is computed
// and selected, so the loop has no control flow; each expression rounds as its torch op does.
template <int PRED>
FASTDDIM_HD float step_mean(float x, float o, float oe, const Coefs& c, const Mode& m, float& x0) {
  x0 = predict_x0<PRED>(x, o, c.sqrt_a, c.sqrt_1ma);
  float eps;
  if (PRED == kEpsilon) {
    eps = oe;
  } else if (PRED == kSample) {
    eps = (x - c.sqrt_a * oe) / c.sqrt_1ma;
  } else {
    eps = c.sqrt_a * oe + c.sqrt_1ma * x;
  }
  // clip_x0 written out: through the helper nvcc 13 allocates the fp32 'sample' CUDA kernel's
  // registers differently (46 instead of 40); this keeps the DDIM kernels as they were.
  x0 = (x0 < m.lo ? m.lo : (x0 > m.hi ? m.hi : x0)) / m.div;
  const float eps_clipped = (x - c.sqrt_a * x0) / c.sqrt_1ma;
  eps = m.clipped_eps ? eps_clipped : eps;
  const float ddim = c.c_x0 * x0 + c.c_eps * eps;
  const float posterior = c.c_x0 * x0 + c.c_xt * x;
  return m.sigma_hat ? posterior : ddim;
}

// A DPM-Solver++(2M) step (no noise); x0 gets the clipped x0, the next step's x0_prev. The op
// order of reference.dpm_solver_step, not regrouped ((c_d1 * r_inv) * d rounds differently):
//   a = c_x * x - c_d0 * x0;  second order: a - c_d1 * (r_inv * (x0 - x0_prev)).
template <int PRED, bool SECOND>
FASTDDIM_HD float dpm_step(float x, float o, float x0_prev, const DpmCoefs& c, const Mode& m, float& x0) {
  x0 = clip_x0(predict_x0<PRED>(x, o, c.sqrt_a, c.sqrt_1ma), m);
  const float a = c.c_x * x - c.c_d0 * x0;
  return SECOND ? a - c.c_d1 * (c.r_inv * (x0 - x0_prev)) : a;
}

void ddim_step_cpu(const StepArgs& a, const SolverArgs& sv, const GuideArgs& ga);
// ratio[b] = std(c_b) / std(g_b), g = u + w (c - u) rounded to float32 as the step forms it; the
// unbiased std over a sample's numel elements, accumulated in double (one pass, shifted by the
// sample's first value, so a large mean costs no precision). u, c: (batch, numel) of dtype (DType).
void rescale_ratio_cpu(const void* u, const void* c, int dtype, int64_t batch, int64_t numel, float w, float* ratio);
void normal_cpu(float* res, int64_t n, int64_t numel, const int64_t* rng, int64_t step);
void philox_cpu(const int64_t* ctr, int64_t* res, int64_t m, uint64_t seed);
// The CPU noise paths, by level: the portable scalar one, AVX2+FMA (8 Philox groups at a time),
// AVX-512F (16 at a time, the same normals as AVX2 bit for bit).
enum CpuSimd : int { kSimdAsk = -1, kSimdDefault = -2, kSimdScalar = 0, kSimdAvx2 = 1, kSimdAvx512 = 2 };
// The level a name means: "0"/"scalar", "1"/"avx2", "2"/"avx512"; -1 for anything else.
int cpu_simd_level(const char* name);
// The CPU noise path's name ("avx512", "avx2" or "scalar"), after switching it to level (a
// CpuSimd; fails where the processor or build lacks it), or to the default SIMD path for
// kSimdDefault; kSimdAsk only asks. The default is the best level the processor has, at most
// FASTDDIM_CPU_SIMD's when that was set as fastddim._C loaded.
const char* cpu_simd(int level);
#ifdef FASTDDIM_WITH_CUDA
void ddim_step_cuda(const StepArgs& a, const SolverArgs& sv, const GuideArgs& ga);
void rescale_ratio_cuda(const void* u, const void* c, int dtype, int64_t batch, int64_t numel, float w, float* ratio);
void normal_cuda(float* res, int64_t n, int64_t numel, const int64_t* rng, int64_t step);  // rng on the device
void philox_cuda(const int64_t* ctr, int64_t* res, int64_t m, uint64_t seed);
#endif

}  // namespace fastddim
