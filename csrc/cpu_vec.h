// x86 vector loads shared by the CPU kernels: eight (AVX2) or sixteen (AVX-512) values of any
// supported dtype as float32 lanes. The kernels that use them are compiled for AVX2/F16C or
// AVX-512 by attribute and chosen at run time, so the rest of the library still runs on any
// x86-64 processor.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MARSTORE_X86 1
#define MARSTORE_AVX2 __attribute__((target("avx2,f16c")))
#define MARSTORE_AVX512 __attribute__((target("avx512f,avx2,f16c")))

namespace marstore {

MARSTORE_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// bfloat16 is the top half of a float32: widened by a 16-bit shift, exactly.
MARSTORE_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}

MARSTORE_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The AVX-512 code uses the zero-masking forms with every lane kept: they compile to the same
// instructions, where the plain forms' undefined pass-through register makes GCC 12 warn
// (a false positive, GCC bug 105593).
constexpr __mmask16 kAllLanes = 0xffff;

MARSTORE_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

MARSTORE_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(
      _mm512_maskz_slli_epi32(kAllLanes, _mm512_maskz_cvtepu16_epi32(kAllLanes, b), 16));
}

}  // namespace marstore
#endif
