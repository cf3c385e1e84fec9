// Fused DDIM step on a CUDA GPU: same math and noise as ddim_step_cpu.cpp (ddim_step.h, philox.h).
// The SOLVER template argument picks DDIM or DPM-Solver++(2M) (first order, or second order with
// one more read, x0_prev, and x0 always written: 16-20 B per element at fp32, no noise). The
// GUIDE one picks an unguided step or a guided one (CFG, with any solver; CFG++, DDIM only), which
// reads the unconditional output too (4 or 2 B more per element) and combines it in registers;
// its arguments come as a kernel parameter of their own (GuideArgs), as the solver's x0_prev.
// _rescale_ratio_kernel is the rescale's reduction pass: one block per sample.
// One thread per Philox group of 4 elements, grid-stride loop. Reads 4 B (x_t) + 4 or 2 B (model
// output) and writes 4 B (x_{t-1}) per element, plus 4 B (x0) and 2 B (low copy) when asked;
// 128-bit loads/stores of x and x_{t-1} when a sample's size is a multiple of 4 and the pointers
// are aligned. Built with --fmad=false and without --use_fast_math: IEEE division and sqrt, the
// accurate logf/sincosf, so it rounds as the CPU kernel does. All scalars (table row j, seed,
// first index) are read on the device: nothing here syncs, and a captured graph can be replayed.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "ddim_step.h"

namespace fastddim {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// The 4 floats at p + base (cnt of them at the end of a sample) into v: one 128-bit load when VEC.
template <bool VEC>
__device__ __forceinline__ void load4(const float* p, int64_t base, int cnt, float v[4]) {
  if (VEC) {
    const Pack4<float> pk = *reinterpret_cast<const Pack4<float>*>(p + base);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = pk.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = k < cnt ? p[base + k] : 0.f;
  }
}

// The 4 model-output values at p + base (cnt of them at the end of a sample), as floats: the
// unconditional output's load. x and out keep their own loads in the kernel: through load4 and
// this, nvcc 13 allocates the unguided kernels' registers differently (up to +7 on sm_90).
template <typename OutT, bool VEC>
__device__ __forceinline__ void load4_out(const OutT* p, int64_t base, int cnt, float v[4]) {
  if (VEC) {
    const Pack4<OutT> pk = *reinterpret_cast<const Pack4<OutT>*>(p + base);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = static_cast<float>(pk.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = k < cnt ? static_cast<float>(p[base + k]) : 0.f;
  }
}

template <typename OutT, int PRED, bool VEC, int SOLVER, int GUIDE>
__global__ void __launch_bounds__(kThreads) _ddim_step_kernel(StepArgs a, const float* __restrict__ x0_prev,
                                                               GuideArgs ga) {
  const float* row = a.table + a.j * 6;
  const Coefs c{__ldg(row), __ldg(row + 1), __ldg(row + 2), __ldg(row + 3), __ldg(row + 4), __ldg(row + 5)};
  const int64_t n = a.numel, groups = (n + 3) / 4, total = a.batch * groups;
  const uint64_t seed = static_cast<uint64_t>(__ldg(a.rng));
  const int64_t first = __ldg(a.rng + 1);
  const uint32_t step = static_cast<uint32_t>(a.j + 1);
  const OutT* out = static_cast<const OutT*>(a.out);

  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < total;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = p / groups, g = p - b * groups, base = b * n + 4 * g;
    const int cnt = static_cast<int>(min(static_cast<int64_t>(4), n - 4 * g));
    float xv[4] = {0.f, 0.f, 0.f, 0.f}, ov[4] = {0.f, 0.f, 0.f, 0.f};
    if (VEC) {
      const Pack4<float> xp = *reinterpret_cast<const Pack4<float>*>(a.x + base);
      const Pack4<OutT> op = *reinterpret_cast<const Pack4<OutT>*>(out + base);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        xv[k] = xp.v[k];
        ov[k] = static_cast<float>(op.v[k]);
      }
    } else {  // constant trip counts, unrolled: the small arrays stay in registers
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (k < cnt) {
          xv[k] = a.x[base + k];
          ov[k] = static_cast<float>(out[base + k]);
        }
      }
    }
    // ov becomes the guided output g; uv keeps u for CFG++'s eps (unguided: never loaded).
    float uv[4] = {0.f, 0.f, 0.f, 0.f};
    if (GUIDE != kGuideNone) {
      load4_out<OutT, VEC>(static_cast<const OutT*>(ga.out_uncond), base, cnt, uv);
      const bool rescale = GUIDE == kGuideCfg && ga.ratio != nullptr;
      const float r = rescale ? __ldg(ga.ratio + b) : 1.0f;
#pragma unroll
      for (int k = 0; k < 4; ++k) ov[k] = guided<GUIDE>(uv[k], ov[k], ga, rescale, r);
    }
    Pack4<float> pv, x0v;
    if (SOLVER == kSolverDdim) {
      float z[4] = {0.f, 0.f, 0.f, 0.f};
      if (a.noise) gaussian4(seed, static_cast<uint32_t>(g), static_cast<uint32_t>(first + b), step, z);
      const Mode m = sample_mode(a, b);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float v = step_mean<PRED>(xv[k], ov[k], GUIDE == kGuideCfgpp ? uv[k] : ov[k], c, m, x0v.v[k]);
        pv.v[k] = a.noise ? v + c.sigma * z[k] : v;
      }
    } else {
      const Mode m = sample_mode(a, b);
      float pp[4] = {0.f, 0.f, 0.f, 0.f};
      if (SOLVER == kSolverDpm2) load4<VEC>(x0_prev, base, cnt, pp);
      const DpmCoefs d = dpm_coefs(c);
#pragma unroll
      for (int k = 0; k < 4; ++k) pv.v[k] = dpm_step<PRED, SOLVER == kSolverDpm2>(xv[k], ov[k], pp[k], d, m, x0v.v[k]);
    }
    if (VEC) {
      *reinterpret_cast<Pack4<float>*>(a.prev + base) = pv;
      if (a.x0) *reinterpret_cast<Pack4<float>*>(a.x0 + base) = x0v;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (k < cnt) {
          a.prev[base + k] = pv.v[k];
          if (a.x0) a.x0[base + k] = x0v.v[k];
        }
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k < cnt && a.low_dtype == kBF16) static_cast<c10::BFloat16*>(a.low)[base + k] = c10::BFloat16(pv.v[k]);
      if (k < cnt && a.low_dtype == kF16) static_cast<c10::Half*>(a.low)[base + k] = c10::Half(pv.v[k]);
    }
  }
}

// x_T (or any step's noise) on its own. rng is read here, on the device, as in the step kernel.
__global__ void _normal_kernel(float* res, int64_t n, int64_t numel, const int64_t* rng, uint32_t step) {
  const int64_t groups = (numel + 3) / 4;
  const uint64_t seed = static_cast<uint64_t>(__ldg(rng));
  const int64_t first = __ldg(rng + 1);
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < n * groups;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = p / groups, g = p - b * groups;
    float z[4];
    gaussian4(seed, static_cast<uint32_t>(g), static_cast<uint32_t>(first + b), step, z);
    for (int64_t k = 0; k < 4 && 4 * g + k < numel; ++k) res[b * numel + 4 * g + k] = z[k];
  }
}

// One block per sample: ratio[b] = std(c) / std(g), g = u + w (c - u) as the step forms it;
// unbiased, from double sums of v - v[0] (v = c, g; a large mean costs no precision), reduced
// across the block with warp shuffles, then through shared memory.
template <typename T>
__global__ void __launch_bounds__(kThreads) _rescale_ratio_kernel(const T* __restrict__ u, const T* __restrict__ c,
                                                                   int64_t n, float w, float* __restrict__ ratio) {
  const int64_t b = blockIdx.x;
  u += b * n;
  c += b * n;
  const float c0 = static_cast<float>(c[0]), g0 = combine(static_cast<float>(u[0]), c0, w);
  double acc[4] = {0.0, 0.0, 0.0, 0.0};  // sum and sum of squares of c - c0, then of g - g0
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float cv = static_cast<float>(c[i]);
    const double dc = static_cast<double>(cv) - c0;
    const double dg = static_cast<double>(combine(static_cast<float>(u[i]), cv, w)) - g0;
    acc[0] += dc;
    acc[1] += dc * dc;
    acc[2] += dg;
    acc[3] += dg * dg;
  }
  __shared__ double part[kThreads / 32][4];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    for (int off = 16; off > 0; off /= 2) acc[k] += __shfl_down_sync(0xffffffffu, acc[k], off);
    if (lane == 0) part[warp][k] = acc[k];
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int v = 1; v < kThreads / 32; ++v)
#pragma unroll
    for (int k = 0; k < 4; ++k) acc[k] += part[v][k];
  const double nd = static_cast<double>(n);
  const double var_c = (acc[1] - acc[0] * acc[0] / nd) / (nd - 1), var_g = (acc[3] - acc[2] * acc[2] / nd) / (nd - 1);
  ratio[b] = static_cast<float>(sqrt(var_c / var_g));
}

__global__ void _philox_kernel(const int64_t* ctr, int64_t* res, int64_t m, uint64_t seed) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= m) return;
  uint32_t c[4];
  for (int k = 0; k < 4; ++k) c[k] = static_cast<uint32_t>(ctr[4 * i + k]);
  philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  for (int k = 0; k < 4; ++k) res[4 * i + k] = c[k];
}

// Enough blocks to fill the GPU a few times over; the grid-stride loop covers the rest.
int blocks_for(int64_t work) {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t{sms} * 16)));
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename OutT>
bool aligned_pack(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % (4 * sizeof(OutT)) == 0; }

template <typename OutT, int PRED, int SOLVER, int GUIDE>
void launch(const StepArgs& a, const float* x0_prev, const GuideArgs& ga) {
  const int64_t total = a.batch * ((a.numel + 3) / 4);
  const bool vec = a.numel % 4 == 0 && aligned16(a.x) && aligned16(a.prev) && aligned16(a.x0) &&
                   aligned16(x0_prev) && aligned_pack<OutT>(a.out) && aligned_pack<OutT>(ga.out_uncond);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (vec) {
    _ddim_step_kernel<OutT, PRED, true, SOLVER, GUIDE><<<blocks_for(total), kThreads, 0, stream>>>(a, x0_prev, ga);
  } else {
    _ddim_step_kernel<OutT, PRED, false, SOLVER, GUIDE><<<blocks_for(total), kThreads, 0, stream>>>(a, x0_prev, ga);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename OutT, int PRED, int GUIDE>
void launch_solver(const StepArgs& a, const SolverArgs& sv, const GuideArgs& ga) {
  if constexpr (GUIDE != kGuideCfgpp) {  // CFG++ is a DDIM update (checked in bindings.cpp)
    if (sv.solver == kSolverDpm1) return launch<OutT, PRED, kSolverDpm1, GUIDE>(a, nullptr, ga);
    if (sv.solver == kSolverDpm2) return launch<OutT, PRED, kSolverDpm2, GUIDE>(a, sv.x0_prev, ga);
  }
  launch<OutT, PRED, kSolverDdim, GUIDE>(a, nullptr, ga);
}

template <typename OutT, int PRED>
void launch_guide(const StepArgs& a, const SolverArgs& sv, const GuideArgs& ga) {
  switch (ga.guide) {
    case kGuideCfg: return launch_solver<OutT, PRED, kGuideCfg>(a, sv, ga);
    case kGuideCfgpp: return launch_solver<OutT, PRED, kGuideCfgpp>(a, sv, ga);
    default: return launch_solver<OutT, PRED, kGuideNone>(a, sv, ga);
  }
}

template <typename OutT>
void launch_pred(const StepArgs& a, const SolverArgs& sv, const GuideArgs& ga) {
  switch (a.pred) {
    case kEpsilon: return launch_guide<OutT, kEpsilon>(a, sv, ga);
    case kSample: return launch_guide<OutT, kSample>(a, sv, ga);
    default: return launch_guide<OutT, kVPrediction>(a, sv, ga);
  }
}

template <typename T>
void launch_ratio(const void* u, const void* c, int64_t batch, int64_t numel, float w, float* ratio) {
  _rescale_ratio_kernel<T><<<static_cast<unsigned>(batch), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const T*>(u), static_cast<const T*>(c), numel, w, ratio);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void ddim_step_cuda(const StepArgs& a, const SolverArgs& sv, const GuideArgs& ga) {
  if (a.batch * a.numel == 0) return;
  switch (a.out_dtype) {
    case kF32: return launch_pred<float>(a, sv, ga);
    case kBF16: return launch_pred<c10::BFloat16>(a, sv, ga);
    default: return launch_pred<c10::Half>(a, sv, ga);
  }
}

void rescale_ratio_cuda(const void* u, const void* c, int dtype, int64_t batch, int64_t numel, float w, float* ratio) {
  if (batch == 0) return;
  if (numel == 0) {  // torch's std of no elements: NaN
    C10_CUDA_CHECK(cudaMemsetAsync(ratio, 0xFF, sizeof(float) * batch, c10::cuda::getCurrentCUDAStream()));
    return;
  }
  switch (dtype) {
    case kF32: return launch_ratio<float>(u, c, batch, numel, w, ratio);
    case kBF16: return launch_ratio<c10::BFloat16>(u, c, batch, numel, w, ratio);
    default: return launch_ratio<c10::Half>(u, c, batch, numel, w, ratio);
  }
}

void normal_cuda(float* res, int64_t n, int64_t numel, const int64_t* rng, int64_t step) {
  const int64_t work = n * ((numel + 3) / 4);
  if (work == 0) return;
  _normal_kernel<<<blocks_for(work), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      res, n, numel, rng, static_cast<uint32_t>(step));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void philox_cuda(const int64_t* ctr, int64_t* res, int64_t m, uint64_t seed) {
  if (m == 0) return;
  _philox_kernel<<<static_cast<int>((m + kThreads - 1) / kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      ctr, res, m, seed);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastddim
