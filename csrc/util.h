// Small helpers the core uses wherever sizes are multiplied or values must be finite.
#pragma once

#include "ort_env.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

namespace chattts {

// The product of non-negative sizes, or an Error naming what was being sized: no size computed from user
// input (batch, context, prompt length) can wrap around and under-allocate a buffer.
inline int64_t checked_product(std::initializer_list<int64_t> xs, const char* what) {
  int64_t r = 1;
  for (int64_t x : xs) {
    if (x < 0 || __builtin_mul_overflow(r, x, &r))
      throw Error(std::string("size of ") + what + " overflows (a batch, context or prompt far too large)");
  }
  return r;
}

// Work buffers only grow (to the largest batch or prompt seen); a step never allocates.
template <typename T>
void grow(std::vector<T>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
}

// True when no value is NaN or +-inf. Tests the exponent bits with integer operations, which the compiler
// vectorises (a float reduction would not be, without -ffast-math).
inline bool all_finite(const float* p, size_t n) {
  uint32_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, p + i, sizeof u);
    bad |= ((u & 0x7f800000u) + 0x00800000u) >> 31;  // exponent all ones -> bit 31 set
  }
  return bad == 0;
}

// The draw noise: xoshiro256** seeded through splitmix64 (small, fast, the same stream on every platform for a
// given seed), turned into Exp(1) samples -log(u), u in (0, 1], floored so p / q never divides by zero.
inline void seed_rng(uint64_t seed, uint64_t* s) {
  for (int i = 0; i < 4; ++i) {
    uint64_t z = (seed += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    s[i] = z ^ (z >> 31);
  }
}

inline uint64_t next_u64(uint64_t* s) {
  auto rotl = [](uint64_t x, int k) { return (x << k) | (x >> (64 - k)); };
  uint64_t result = rotl(s[1] * 5, 7) * 9;
  uint64_t t = s[1] << 17;
  s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
  s[2] ^= t; s[3] = rotl(s[3], 45);
  return result;
}

inline void exp_noise(uint64_t* s, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    double u = double((next_u64(s) >> 11) + 1) * (1.0 / 9007199254740992.0);
    dst[i] = std::max(float(-std::log(u)), 1e-30f);
  }
}

}  // namespace chattts
