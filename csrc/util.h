// Small helpers the core uses wherever sizes are multiplied or values must be finite.
#pragma once

#include "ort_env.h"

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>

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

// True when no value is NaN or +-inf. Tests the exponent bits with integer operations, which the compiler
// vectorises (a float reduction would not be, without -ffast-math): ~0.1 us per 768 values.
inline bool all_finite(const float* p, size_t n) {
  uint32_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, p + i, sizeof u);
    bad |= ((u & 0x7f800000u) + 0x00800000u) >> 31;  // exponent all ones -> bit 31 set
  }
  return bad == 0;
}

}  // namespace chattts
