// Native float vectors for the CPU kernels (kernels/*/cpu_*.cc), through GCC / Clang vector extensions,
// so one source builds for AVX-512 (one zmm, 16 floats), AVX2 (8 floats) and NEON (8 floats in two q
// registers): loads and stores of float32 or bfloat16 bits (widened by a 16-bit shift), and the scalar
// widening. kernels/native_build.py compiles each kernel with this directory on the include path and
// keys its build on this file too.

#pragma once

#include <cstdint>
#include <cstring>

namespace native {

#if defined(__AVX512F__)
constexpr int kVectorLanes = 16;
#else
constexpr int kVectorLanes = 8;
#endif

typedef float vec __attribute__((vector_size(kVectorLanes * 4)));
typedef int32_t ivec __attribute__((vector_size(kVectorLanes * 4)));
typedef uint32_t uvec __attribute__((vector_size(kVectorLanes * 4)));
typedef uint16_t hvec __attribute__((vector_size(kVectorLanes * 2)));

inline vec splat(float x) { return vec{} + x; }
inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vec load(const uint16_t* p) {  // bfloat16 bits: float32 is a 16-bit shift of them
  hvec h;
  std::memcpy(&h, p, sizeof h);
  const uvec u = __builtin_convertvector(h, uvec) << 16;
  vec v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

// Elements: float32, or bfloat16 stored as its 16 high bits.
inline float widen(float x) { return x; }
inline float widen(uint16_t x) {
  const uint32_t bits = uint32_t{x} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace native
