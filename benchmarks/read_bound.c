// Reference loops for bench_transfer's multi-tensor case on the CPU, outside Python and torch:
// two OpenMP threads over the 24 float32 sources of 256 KB (hot in cache, as the benchmark
// repeats them), called back to back.
//   read only             only reads the sources: what the memory hierarchy gives
//   read, convert, write  a plain AVX2/F16C loop, four conversions a step, whole 32-byte
//                         stores: what the conversion costs on top, with no call overhead
// Compare them with marstore's pass called directly (marstore._C.cast_copy_many_into) in a
// tight loop, and with the benchmark's figures, where each call follows other contenders.
// (The fourth session's version of the second loop let vcvtps2ph store 16 bytes straight to
// memory; that form is much slower on this Zen 3 core: 128-187 us instead of 76-91.)
//   gcc -O2 -mavx2 -mf16c -fopenmp benchmarks/read_bound.c -o /tmp/read_bound && /tmp/read_bound
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { kTensors = 24, kBytes = 256 * 1024, kFloats = kBytes / 4, kRepeats = 400 };

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int by_value(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

int main(void) {
  float* src[kTensors];
  for (int i = 0; i < kTensors; ++i) {
    src[i] = aligned_alloc(64, kBytes);
    for (int j = 0; j < kFloats; ++j) src[i][j] = (float)j * 0.5f;
  }
  unsigned short* dst = aligned_alloc(64, (size_t)kTensors * kFloats * 2);
  double times[2][kRepeats];
  volatile float sink = 0;
  for (int r = 0; r < kRepeats; ++r) {
    for (int mode = 0; mode < 2; ++mode) {  // 0: read only, 1: read, convert, write
      const double start = now();
#pragma omp parallel num_threads(2)
      {
        const int half = kTensors / 2, first = omp_get_thread_num() * half;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;  // four chains: not latency-bound
        for (int i = first; i < first + half; ++i) {
          const float* s = src[i];
          if (mode == 0) {
            for (int j = 0; j < kFloats; j += 32) {
              a0 = _mm256_add_ps(a0, _mm256_load_ps(s + j));
              a1 = _mm256_add_ps(a1, _mm256_load_ps(s + j + 8));
              a2 = _mm256_add_ps(a2, _mm256_load_ps(s + j + 16));
              a3 = _mm256_add_ps(a3, _mm256_load_ps(s + j + 24));
            }
          } else {
            unsigned short* d = dst + (size_t)i * kFloats;
            for (int j = 0; j < kFloats; j += 32) {
              const __m128i h0 = _mm256_cvtps_ph(_mm256_load_ps(s + j), 0);
              const __m128i h1 = _mm256_cvtps_ph(_mm256_load_ps(s + j + 8), 0);
              const __m128i h2 = _mm256_cvtps_ph(_mm256_load_ps(s + j + 16), 0);
              const __m128i h3 = _mm256_cvtps_ph(_mm256_load_ps(s + j + 24), 0);
              _mm256_store_si256((__m256i*)(d + j), _mm256_set_m128i(h1, h0));
              _mm256_store_si256((__m256i*)(d + j + 16), _mm256_set_m128i(h3, h2));
            }
          }
        }
        float out[8];
        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        sink += out[0];
      }
      times[mode][r] = now() - start;
    }
  }
  const char* names[2] = {"read only", "read, convert, write"};
  for (int mode = 0; mode < 2; ++mode) {
    qsort(times[mode], kRepeats, sizeof(double), by_value);
    printf("%-22s median %6.1f us, min %6.1f us (24 x 256 KB float32, 2 threads)\n", names[mode],
           times[mode][kRepeats / 2] * 1e6, times[mode][0] * 1e6);
  }
  return 0;
}
