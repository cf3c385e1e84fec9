// Fused DDIM step on the CPU: one pass over x_t and the model output, noise made in the loop.
// Reads 4 B (x_t) + 4 or 2 B (model output) and writes 4 B (x_{t-1}) per element, plus 4 B (x0)
// and 2 B (low-precision copy) when asked. Parallel over Philox groups with at::parallel_for;
// each task works in chunks of kChunk groups of one sample: first the chunk's normals into a
// small buffer (Philox-4x32-10 + Box-Muller), then a branch-free element loop that the compiler
// vectorises (noise and x0 are template flags, clipping is per-sample data). normal_cpu is the
// same noise written straight out (4 B per element). The DPM-Solver++(2M) codes (dpm_loop) have
// no noise: a plain element loop over x_t, the output and (second order) x0_prev, writing x_{t-1}
// and x0.
//
// The noise has three paths, picked at run time (cpu_simd): AVX-512F, 16 Philox groups at a
// time, and AVX2+FMA, 8 at a time (32x32->64 products with _mm512/_mm256_mul_epu32, our own
// vectorised log and sincos, the same operations in the same order on both, so their normals are
// equal bit for bit), and the portable scalar one (philox.h's gaussian4 with libm), used where
// AVX2/FMA are missing and on non-x86. The SIMD functions are compiled with
// __attribute__((target(...))), so the default build runs on any x86-64. All give the spec's
// Philox integers bit for bit and normals within a few ulp of fastddim/noise.py's. A path computes
// every group the same way wherever a chunk starts, so the noise of an element does not depend on
// batch size or threads.
// Selecting a path: the default is the best the processor has (avx512 > avx2 > scalar), at most
// the level FASTDDIM_CPU_SIMD names when fastddim._C loads: 0 or "scalar", 1 or "avx2", 2 or
// "avx512" (a level the processor lacks falls back to the best below it). _C.cpu_simd() reports
// the path; _C.cpu_simd(name or level) switches to one (raising where it is missing), True to the
// default SIMD path, False to scalar (tests and benchmarks use this).
// Cost on one core (benchmarks/RESULTS.md, Zen 5): ~2.8 ns per group of 4 on the AVX-512 path,
// ~5.8 ns on the AVX2 one, ~31 ns on the scalar one; the step's memory pass adds ~2.4 ns per
// group at fp32.
// The build is -ffp-contract=off: FMA appears only where written (the SIMD log/sincos).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "ddim_step.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTDDIM_X86_SIMD 1
#include <immintrin.h>
#endif

namespace fastddim {

int cpu_simd_level(const char* name) {
  static const char* const names[][2] = {{"0", "scalar"}, {"1", "avx2"}, {"2", "avx512"}};
  for (int level = 0; level < 3; ++level)
    for (const char* n : names[level])
      if (std::strcmp(name, n) == 0) return level;
  return -1;
}

namespace {

constexpr int64_t kChunk = 256;   // groups: 1024 elements, 4 KB of noise, stays in L1
constexpr int64_t kGrain = 2048;  // groups per parallel task at least (8192 elements)

// Normals of Philox groups g0 .. g0 + count - 1 of one sample at one noise step, in element
// order: z[4 i + k] is lane k of group g0 + i. z holds 4 * count floats (count <= kChunk).
using NoiseFn = void (*)(uint64_t seed, uint32_t sample, uint32_t step, int64_t g0, int64_t count, float* z);

void noise_scalar(uint64_t seed, uint32_t sample, uint32_t step, int64_t g0, int64_t count, float* z) {
  for (int64_t i = 0; i < count; ++i) gaussian4(seed, static_cast<uint32_t>(g0 + i), sample, step, z + 4 * i);
}

#ifdef FASTDDIM_X86_SIMD
#define FASTDDIM_AVX2 __attribute__((target("avx2,fma")))

// log(x) for positive normal x (the uniforms, in [2^-24, 1)): Cephes logf's reduction and
// minimax polynomial, x = 2^e m with m in [sqrt(1/2), sqrt(2)), f = m - 1 (exact),
// log x = e ln2 + f - f^2/2 + f^3 P(f). The leading terms e ln2_hi + f - f^2/2 are summed as a
// double-float with FMA (ln2_hi has 9 bits, so e ln2_hi is exact), so that one rounding, at the
// end, dominates the error (within 1 ulp; ~0.1 ulp more than correctly rounded).
FASTDDIM_AVX2 inline __m256 log_avx2(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  const __m256 m = _mm256_castsi256_ps(  // mantissa in [0.5, 1)
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F000000)));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.70710677f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, one));
  // f = 2m - 1 below sqrt(1/2), else m - 1; both exact.
  const __m256 f = _mm256_add_ps(_mm256_sub_ps(m, one), _mm256_and_ps(small, m));
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 p = _mm256_set1_ps(7.0376836292e-2f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.1514610310e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.1676998740e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.2420140846e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.4249322787e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.6668057665e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0000714765e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-2.4999993993e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(3.3333331174e-1f));
  const __m256 y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), _mm256_mul_ps(_mm256_mul_ps(p, f), z));
  const __m256 nhf = _mm256_mul_ps(f, _mm256_set1_ps(-0.5f));
  const __m256 h = _mm256_fmadd_ps(nhf, f, f);                       // f - f^2/2, rounded once
  const __m256 eh = _mm256_fmadd_ps(nhf, f, _mm256_sub_ps(f, h));   // and what that rounding lost
  const __m256 t = _mm256_mul_ps(e, _mm256_set1_ps(0.693359375f));
  const __m256 hi = _mm256_add_ps(t, h);
  const __m256 lo = _mm256_add_ps(_mm256_sub_ps(t, hi), h);  // exact: |t| >= |h| unless t = 0
  return _mm256_add_ps(hi, _mm256_add_ps(lo, _mm256_add_ps(eh, y)));
}

// sin and cos of x in [0, 2 pi] (theta): x = q pi/2 + r with q = round(2x / pi), |r| <= pi/4,
// then Cephes sinf/cosf's minimax polynomials on r and the quadrant's swap and signs. r is
// carried as rh + rl (pi/2 in three parts; x - q p1 is exact) and the leading terms r and
// 1 - r^2/2 are formed exactly with FMA, so that one rounding, at the end, dominates the error
// (within 1 ulp; ~0.1 ulp more than correctly rounded).
FASTDDIM_AVX2 inline void sincos_avx2(__m256 x, __m256& s, __m256& c) {
  const __m256 qf = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.63661975f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i q = _mm256_cvtps_epi32(qf);
  const __m256 p2 = _mm256_set1_ps(4.371138828673793e-08f);  // -(second part of pi/2)
  const __m256 r1 = _mm256_fmadd_ps(qf, _mm256_set1_ps(-1.5707963705062866f), x);
  const __m256 rh = _mm256_fmadd_ps(qf, p2, r1);
  const __m256 rl = _mm256_fmadd_ps(qf, _mm256_set1_ps(1.7151245100058819e-15f), _mm256_fmadd_ps(qf, p2, _mm256_sub_ps(r1, rh)));
  const __m256 r2 = _mm256_mul_ps(rh, rh);
  __m256 ps = _mm256_fmadd_ps(_mm256_set1_ps(-1.9515295891e-4f), r2, _mm256_set1_ps(8.3321608736e-3f));
  ps = _mm256_fmadd_ps(ps, r2, _mm256_set1_ps(-1.6666654611e-1f));
  const __m256 sr = _mm256_add_ps(rh, _mm256_fmadd_ps(_mm256_mul_ps(ps, r2), rh, rl));
  __m256 pc = _mm256_fmadd_ps(_mm256_set1_ps(2.443315711809948e-5f), r2, _mm256_set1_ps(-1.388731625493765e-3f));
  pc = _mm256_fmadd_ps(pc, r2, _mm256_set1_ps(4.166664568298827e-2f));
  const __m256 one = _mm256_set1_ps(1.0f), nh = _mm256_mul_ps(rh, _mm256_set1_ps(-0.5f));
  const __m256 h = _mm256_fmadd_ps(nh, rh, one);                          // 1 - rh^2/2, rounded once
  const __m256 eh = _mm256_fmadd_ps(nh, rh, _mm256_sub_ps(one, h));      // and what that rounding lost
  const __m256 tc = _mm256_fnmadd_ps(rl, rh, _mm256_fmadd_ps(_mm256_mul_ps(r2, r2), pc, eh));
  const __m256 cr = _mm256_add_ps(h, tc);
  // Odd quadrants swap sin and cos; sin is negated in quadrants 2, 3 and cos in 1, 2.
  const __m256 swap = _mm256_castsi256_ps(_mm256_slli_epi32(q, 31));  // blendv reads the sign bit only
  const __m256 sign_s = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(q, _mm256_set1_epi32(2)), 30));
  const __m256 sign_c = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(q, _mm256_set1_epi32(1)), _mm256_set1_epi32(2)), 30));
  s = _mm256_xor_ps(_mm256_blendv_ps(sr, cr, swap), sign_s);
  c = _mm256_xor_ps(_mm256_blendv_ps(cr, sr, swap), sign_c);
}

// Philox-4x32-10 on two blocks a, b of 4 counters each, held in the low 32 bits of 64-bit
// lanes; keys: the 10 rounds' (k0, k1), broadcast. _mm256_mul_epu32 reads only the low halves
// and returns the full 64-bit products, so hi is a shift and lo the product itself: the garbage
// that words 1 and 3 carry above bit 31 is xored into words 0 and 2 there and never reaches a
// multiplication. The blocks go round by round together: two independent chains, keys read once.
FASTDDIM_AVX2 inline void philox8_avx2(__m256i a[4], __m256i b[4], const __m256i keys[20]) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  for (int r = 0; r < 10; ++r) {
    const __m256i k0 = _mm256_load_si256(keys + 2 * r), k1 = _mm256_load_si256(keys + 2 * r + 1);
    for (__m256i* c : {a, b}) {
      const __m256i p0 = _mm256_mul_epu32(c[0], m0), p1 = _mm256_mul_epu32(c[2], m1);
      c[0] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c[1]), k0);
      c[2] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c[3]), k1);
      c[1] = p1;
      c[3] = p0;
    }
  }
}

FASTDDIM_AVX2 inline void philox_keys_avx2(uint64_t seed, __m256i keys[20]) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r, k0 += kPhiloxW0, k1 += kPhiloxW1) {  // bumped as in philox4x32_10
    keys[2 * r] = _mm256_set1_epi32(static_cast<int>(k0));
    keys[2 * r + 1] = _mm256_set1_epi32(static_cast<int>(k1));
  }
}

// The low halves of lo's and hi's 64-bit lanes, interleaved: (lo0, hi0, lo1, hi1, ...).
FASTDDIM_AVX2 inline __m256i interleave_low_avx2(__m256i lo, __m256i hi) {
  return _mm256_blend_epi32(lo, _mm256_slli_epi64(hi, 32), 0xAA);
}

// Box-Muller on 8 pairs of words, as philox.h's box_muller (same float ops, own log/sincos).
FASTDDIM_AVX2 inline void box_muller_avx2(__m256i a, __m256i b, __m256& z0, __m256& z1) {
  // (float(x >> 9) + 0.5) * 2^-23 as one exact FMA: both roundings of the spec are exact.
  const __m256 scale = _mm256_set1_ps(1.1920928955078125e-07f), half_ulp = _mm256_set1_ps(5.9604644775390625e-08f);
  const __m256 ua = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 9)), scale, half_ulp);
  const __m256 ub = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 9)), scale, half_ulp);
  const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log_avx2(ua)));
  __m256 s, c;
  sincos_avx2(_mm256_mul_ps(ub, _mm256_set1_ps(kTwoPi)), s, c);
  z0 = _mm256_mul_ps(r, c);
  z1 = _mm256_mul_ps(r, s);
}

// The 32 normals of groups g .. g + 7 in element order.
FASTDDIM_AVX2 inline void gaussian32_avx2(const __m256i keys[20], uint32_t sample, uint32_t step, uint32_t g, __m256 out[4]) {
  // Block a holds groups g, g+2, g+4, g+6 and block b the odd ones, so that interleaving their
  // low halves gives the words of groups g .. g+7 in order.
  const __m256i sample_v = _mm256_set1_epi32(static_cast<int>(sample)), step_v = _mm256_set1_epi32(static_cast<int>(step));
  __m256i a[4] = {_mm256_setr_epi64x(g, g + 2u, g + 4u, g + 6u), sample_v, step_v, _mm256_setzero_si256()};
  __m256i b[4] = {_mm256_setr_epi64x(g + 1u, g + 3u, g + 5u, g + 7u), sample_v, step_v, _mm256_setzero_si256()};
  philox8_avx2(a, b, keys);
  __m256 z0, z1, z2, z3;
  box_muller_avx2(interleave_low_avx2(a[0], b[0]), interleave_low_avx2(a[1], b[1]), z0, z1);
  box_muller_avx2(interleave_low_avx2(a[2], b[2]), interleave_low_avx2(a[3], b[3]), z2, z3);
  // 4x8 -> 8x4 transpose: group i's lanes (z0[i], z1[i], z2[i], z3[i]) become consecutive.
  const __m256 t0 = _mm256_unpacklo_ps(z0, z1), t1 = _mm256_unpackhi_ps(z0, z1);
  const __m256 t2 = _mm256_unpacklo_ps(z2, z3), t3 = _mm256_unpackhi_ps(z2, z3);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  out[0] = _mm256_permute2f128_ps(s0, s1, 0x20);
  out[1] = _mm256_permute2f128_ps(s2, s3, 0x20);
  out[2] = _mm256_permute2f128_ps(s0, s1, 0x31);
  out[3] = _mm256_permute2f128_ps(s2, s3, 0x31);
}

FASTDDIM_AVX2 void noise_avx2(uint64_t seed, uint32_t sample, uint32_t step, int64_t g0, int64_t count, float* z) {
  __m256i keys[20];
  philox_keys_avx2(seed, keys);
  __m256 out[4];
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    gaussian32_avx2(keys, sample, step, static_cast<uint32_t>(g0 + i), out);
    for (int k = 0; k < 4; ++k) _mm256_storeu_ps(z + 4 * i + 8 * k, out[k]);
  }
  if (i < count) {  // the tail through the same code, so no group depends on where a chunk starts
    alignas(32) float tail[32];
    gaussian32_avx2(keys, sample, step, static_cast<uint32_t>(g0 + i), out);
    for (int k = 0; k < 4; ++k) _mm256_store_ps(tail + 8 * k, out[k]);
    std::memcpy(z + 4 * i, tail, sizeof(float) * 4 * (count - i));
  }
}

// Raw Philox of arbitrary counters (the philox4x32 binding), 8 rows at a time through the same
// rounds as the noise, so that the tests see this path's integers.
FASTDDIM_AVX2 void philox_avx2(const int64_t* ctr, int64_t* res, int64_t m, uint64_t seed) {
  __m256i keys[20];
  philox_keys_avx2(seed, keys);
  const __m256i mask = _mm256_set1_epi64x(0xFFFFFFFF);
  for (int64_t i = 0; i < m; i += 8) {  // rows i .. i+3 in block a, i+4 .. i+7 in block b
    const int64_t rows = std::min<int64_t>(8, m - i);
    int64_t c[32] = {0};
    std::memcpy(c, ctr + 4 * i, sizeof(int64_t) * 4 * rows);
    __m256i w[2][4];
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 4; ++k) w[h][k] = _mm256_setr_epi64x(c[16 * h + k], c[16 * h + 4 + k], c[16 * h + 8 + k], c[16 * h + 12 + k]);
    philox8_avx2(w[0], w[1], keys);
    alignas(32) int64_t o[2][4][4];
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 4; ++k) _mm256_store_si256(reinterpret_cast<__m256i*>(o[h][k]), _mm256_and_si256(w[h][k], mask));
    for (int64_t r = 0; r < rows; ++r)
      for (int k = 0; k < 4; ++k) res[4 * (i + r) + k] = o[r / 4][k][r % 4];
  }
}

// ------------------------------------------------------------------------------------------------
// AVX-512F: the AVX2 path's functions at 16 lanes, op for op (the blends and sign flips through
// masks and integer xors, which move the same bits), so every lane rounds as the AVX2 lane does.
#define FASTDDIM_AVX512 __attribute__((target("avx512f,avx2,fma")))

FASTDDIM_AVX512 inline __m512 and_ps_avx512(__mmask16 k, __m512 v) { return _mm512_maskz_mov_ps(k, v); }
FASTDDIM_AVX512 inline __m512 xor_ps_avx512(__m512 a, __m512 b) {
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}

// log_avx2 at 16 lanes.
FASTDDIM_AVX512 inline __m512 log_avx512(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  __m512 e = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(126)));
  const __m512 m = _mm512_castsi512_ps(  // mantissa in [0.5, 1)
      _mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x007FFFFF)), _mm512_set1_epi32(0x3F000000)));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __mmask16 small = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.70710677f), _CMP_LT_OQ);
  e = _mm512_sub_ps(e, and_ps_avx512(small, one));
  const __m512 f = _mm512_add_ps(_mm512_sub_ps(m, one), and_ps_avx512(small, m));
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 p = _mm512_set1_ps(7.0376836292e-2f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.1514610310e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.1676998740e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.2420140846e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.4249322787e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.6668057665e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.0000714765e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-2.4999993993e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(3.3333331174e-1f));
  const __m512 y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), _mm512_mul_ps(_mm512_mul_ps(p, f), z));
  const __m512 nhf = _mm512_mul_ps(f, _mm512_set1_ps(-0.5f));
  const __m512 h = _mm512_fmadd_ps(nhf, f, f);
  const __m512 eh = _mm512_fmadd_ps(nhf, f, _mm512_sub_ps(f, h));
  const __m512 t = _mm512_mul_ps(e, _mm512_set1_ps(0.693359375f));
  const __m512 hi = _mm512_add_ps(t, h);
  const __m512 lo = _mm512_add_ps(_mm512_sub_ps(t, hi), h);
  return _mm512_add_ps(hi, _mm512_add_ps(lo, _mm512_add_ps(eh, y)));
}

// sincos_avx2 at 16 lanes.
FASTDDIM_AVX512 inline void sincos_avx512(__m512 x, __m512& s, __m512& c) {
  const __m512 qf = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.63661975f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i q = _mm512_cvtps_epi32(qf);
  const __m512 p2 = _mm512_set1_ps(4.371138828673793e-08f);
  const __m512 r1 = _mm512_fmadd_ps(qf, _mm512_set1_ps(-1.5707963705062866f), x);
  const __m512 rh = _mm512_fmadd_ps(qf, p2, r1);
  const __m512 rl = _mm512_fmadd_ps(qf, _mm512_set1_ps(1.7151245100058819e-15f), _mm512_fmadd_ps(qf, p2, _mm512_sub_ps(r1, rh)));
  const __m512 r2 = _mm512_mul_ps(rh, rh);
  __m512 ps = _mm512_fmadd_ps(_mm512_set1_ps(-1.9515295891e-4f), r2, _mm512_set1_ps(8.3321608736e-3f));
  ps = _mm512_fmadd_ps(ps, r2, _mm512_set1_ps(-1.6666654611e-1f));
  const __m512 sr = _mm512_add_ps(rh, _mm512_fmadd_ps(_mm512_mul_ps(ps, r2), rh, rl));
  __m512 pc = _mm512_fmadd_ps(_mm512_set1_ps(2.443315711809948e-5f), r2, _mm512_set1_ps(-1.388731625493765e-3f));
  pc = _mm512_fmadd_ps(pc, r2, _mm512_set1_ps(4.166664568298827e-2f));
  const __m512 one = _mm512_set1_ps(1.0f), nh = _mm512_mul_ps(rh, _mm512_set1_ps(-0.5f));
  const __m512 h = _mm512_fmadd_ps(nh, rh, one);
  const __m512 eh = _mm512_fmadd_ps(nh, rh, _mm512_sub_ps(one, h));
  const __m512 tc = _mm512_fnmadd_ps(rl, rh, _mm512_fmadd_ps(_mm512_mul_ps(r2, r2), pc, eh));
  const __m512 cr = _mm512_add_ps(h, tc);
  const __mmask16 swap = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1));
  const __m512 sign_s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_and_si512(q, _mm512_set1_epi32(2)), 30));
  const __m512 sign_c = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(q, _mm512_set1_epi32(1)), _mm512_set1_epi32(2)), 30));
  s = xor_ps_avx512(_mm512_mask_blend_ps(swap, sr, cr), sign_s);
  c = xor_ps_avx512(_mm512_mask_blend_ps(swap, cr, sr), sign_c);
}

// philox8_avx2 at 8 64-bit lanes per block: two blocks of 8 counters.
FASTDDIM_AVX512 inline void philox16_avx512(__m512i a[4], __m512i b[4], const __m512i keys[20]) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  for (int r = 0; r < 10; ++r) {
    const __m512i k0 = _mm512_load_si512(keys + 2 * r), k1 = _mm512_load_si512(keys + 2 * r + 1);
    for (__m512i* c : {a, b}) {
      const __m512i p0 = _mm512_mul_epu32(c[0], m0), p1 = _mm512_mul_epu32(c[2], m1);
      c[0] = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p1, 32), c[1]), k0);
      c[2] = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p0, 32), c[3]), k1);
      c[1] = p1;
      c[3] = p0;
    }
  }
}

FASTDDIM_AVX512 inline void philox_keys_avx512(uint64_t seed, __m512i keys[20]) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r, k0 += kPhiloxW0, k1 += kPhiloxW1) {
    keys[2 * r] = _mm512_set1_epi32(static_cast<int>(k0));
    keys[2 * r + 1] = _mm512_set1_epi32(static_cast<int>(k1));
  }
}

FASTDDIM_AVX512 inline __m512i interleave_low_avx512(__m512i lo, __m512i hi) {
  return _mm512_mask_blend_epi32(0xAAAA, lo, _mm512_slli_epi64(hi, 32));
}

// box_muller_avx2 at 16 lanes.
FASTDDIM_AVX512 inline void box_muller_avx512(__m512i a, __m512i b, __m512& z0, __m512& z1) {
  const __m512 scale = _mm512_set1_ps(1.1920928955078125e-07f), half_ulp = _mm512_set1_ps(5.9604644775390625e-08f);
  const __m512 ua = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(a, 9)), scale, half_ulp);
  const __m512 ub = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 9)), scale, half_ulp);
  const __m512 r = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log_avx512(ua)));
  __m512 s, c;
  sincos_avx512(_mm512_mul_ps(ub, _mm512_set1_ps(kTwoPi)), s, c);
  z0 = _mm512_mul_ps(r, c);
  z1 = _mm512_mul_ps(r, s);
}

// The 64 normals of groups g .. g + 15 in element order.
FASTDDIM_AVX512 inline void gaussian64_avx512(const __m512i keys[20], uint32_t sample, uint32_t step, uint32_t g, __m512 out[4]) {
  // Block a holds the even groups g, g+2, .., g+14 and block b the odd ones (the counters' high
  // halves never reach a product, so a 64-bit add is the spec's 32-bit one where it matters).
  const __m512i sample_v = _mm512_set1_epi32(static_cast<int>(sample)), step_v = _mm512_set1_epi32(static_cast<int>(step));
  const __m512i even = _mm512_add_epi64(_mm512_set1_epi64(g), _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0));
  __m512i a[4] = {even, sample_v, step_v, _mm512_setzero_si512()};
  __m512i b[4] = {_mm512_add_epi64(even, _mm512_set1_epi64(1)), sample_v, step_v, _mm512_setzero_si512()};
  philox16_avx512(a, b, keys);
  __m512 z0, z1, z2, z3;
  box_muller_avx512(interleave_low_avx512(a[0], b[0]), interleave_low_avx512(a[1], b[1]), z0, z1);
  box_muller_avx512(interleave_low_avx512(a[2], b[2]), interleave_low_avx512(a[3], b[3]), z2, z3);
  // 4x16 -> 16x4 transpose: within each 128-bit lane j as in AVX2 (s_i holds group 4j + i), then
  // the 128-bit lanes: out[k] = lane k of s0, s1, s2, s3.
  const __m512 t0 = _mm512_unpacklo_ps(z0, z1), t1 = _mm512_unpackhi_ps(z0, z1);
  const __m512 t2 = _mm512_unpacklo_ps(z2, z3), t3 = _mm512_unpackhi_ps(z2, z3);
  const __m512 s0 = _mm512_shuffle_ps(t0, t2, 0x44), s1 = _mm512_shuffle_ps(t0, t2, 0xEE);
  const __m512 s2 = _mm512_shuffle_ps(t1, t3, 0x44), s3 = _mm512_shuffle_ps(t1, t3, 0xEE);
  const __m512 u0 = _mm512_shuffle_f32x4(s0, s1, 0x44), u1 = _mm512_shuffle_f32x4(s2, s3, 0x44);
  const __m512 u2 = _mm512_shuffle_f32x4(s0, s1, 0xEE), u3 = _mm512_shuffle_f32x4(s2, s3, 0xEE);
  out[0] = _mm512_shuffle_f32x4(u0, u1, 0x88);
  out[1] = _mm512_shuffle_f32x4(u0, u1, 0xDD);
  out[2] = _mm512_shuffle_f32x4(u2, u3, 0x88);
  out[3] = _mm512_shuffle_f32x4(u2, u3, 0xDD);
}

FASTDDIM_AVX512 void noise_avx512(uint64_t seed, uint32_t sample, uint32_t step, int64_t g0, int64_t count, float* z) {
  alignas(64) __m512i keys[20];
  philox_keys_avx512(seed, keys);
  __m512 out[4];
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    gaussian64_avx512(keys, sample, step, static_cast<uint32_t>(g0 + i), out);
    for (int k = 0; k < 4; ++k) _mm512_storeu_ps(z + 4 * i + 16 * k, out[k]);
  }
  if (i < count) {  // the tail through the same code
    alignas(64) float tail[64];
    gaussian64_avx512(keys, sample, step, static_cast<uint32_t>(g0 + i), out);
    for (int k = 0; k < 4; ++k) _mm512_store_ps(tail + 16 * k, out[k]);
    std::memcpy(z + 4 * i, tail, sizeof(float) * 4 * (count - i));
  }
}

// philox_avx2 at 16 rows: rows i .. i+7 in block a, i+8 .. i+15 in block b.
FASTDDIM_AVX512 void philox_avx512(const int64_t* ctr, int64_t* res, int64_t m, uint64_t seed) {
  alignas(64) __m512i keys[20];
  philox_keys_avx512(seed, keys);
  const __m512i mask = _mm512_set1_epi64(0xFFFFFFFF);
  const __m512i idx = _mm512_set_epi64(28, 24, 20, 16, 12, 8, 4, 0);  // word k of rows 0..7
  for (int64_t i = 0; i < m; i += 16) {
    const int64_t rows = std::min<int64_t>(16, m - i);
    alignas(64) int64_t c[64] = {0};
    std::memcpy(c, ctr + 4 * i, sizeof(int64_t) * 4 * rows);
    __m512i w[2][4];
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 4; ++k) w[h][k] = _mm512_i64gather_epi64(idx, c + 32 * h + k, 8);
    philox16_avx512(w[0], w[1], keys);
    alignas(64) int64_t o[2][4][8];
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 4; ++k) _mm512_store_si512(o[h][k], _mm512_and_si512(w[h][k], mask));
    for (int64_t r = 0; r < rows; ++r)
      for (int k = 0; k < 4; ++k) res[4 * (i + r) + k] = o[r / 8][k][r % 8];
  }
}

// ------------------------------------------------------------------------------------------------
int max_level() {
  __builtin_cpu_init();  // needed when called from a static initializer
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return kSimdScalar;
  return __builtin_cpu_supports("avx512f") ? kSimdAvx512 : kSimdAvx2;
}
#else
int max_level() { return kSimdScalar; }
#endif

// The default level, fixed when the extension loads: the best the processor has, at most
// FASTDDIM_CPU_SIMD's (an unknown value is ignored).
const int g_default_level = [] {
  const char* env = std::getenv("FASTDDIM_CPU_SIMD");
  const int cap = env ? cpu_simd_level(env) : -1;
  return cap >= 0 ? std::min(cap, max_level()) : max_level();
}();
std::atomic<int> g_level{g_default_level};

NoiseFn noise_fn() {
#ifdef FASTDDIM_X86_SIMD
  switch (g_level.load(std::memory_order_relaxed)) {
    case kSimdAvx512: return noise_avx512;
    case kSimdAvx2: return noise_avx2;
    default: break;
  }
#endif
  return noise_scalar;
}

// Runs fn(b, g0, g1) over every chunk of at most kChunk Philox groups of one sample, in parallel.
template <typename Fn>
void for_each_chunk(int64_t batch, int64_t groups, const Fn& fn) {
  at::parallel_for(0, batch * groups, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end;) {
      const int64_t b = p / groups, g0 = p - b * groups;
      const int64_t g1 = std::min({groups, g0 + (end - p), g0 + kChunk});
      fn(b, g0, g1);
      p += g1 - g0;
    }
  });
}

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

template <typename T>
void store_low(void* low, int64_t base, const float* prev, int64_t n) {
  T* dst = static_cast<T*>(low) + base;
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(prev[i]);
}

// The low-precision copy of a chunk's x_{t-1}, when asked for.
void store_low_chunk(const StepArgs& a, int64_t base, const float* prev, int64_t n) {
  if (a.low_dtype == kBF16) store_low<c10::BFloat16>(a.low, base, prev, n);
  if (a.low_dtype == kF16) store_low<c10::Half>(a.low, base, prev, n);
}

// A guided chunk's model output g (and for CFG++ u, as float) into L1 buffers, in a loop of its
// own: the step's element loop then reads floats from local arrays, as it reads the noise, and
// vectorises as the unguided one does (GCC gives up on the loop with the combine fused in,
// "control flow in loop", with noise or a bf16/fp16 output). The scalars are a local copy (through
// a reference they would be reloaded after every store) and RESCALE a template flag (GCC does not
// vectorise around the runtime select the CUDA kernel uses).
template <typename OutT, int GUIDE, bool RESCALE>
void guide_chunk(const GuideArgs& ga, int64_t b, int64_t base, const OutT* __restrict__ o, int64_t len,
                 float* __restrict__ g, float* __restrict__ ue) {
  const GuideArgs args = ga;
  const float r = RESCALE ? ga.ratio[b] : 1.0f;
  const OutT* __restrict__ u = static_cast<const OutT*>(ga.out_uncond) + base;
  for (int64_t i = 0; i < len; ++i) {
    const float uv = to_float(u[i]);
    g[i] = guided<GUIDE>(uv, to_float(o[i]), args, RESCALE, r);
    if (GUIDE == kGuideCfgpp) ue[i] = uv;
  }
}

// The chunk buffers guide_chunk fills (one element where a variant does not use them).
template <int GUIDE>
struct GuideBuffers {
  alignas(64) float g[GUIDE == kGuideNone ? 1 : kChunk * 4];
  alignas(64) float u[GUIDE == kGuideCfgpp ? kChunk * 4 : 1];
};

template <typename OutT, int PRED, bool NOISE, bool WRITE_X0, int GUIDE, bool RESCALE>
void step_loop(const StepArgs& a, const GuideArgs& ga) {
  const float* row = a.table + a.j * 6;
  const Coefs c{row[0], row[1], row[2], row[3], row[4], row[5]};
  const int64_t n = a.numel, groups = (n + 3) / 4;
  const uint64_t seed = static_cast<uint64_t>(a.rng[0]);
  const int64_t first = a.rng[1];
  const uint32_t step = static_cast<uint32_t>(a.j + 1);
  const OutT* out = static_cast<const OutT*>(a.out);
  const NoiseFn noise = noise_fn();

  for_each_chunk(a.batch, groups, [&](int64_t b, int64_t g0, int64_t g1) {
    alignas(64) float z[kChunk * 4];
    const int64_t e0 = 4 * g0, len = std::min(n, 4 * g1) - e0, base = b * n + e0;
    const float* __restrict__ x = a.x + base;
    const OutT* __restrict__ o = out + base;
    float* __restrict__ prev = a.prev + base;
    if (NOISE) noise(seed, static_cast<uint32_t>(first + b), step, g0, g1 - g0, z);
    const Mode m = sample_mode(a, b);
    GuideBuffers<GUIDE> gb;
    if constexpr (GUIDE != kGuideNone) guide_chunk<OutT, GUIDE, RESCALE>(ga, b, base, o, len, gb.g, gb.u);
    float* __restrict__ x0 = WRITE_X0 ? a.x0 + base : nullptr;
    for (int64_t i = 0; i < len; ++i) {
      float x0v;
      const float g = GUIDE == kGuideNone ? to_float(o[i]) : gb.g[i];
      const float v = step_mean<PRED>(x[i], g, GUIDE == kGuideCfgpp ? gb.u[i] : g, c, m, x0v);
      prev[i] = NOISE ? v + c.sigma * z[i] : v;
      if (WRITE_X0) x0[i] = x0v;
    }
    store_low_chunk(a, base, prev, len);
  });
}

// The DPM-Solver++(2M) step: no noise, so a plain loop over the chunks that the compiler
// vectorises; x0 always written (it is the next step's x0_prev). 16-20 B per element at fp32
// (4 B more for a guided step's u).
template <typename OutT, int PRED, bool SECOND, int GUIDE, bool RESCALE>
void dpm_loop(const StepArgs& a, const float* x0_prev, const GuideArgs& ga) {
  const float* row = a.table + a.j * 6;
  const DpmCoefs c{row[0], row[1], row[2], row[3], row[4], row[5]};
  const int64_t n = a.numel;
  const OutT* out = static_cast<const OutT*>(a.out);
  for_each_chunk(a.batch, (n + 3) / 4, [&](int64_t b, int64_t g0, int64_t g1) {
    const int64_t e0 = 4 * g0, len = std::min(n, 4 * g1) - e0, base = b * n + e0;
    const float* __restrict__ x = a.x + base;
    const OutT* __restrict__ o = out + base;
    const float* __restrict__ xp = SECOND ? x0_prev + base : nullptr;
    float* __restrict__ prev = a.prev + base;
    float* __restrict__ x0 = a.x0 + base;
    const Mode m = sample_mode(a, b);
    GuideBuffers<GUIDE> gb;
    if constexpr (GUIDE != kGuideNone) guide_chunk<OutT, GUIDE, RESCALE>(ga, b, base, o, len, gb.g, gb.u);
    for (int64_t i = 0; i < len; ++i) {
      float x0v;
      const float g = GUIDE == kGuideNone ? to_float(o[i]) : gb.g[i];
      prev[i] = dpm_step<PRED, SECOND>(x[i], g, SECOND ? xp[i] : 0.0f, c, m, x0v);
      x0[i] = x0v;
    }
    store_low_chunk(a, base, prev, len);
  });
}

template <typename OutT, int PRED, int GUIDE, bool RESCALE>
void step_flags(const StepArgs& a, const SolverArgs& sv, const GuideArgs& ga) {
  if constexpr (GUIDE != kGuideCfgpp) {  // CFG++ is a DDIM update (checked in bindings.cpp)
    if (sv.solver == kSolverDpm2) return dpm_loop<OutT, PRED, true, GUIDE, RESCALE>(a, sv.x0_prev, ga);
    if (sv.solver == kSolverDpm1) return dpm_loop<OutT, PRED, false, GUIDE, RESCALE>(a, nullptr, ga);
  }
  if (a.noise) {
    a.x0 ? step_loop<OutT, PRED, true, true, GUIDE, RESCALE>(a, ga) : step_loop<OutT, PRED, true, false, GUIDE, RESCALE>(a, ga);
  } else {
    a.x0 ? step_loop<OutT, PRED, false, true, GUIDE, RESCALE>(a, ga) : step_loop<OutT, PRED, false, false, GUIDE, RESCALE>(a, ga);
  }
}

template <typename OutT, int PRED>
void step_guide(const StepArgs& a, const SolverArgs& sv, const GuideArgs& ga) {
  switch (ga.guide) {
    case kGuideCfg:
      return ga.ratio ? step_flags<OutT, PRED, kGuideCfg, true>(a, sv, ga) : step_flags<OutT, PRED, kGuideCfg, false>(a, sv, ga);
    case kGuideCfgpp: return step_flags<OutT, PRED, kGuideCfgpp, false>(a, sv, ga);
    default: return step_flags<OutT, PRED, kGuideNone, false>(a, sv, ga);
  }
}

template <typename OutT>
void step_pred(const StepArgs& a, const SolverArgs& sv, const GuideArgs& ga) {
  switch (a.pred) {
    case kEpsilon: return step_guide<OutT, kEpsilon>(a, sv, ga);
    case kSample: return step_guide<OutT, kSample>(a, sv, ga);
    default: return step_guide<OutT, kVPrediction>(a, sv, ga);
  }
}

// One sample's rescale ratio (rescale_ratio_cpu). Sums of d = v - v[0] and d^2 for v = c and g,
// in kLanes independent double accumulators (a chain the compiler can vectorise without
// reassociating), combined at the end.
template <typename T>
float sample_ratio(const T* __restrict__ u, const T* __restrict__ c, int64_t n, float w) {
  constexpr int kLanes = 8;
  const float c0 = to_float(c[0]), g0 = combine(to_float(u[0]), c0, w);
  double sc[kLanes] = {}, qc[kLanes] = {}, sg[kLanes] = {}, qg[kLanes] = {};
  const auto add = [&](int k, int64_t i) {
    const float cv = to_float(c[i]), g = combine(to_float(u[i]), cv, w);
    const double dc = static_cast<double>(cv) - c0, dg = static_cast<double>(g) - g0;
    sc[k] += dc;
    qc[k] += dc * dc;
    sg[k] += dg;
    qg[k] += dg * dg;
  };
  int64_t i0 = 0;
  for (; i0 + kLanes <= n; i0 += kLanes)
    for (int k = 0; k < kLanes; ++k) add(k, i0 + k);
  for (int k = 0; i0 + k < n; ++k) add(k, i0 + k);
  for (int k = 1; k < kLanes; ++k) {
    sc[0] += sc[k];
    qc[0] += qc[k];
    sg[0] += sg[k];
    qg[0] += qg[k];
  }
  const double nd = static_cast<double>(n);
  const double var_c = (qc[0] - sc[0] * sc[0] / nd) / (nd - 1), var_g = (qg[0] - sg[0] * sg[0] / nd) / (nd - 1);
  return static_cast<float>(std::sqrt(var_c / var_g));
}

template <typename T>
void ratio_loop(const void* u, const void* c, int64_t batch, int64_t numel, float w, float* ratio) {
  const T* uu = static_cast<const T*>(u);
  const T* cc = static_cast<const T*>(c);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) ratio[b] = sample_ratio(uu + b * numel, cc + b * numel, numel, w);
  });
}

}  // namespace

void ddim_step_cpu(const StepArgs& a, const SolverArgs& sv, const GuideArgs& ga) {
  switch (a.out_dtype) {
    case kF32: return step_pred<float>(a, sv, ga);
    case kBF16: return step_pred<c10::BFloat16>(a, sv, ga);
    default: return step_pred<c10::Half>(a, sv, ga);
  }
}

void rescale_ratio_cpu(const void* u, const void* c, int dtype, int64_t batch, int64_t numel, float w, float* ratio) {
  if (numel == 0) {  // torch's std of no elements: NaN
    std::fill(ratio, ratio + batch, NAN);
    return;
  }
  switch (dtype) {
    case kF32: return ratio_loop<float>(u, c, batch, numel, w, ratio);
    case kBF16: return ratio_loop<c10::BFloat16>(u, c, batch, numel, w, ratio);
    default: return ratio_loop<c10::Half>(u, c, batch, numel, w, ratio);
  }
}

void normal_cpu(float* res, int64_t n, int64_t numel, const int64_t* rng, int64_t step) {
  const uint64_t seed = static_cast<uint64_t>(rng[0]);
  const int64_t first = rng[1];
  const NoiseFn noise = noise_fn();
  for_each_chunk(n, (numel + 3) / 4, [&](int64_t b, int64_t g0, int64_t g1) {
    // Through a buffer: a sample's last group may be partial, and its 4 lanes must not spill
    // into the next sample.
    alignas(64) float z[kChunk * 4];
    noise(seed, static_cast<uint32_t>(first + b), static_cast<uint32_t>(step), g0, g1 - g0, z);
    const int64_t e0 = 4 * g0;
    std::memcpy(res + b * numel + e0, z, sizeof(float) * (std::min(numel, 4 * g1) - e0));
  });
}

const char* cpu_simd(int level) {
  // True: the default path where it is a SIMD one, else AVX2 (raising where that is missing too).
  if (level == kSimdDefault) level = std::max<int>(g_default_level, kSimdAvx2);
  if (level != kSimdAsk) {
    TORCH_CHECK(level >= kSimdScalar && level <= kSimdAvx512, "cpu_simd: no level ", level);
    TORCH_CHECK(level <= max_level(), "cpu_simd: this processor or build has no ",
                level == kSimdAvx512 ? "AVX-512F" : "AVX2+FMA", " noise path");
    g_level.store(level);
  }
  static const char* const names[] = {"scalar", "avx2", "avx512"};
  return names[g_level.load()];
}

void philox_cpu(const int64_t* ctr, int64_t* res, int64_t m, uint64_t seed) {
#ifdef FASTDDIM_X86_SIMD
  if (g_level.load() == kSimdAvx512) return philox_avx512(ctr, res, m, seed);
  if (g_level.load() == kSimdAvx2) return philox_avx2(ctr, res, m, seed);
#endif
  for (int64_t i = 0; i < m; ++i) {
    uint32_t c[4];
    for (int k = 0; k < 4; ++k) c[k] = static_cast<uint32_t>(ctr[4 * i + k]);
    philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    for (int k = 0; k < 4; ++k) res[4 * i + k] = c[k];
  }
}

}  // namespace fastddim
