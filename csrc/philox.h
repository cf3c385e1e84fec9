// Counter-based Gaussian noise, bit for bit fastddim/noise.py's spec (read it there).
// Shared by the CPU and CUDA step kernels: the integer part is exact on both; the float part
// differs from the torch reference only by the ulp of each libm's log/cos/sin. This is the
// scalar form (the CUDA kernels, and the CPU's portable path); ddim_step_cpu.cpp has the CPU's
// AVX2 form of the same numbers.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTDDIM_HD __host__ __device__ __forceinline__
#else
#define FASTDDIM_HD inline
#endif

namespace fastddim {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr float kTwoPi = 6.2831855f;  // float32(2 pi), as in the spec

// Philox-4x32-10 on c in place (Salmon et al. SC'11 / Random123).
FASTDDIM_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c[2];
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k1;
    c[1] = static_cast<uint32_t>(p1);
    c[3] = static_cast<uint32_t>(p0);
    c[0] = n0;
    c[2] = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Top 23 bits, centred: exact in float32, in [2^-24, 1 - 2^-24], never 0 (so log is finite).
FASTDDIM_HD float uniform_from_bits(uint32_t x) {
  return (static_cast<float>(x >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

FASTDDIM_HD void box_muller(uint32_t a, uint32_t b, float& z0, float& z1) {
#if defined(__CUDA_ARCH__)
  const float r = sqrtf(-2.0f * logf(uniform_from_bits(a)));  // accurate: no --use_fast_math
  float s, c;
  sincosf(uniform_from_bits(b) * kTwoPi, &s, &c);
  z0 = r * c;
  z1 = r * s;
#else
  const float r = std::sqrt(-2.0f * std::log(uniform_from_bits(a)));
  const float theta = uniform_from_bits(b) * kTwoPi;
  z0 = r * std::cos(theta);
  z1 = r * std::sin(theta);
#endif
}

// The four normals of Philox group g (elements 4g .. 4g+3) of a sample at a noise step.
FASTDDIM_HD void gaussian4(uint64_t seed, uint32_t g, uint32_t sample, uint32_t step, float z[4]) {
  uint32_t c[4] = {g, sample, step, 0u};
  philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller(c[0], c[1], z[0], z[1]);
  box_muller(c[2], c[3], z[2], z[3]);
}

}  // namespace fastddim
