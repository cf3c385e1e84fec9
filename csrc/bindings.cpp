// fastddim._C: the C++/CUDA step kernels and their noise, bound with pybind11.
// The boundary is strict: every device, dtype, shape and contiguity is checked here, so the
// kernels can take raw pointers. Python reaches these through fastddim/_ops.py.
#include <torch/extension.h>

#include "ddim_step.h"

#ifdef FASTDDIM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#define FASTDDIM_CUDA_BUILT true
#else
#define FASTDDIM_CUDA_BUILT false
#endif

namespace fastddim {
namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: return kNone;
  }
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "ddim_step: ", name, " is on ", t.device(), ", x on ", x.device());
  TORCH_CHECK(t.sizes() == x.sizes(), "ddim_step: ", name, " has shape ", t.sizes(), ", expected ", x.sizes());
  TORCH_CHECK(t.is_contiguous(), "ddim_step: ", name, " must be contiguous");
}

// The solver code's own arguments: DPM-Solver++ writes x0 (the next step's x0_prev), takes none
// of DDIM's options, and its second order reads x0_prev (x's shape, float32, fresh outputs).
void check_solver(const at::Tensor& x, const at::Tensor& x_prev, const c10::optional<at::Tensor>& x0,
                  const c10::optional<at::Tensor>& x0_prev, int64_t solver, bool clipped_eps, bool sigma_hat,
                  bool noise) {
  TORCH_CHECK(kSolverDdim <= solver && solver <= kSolverDpm2,
              "ddim_step: solver must be 0 (ddim), 1 (dpm first order) or 2 (dpm second order), got ", solver);
  if (solver == kSolverDdim) return;
  TORCH_CHECK(x0.has_value(), "ddim_step: solver=", solver, " (dpm) writes x0: pass x0");
  TORCH_CHECK(!clipped_eps && !sigma_hat && !noise,
              "ddim_step: clipped_eps, sigma_hat and noise are DDIM options: must be false with solver=", solver);
  if (solver != kSolverDpm2) return;
  TORCH_CHECK(x0_prev.has_value(), "ddim_step: solver=2 (dpm second order) needs x0_prev");
  check_like(*x0_prev, x, "x0_prev");
  TORCH_CHECK(x0_prev->scalar_type() == at::kFloat, "ddim_step: x0_prev must be float32, got ", x0_prev->scalar_type());
  TORCH_CHECK(x0_prev->data_ptr() != x_prev.data_ptr() && x0_prev->data_ptr() != x0->data_ptr(),
              "ddim_step: x_prev and x0 must not alias x0_prev");
}

// The guidance arguments, as fastddim/_ops.py's _check_guide: a guided step reads out_uncond (out's
// shape, dtype and device; fresh outputs); ratio (B,) float32 (the rescale) with guide=1 only;
// CFG++ is a DDIM update whose direction is the unconditional eps (no clipped_eps, no sigma_hat).
// ValueError, as the Python checks raise.
void check_guide(const at::Tensor& x, const at::Tensor& out, const at::Tensor& x_prev,
                 const c10::optional<at::Tensor>& out_uncond, int64_t guide, const c10::optional<at::Tensor>& ratio,
                 int64_t solver, bool clipped_eps, bool sigma_hat) {
  TORCH_CHECK_VALUE(kGuideNone <= guide && guide <= kGuideCfgpp,
                    "ddim_step: guide must be 0 (none), 1 (cfg) or 2 (cfg++), got ", guide);
  if (guide == kGuideNone) {
    TORCH_CHECK_VALUE(!out_uncond.has_value() && !ratio.has_value(),
                      "ddim_step: out_uncond and ratio are read by a guided step only (guide=0)");
    return;
  }
  TORCH_CHECK_VALUE(out_uncond.has_value(), "ddim_step: guide=", guide,
                    " needs out_uncond, a contiguous tensor of out's shape, dtype and device");
  TORCH_CHECK_VALUE(out_uncond->sizes() == out.sizes() && out_uncond->scalar_type() == out.scalar_type() &&
                        out_uncond->device() == out.device() && out_uncond->is_contiguous(),
                    "ddim_step: guide=", guide, " needs out_uncond, a contiguous tensor of out's shape, dtype and device (",
                    out.sizes(), ", ", out.scalar_type(), ", ", out.device(), "), got ", out_uncond->sizes(), ", ",
                    out_uncond->scalar_type(), ", ", out_uncond->device());
  TORCH_CHECK_VALUE(x_prev.data_ptr() != out_uncond->data_ptr(), "ddim_step: x_prev must not alias out_uncond");
  if (ratio.has_value()) {
    TORCH_CHECK_VALUE(guide == kGuideCfg, "ddim_step: ratio (the rescale) needs guide=1, got guide=", guide);
    TORCH_CHECK_VALUE(ratio->device() == x.device() && ratio->scalar_type() == at::kFloat && ratio->dim() == 1 &&
                          ratio->size(0) == x.size(0) && ratio->is_contiguous(),
                      "ddim_step: ratio (the rescale) must be a contiguous float32 (", x.size(0), ",) tensor on ",
                      x.device(), ", got ", ratio->scalar_type(), " ", ratio->sizes(), " on ", ratio->device());
  }
  TORCH_CHECK_VALUE(guide != kGuideCfgpp || (solver == kSolverDdim && !clipped_eps && !sigma_hat),
                    "ddim_step: guide=2 (cfg++) is a DDIM update (solver=0) with the unconditional eps as its "
                    "direction: clipped_eps and sigma_hat must be False");
}

void ddim_step(const at::Tensor& x, const at::Tensor& out, const at::Tensor& table, int64_t j,
               const at::Tensor& rng, const at::Tensor& x_prev, const c10::optional<at::Tensor>& x0,
               const c10::optional<at::Tensor>& x_low, const c10::optional<at::Tensor>& s, int64_t pred,
               int64_t clip, double clip_range, bool clipped_eps, bool sigma_hat, bool noise,
               const c10::optional<at::Tensor>& x0_prev, int64_t solver, const c10::optional<at::Tensor>& out_uncond,
               int64_t guide, double w, double phi, const c10::optional<at::Tensor>& ratio) {
  TORCH_CHECK(x.dim() >= 1, "ddim_step: x must be (B, *shape)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "ddim_step: x must be contiguous float32");
  check_like(out, x, "out");
  TORCH_CHECK(dtype_code(out) != kNone, "ddim_step: out must be float32, bfloat16 or float16, got ", out.scalar_type());
  check_like(x_prev, x, "x_prev");
  TORCH_CHECK(x_prev.scalar_type() == at::kFloat, "ddim_step: x_prev must be float32");
  // The CPU loop declares its pointers __restrict__: outputs must be fresh memory.
  TORCH_CHECK(x_prev.data_ptr() != x.data_ptr() && x_prev.data_ptr() != out.data_ptr(),
              "ddim_step: x_prev must not alias x or out");
  TORCH_CHECK(table.device() == x.device() && table.scalar_type() == at::kFloat && table.dim() == 2 &&
                  table.size(1) == 6 && table.is_contiguous(),
              "ddim_step: table must be a contiguous float32 (S, 6) tensor on x's device");
  TORCH_CHECK(0 <= j && j < table.size(0), "ddim_step: j=", j, " out of range for a table of ", table.size(0), " steps");
  TORCH_CHECK(rng.device() == x.device() && rng.scalar_type() == at::kLong && rng.numel() == 2 && rng.is_contiguous(),
              "ddim_step: rng must be a contiguous int64 (2,) tensor (seed bits, first_index) on x's device");
  TORCH_CHECK(0 <= pred && pred <= 2, "ddim_step: pred must be 0 (epsilon), 1 (sample) or 2 (v_prediction)");
  TORCH_CHECK(0 <= clip && clip <= 2, "ddim_step: clip must be 0 (none), 1 (range) or 2 (threshold)");
  if (x0) {
    check_like(*x0, x, "x0");
    TORCH_CHECK(x0->scalar_type() == at::kFloat, "ddim_step: x0 must be float32");
  }
  if (x_low) {
    check_like(*x_low, x, "x_low");
    TORCH_CHECK(x_low->scalar_type() == at::kBFloat16 || x_low->scalar_type() == at::kHalf,
                "ddim_step: x_low must be bfloat16 or float16");
  }
  check_solver(x, x_prev, x0, x0_prev, solver, clipped_eps, sigma_hat, noise);
  check_guide(x, out, x_prev, out_uncond, guide, ratio, solver, clipped_eps, sigma_hat);
  if (clip == kClipThreshold) {
    TORCH_CHECK(s.has_value(), "ddim_step: clip=2 (threshold) needs s");
    TORCH_CHECK(s->device() == x.device() && s->scalar_type() == at::kFloat && s->dim() == 1 &&
                    s->size(0) == x.size(0) && s->is_contiguous(),
                "ddim_step: s must be a contiguous float32 (B,) tensor on x's device");
  }
  StepArgs a{};
  a.x = x.data_ptr<float>();
  a.out = out.data_ptr();
  a.out_dtype = dtype_code(out);
  a.table = table.data_ptr<float>();
  a.j = j;
  a.rng = rng.data_ptr<int64_t>();
  a.s = clip == kClipThreshold ? s->data_ptr<float>() : nullptr;
  a.prev = x_prev.data_ptr<float>();
  a.x0 = x0 ? x0->data_ptr<float>() : nullptr;
  a.low = x_low ? x_low->data_ptr() : nullptr;
  a.low_dtype = x_low ? dtype_code(*x_low) : kNone;
  a.batch = x.size(0);
  a.numel = a.batch ? x.numel() / a.batch : 0;
  a.pred = static_cast<int>(pred);
  a.clip = static_cast<int>(clip);
  a.clip_range = static_cast<float>(clip_range);
  a.clipped_eps = clipped_eps;
  a.sigma_hat = sigma_hat;
  a.noise = noise;
  const SolverArgs sv{static_cast<int>(solver), solver == kSolverDpm2 ? x0_prev->data_ptr<float>() : nullptr};
  // w == 1 with CFG is the conditional output alone, as fastddim.guidance.guide (and diffusers)
  // skip the combine there: u + 1 * (c - u) is not c to the bit, and no rescale applies.
  const bool cond_only = guide == kGuideCfg && w == 1.0;
  GuideArgs ga{};
  ga.guide = cond_only ? kGuideNone : static_cast<int>(guide);
  if (ga.guide != kGuideNone) {
    ga.out_uncond = out_uncond->data_ptr();
    ga.w = static_cast<float>(w);
    ga.phi = static_cast<float>(phi);
    ga.one_m_phi = static_cast<float>(1.0 - phi);  // (1 - phi) as torch computes it from a Python float
    ga.ratio = ratio ? ratio->data_ptr<float>() : nullptr;
  }
  if (x.is_cpu()) return ddim_step_cpu(a, sv, ga);
#ifdef FASTDDIM_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    return ddim_step_cuda(a, sv, ga);
  }
#endif
  TORCH_CHECK(false, "ddim_step: no kernel for device ", x.device(), " in this build (cuda built: ", FASTDDIM_CUDA_BUILT, ")");
}

at::Tensor rescale_ratio(const at::Tensor& u, const at::Tensor& c, double w) {
  TORCH_CHECK_VALUE(c.dim() >= 1 && dtype_code(c) != kNone && c.is_contiguous(),
                    "rescale_ratio: out must be a contiguous float32, bfloat16 or float16 (B, ...) tensor, got ",
                    c.scalar_type(), " ", c.sizes());
  TORCH_CHECK_VALUE(u.device() == c.device() && u.sizes() == c.sizes() && u.scalar_type() == c.scalar_type() &&
                        u.is_contiguous(),
                    "rescale_ratio: out_uncond must be a contiguous tensor of out's shape, dtype and device (",
                    c.sizes(), ", ", c.scalar_type(), ", ", c.device(), "), got ", u.sizes(), ", ", u.scalar_type(),
                    ", ", u.device());
  const int64_t batch = c.size(0), numel = batch ? c.numel() / batch : 0;
  at::Tensor ratio = at::empty({batch}, c.options().dtype(at::kFloat));
  if (c.is_cpu()) {
    rescale_ratio_cpu(u.data_ptr(), c.data_ptr(), dtype_code(c), batch, numel, static_cast<float>(w),
                      ratio.data_ptr<float>());
    return ratio;
  }
#ifdef FASTDDIM_WITH_CUDA
  if (c.is_cuda()) {
    const c10::cuda::CUDAGuard guard(c.device());
    rescale_ratio_cuda(u.data_ptr(), c.data_ptr(), dtype_code(c), batch, numel, static_cast<float>(w),
                       ratio.data_ptr<float>());
    return ratio;
  }
#endif
  TORCH_CHECK(false, "rescale_ratio: no kernel for device ", c.device(), " in this build (cuda built: ", FASTDDIM_CUDA_BUILT, ")");
}

void normal_(const at::Tensor& res, const at::Tensor& rng, int64_t step) {
  TORCH_CHECK(res.dim() >= 1 && res.scalar_type() == at::kFloat && res.is_contiguous(),
              "normal_: res must be a contiguous float32 (n, *shape) tensor");
  TORCH_CHECK(rng.device() == res.device() && rng.scalar_type() == at::kLong && rng.numel() == 2 && rng.is_contiguous(),
              "normal_: rng must be a contiguous int64 (2,) tensor (seed bits, first_index) on res's device");
  const int64_t n = res.size(0), numel = n ? res.numel() / n : 0;
  if (res.is_cpu()) return normal_cpu(res.data_ptr<float>(), n, numel, rng.data_ptr<int64_t>(), step);
#ifdef FASTDDIM_WITH_CUDA
  if (res.is_cuda()) {
    const c10::cuda::CUDAGuard guard(res.device());
    return normal_cuda(res.data_ptr<float>(), n, numel, rng.data_ptr<int64_t>(), step);
  }
#endif
  TORCH_CHECK(false, "normal_: no kernel for device ", res.device(), " in this build (cuda built: ", FASTDDIM_CUDA_BUILT, ")");
}

at::Tensor philox4x32(const at::Tensor& ctr, uint64_t seed) {
  TORCH_CHECK(ctr.dim() == 2 && ctr.size(1) == 4 && ctr.scalar_type() == at::kLong,
              "philox4x32: ctr must be an int64 (M, 4) tensor of uint32 values");
  const at::Tensor c = ctr.contiguous();
  at::Tensor res = at::empty_like(c);
  if (c.is_cpu()) {
    philox_cpu(c.data_ptr<int64_t>(), res.data_ptr<int64_t>(), c.size(0), seed);
    return res;
  }
#ifdef FASTDDIM_WITH_CUDA
  if (c.is_cuda()) {
    const c10::cuda::CUDAGuard guard(c.device());
    philox_cuda(c.data_ptr<int64_t>(), res.data_ptr<int64_t>(), c.size(0), seed);
    return res;
  }
#endif
  TORCH_CHECK(false, "philox4x32: no kernel for device ", c.device());
}

}  // namespace
}  // namespace fastddim

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.attr("cuda") = py::bool_(FASTDDIM_CUDA_BUILT);
  m.def("ddim_step", &fastddim::ddim_step,
        "Fused step j (DDIM, or DPM-Solver++ by solver) into x_prev (and x0, x_low when given), in place, on x's device.\n\n"
        "x, x_prev, x0: (B, *shape) contiguous float32; out: (B, *shape) float32/bfloat16/float16 model\n"
        "output; table: the plan's (S, 6) float32 table; rng: int64 (2,) = (seed bits, first_index);\n"
        "x_low: bfloat16/float16 copy of x_prev; s: (B,) float32 thresholds when clip=2.\n"
        "pred: 0 epsilon, 1 sample, 2 v_prediction; clip: 0 none, 1 +-clip_range, 2 threshold by s;\n"
        "clipped_eps: eps from the clipped x0; sigma_hat: posterior-mean update; noise: add sigma * z\n"
        "with z = fastddim.noise.normal(seed, first_index, B, j + 1, shape).\n"
        "solver: 0 DDIM; 1, 2 DPM-Solver++(2M) first/second order with a DPM plan's table (no noise,\n"
        "x0 required: the next step's x0_prev); x0_prev: (B, *shape) float32, read by solver 2.\n"
        "guide: 0 none; 1 CFG: the step's output is g = u + w * (c - u) with c = out, u = out_uncond (out's\n"
        "shape and dtype), then with ratio ((B,) float32, rescale_ratio's) g = phi * (g * ratio) + (1 - phi) * g\n"
        "(w == 1: c alone, as fastddim.guidance.guide); 2 CFG++ (solver 0): x0 from g, the direction's eps from u.",
        py::arg("x"), py::arg("out"), py::arg("table"), py::arg("j"), py::arg("rng"), py::arg("x_prev"),
        py::arg("x0") = py::none(), py::arg("x_low") = py::none(), py::arg("s") = py::none(),
        py::arg("pred") = 0, py::arg("clip") = 0, py::arg("clip_range") = 1.0, py::arg("clipped_eps") = false,
        py::arg("sigma_hat") = false, py::arg("noise") = false, py::arg("x0_prev") = py::none(),
        py::arg("solver") = 0, py::arg("out_uncond") = py::none(), py::arg("guide") = 0, py::arg("w") = 1.0,
        py::arg("phi") = 0.0, py::arg("ratio") = py::none());
  m.def("rescale_ratio", &fastddim::rescale_ratio,
        "std(c) / std(g) per sample, g = u + w * (c - u) in float32 as the guided step forms it: the ratio\n"
        "of diffusers' rescale_noise_cfg, the unbiased std over every non-batch element, accumulated in\n"
        "double in one pass (fastddim.guidance.rescale_ratio_torch within float32 rounding).\n"
        "out_uncond (u), out (c): (B, ...) contiguous float32/bfloat16/float16, one shape, dtype and device.\n"
        "Returns (B,) float32 on their device.",
        py::arg("out_uncond"), py::arg("out"), py::arg("w"));
  m.def("normal_", &fastddim::normal_,
        "Fill res (n, *shape) contiguous float32, in place, with fastddim.noise.normal(seed, first_index,\n"
        "n, step, shape), on res's device. rng: int64 (2,) = (seed bits, first_index) on res's device,\n"
        "read by the kernel (on a GPU: on the device, on the current stream), so a captured CUDA graph\n"
        "replays with new ones.",
        py::arg("res"), py::arg("rng"), py::arg("step"));
  m.def("cpu_simd",
        [](py::object simd) {
          int level = fastddim::kSimdAsk;
          if (py::isinstance<py::bool_>(simd)) {
            level = simd.cast<bool>() ? fastddim::kSimdDefault : fastddim::kSimdScalar;
          } else if (py::isinstance<py::int_>(simd)) {
            level = simd.cast<int>();
            TORCH_CHECK(level >= fastddim::kSimdScalar && level <= fastddim::kSimdAvx512, "cpu_simd: level must be 0, 1 or 2, got ", level);
          } else if (py::isinstance<py::str>(simd)) {
            const std::string name = simd.cast<std::string>();
            level = fastddim::cpu_simd_level(name.c_str());
            TORCH_CHECK(level >= 0, "cpu_simd: unknown path '", name, "' (scalar, avx2, avx512 or 0, 1, 2)");
          } else {
            TORCH_CHECK(simd.is_none(), "cpu_simd: simd must be None, a bool, a level or a path name");
          }
          return std::string(fastddim::cpu_simd(level));
        },
        "The CPU kernels' noise path, 'avx512' (AVX-512F, 16 Philox groups at a time), 'avx2' (AVX2+FMA,\n"
        "8 at a time) or 'scalar' (portable), after switching it when simd is given: a name, a level\n"
        "(0 scalar, 1 avx2, 2 avx512; raises where the processor or build lacks it), True (the default\n"
        "SIMD path) or False (scalar). All make fastddim.noise's numbers: Philox bit for bit, normals\n"
        "within a few ulp (avx512 and avx2 equal bit for bit). The default is the best path the\n"
        "processor has, at most FASTDDIM_CPU_SIMD's (same names or levels) when fastddim._C loaded.",
        py::arg("simd") = py::none());
  m.def("philox4x32", &fastddim::philox4x32,
        "Raw Philox-4x32-10 of each row of ctr (M, 4) int64 (uint32 values) with key (seed low, high) -> (M, 4) int64.",
        py::arg("ctr"), py::arg("seed"));
}
