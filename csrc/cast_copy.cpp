// The cast-copy operators: schema and CPU kernels.
//
// cast_copy(src, dst) converts src (float32, bfloat16 or float16, any strides) into the
// preallocated host tensor dst and returns int64 [nonfinite, overflow] counts, where overflow
// counts finite values that become infinite in dst's dtype. cast_copy_many does the same for a
// list of sources into regions of one destination, in one parallel pass. The results are
// bit-identical to torch's own `src.to(dst.dtype)` on this processor, NaN payloads included.

#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "cast_copy.h"
#include "cpu_vec.h"

namespace marstore {
namespace {

constexpr int64_t kGrain = 1 << 15;  // fewest elements in a work item: torch's own grain
constexpr int64_t kItemsPerThread = 8;
// Above this many destination bytes, non-temporal stores skip reading the destination lines
// into cache (the copy is streamed to a buffer that another thread reads much later).
constexpr int64_t kStreamingBytes = 4 << 20;
// Such copies also prefetch their source 4 KB ahead: it comes from memory, and the hardware
// prefetcher alone kept fewer loads in flight (16-64 MB: 1.15-1.2x copy_ without, 1.3x with,
// caches flushed before each call; smaller, cache-resident sources gained nothing).
constexpr uintptr_t kPrefetchBytes = 4096;

struct Counts {
  int64_t nonfinite = 0;
  int64_t overflow = 0;
};

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// |x| at or above this is finite but rounds to infinity in float16 (65520 is a tie that rounds
// to even, i.e. up to infinity, since 65504's last mantissa bit is odd).
constexpr uint32_t kHalfOverflowBits = 0x477ff000;
constexpr uint32_t kInfBits = 0x7f800000;

// Scalar float32 -> float16 with the results of the F16C instruction that torch uses on x86:
// round to nearest even; a NaN keeps its sign and the top 9 payload bits, and is made quiet.
inline uint16_t half_bits_from_float(float x) {
  const uint32_t u = bits_of(x);
  if ((u & 0x7fffffff) > kInfBits) {
    return static_cast<uint16_t>(((u >> 16) & 0x8000) | 0x7e00 | ((u >> 13) & 0x3ff));
  }
  return c10::Half(x).x;
}

inline void count_float(uint32_t u, uint32_t overflow_bits, Counts& c) {
  const uint32_t a = u & 0x7fffffff;
  c.nonfinite += a >= kInfBits;
  c.overflow += (a < kInfBits) & (a >= overflow_bits);
}

// Generic scalar loops, one per supported (source, destination) pair.
void f32_to_f16_scalar(const float* s, uint16_t* d, int64_t n, Counts& c) {
  for (int64_t i = 0; i < n; ++i) {
    count_float(bits_of(s[i]), kHalfOverflowBits, c);
    d[i] = half_bits_from_float(s[i]);
  }
}
void bf16_to_f16_scalar(const uint16_t* s, uint16_t* d, int64_t n, Counts& c) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = float_of(static_cast<uint32_t>(s[i]) << 16);
    count_float(bits_of(x), kHalfOverflowBits, c);
    d[i] = half_bits_from_float(x);
  }
}
// Widening keeps a NaN's sign and payload and makes it quiet, as F16C's vcvtph2ps does (torch
// uses that instruction in its vector body; its scalar tail returns 0x7fffffff instead).
void f16_to_f32_scalar(const uint16_t* s, float* d, int64_t n, Counts& c) {
  for (int64_t i = 0; i < n; ++i) {
    const bool nonfinite = (s[i] & 0x7c00) == 0x7c00;
    c.nonfinite += nonfinite;
    if (nonfinite && (s[i] & 0x3ff)) {
      d[i] = float_of((static_cast<uint32_t>(s[i] & 0x8000) << 16) | 0x7fc00000 |
                      (static_cast<uint32_t>(s[i] & 0x3ff) << 13));
    } else {
      d[i] = static_cast<float>(c10::Half(s[i], c10::Half::from_bits()));
    }
  }
}
void bf16_to_f32_scalar(const uint16_t* s, float* d, int64_t n, Counts& c) {
  for (int64_t i = 0; i < n; ++i) {
    c.nonfinite += (s[i] & 0x7f80) == 0x7f80;
    d[i] = float_of(static_cast<uint32_t>(s[i]) << 16);
  }
}
// Same-dtype copies: the bytes move unchanged; only the non-finite values are counted.
void copy16_scalar(const uint16_t* s, uint16_t* d, int64_t n, uint16_t exp_mask, Counts& c) {
  std::memcpy(d, s, n * sizeof(uint16_t));
  int64_t nonfinite = 0;
  for (int64_t i = 0; i < n; ++i) nonfinite += (s[i] & exp_mask) == exp_mask;
  c.nonfinite += nonfinite;
}
void copy32_scalar(const float* s, float* d, int64_t n, Counts& c) {
  std::memcpy(d, s, n * sizeof(float));
  int64_t nonfinite = 0;
  for (int64_t i = 0; i < n; ++i) nonfinite += (bits_of(s[i]) & kInfBits) == kInfBits;
  c.nonfinite += nonfinite;
}

#ifdef MARSTORE_X86
bool detect_f16c() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}

// Eight float32 lanes -> eight float16 lanes (round to nearest even, as torch).
MARSTORE_AVX2 inline __m128i convert8(__m256 x) {
  return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// The screen runs on the float16 results: a finite source that overflows becomes infinity,
// and a non-finite one stays non-finite, so one unsigned max of |h| over 16 lanes tells
// whether a span needs exact counting (nearly never); it costs two operations per 16 values.
constexpr uint16_t kHalfExpBits = 0x7c00;

MARSTORE_AVX2 inline uint16_t lane_max16(__m256i v) {
  alignas(32) uint16_t lanes[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  return *std::max_element(lanes, lanes + 16);
}

template <typename Src>
MARSTORE_AVX2 inline __m256i convert16(const Src* p) {
  return _mm256_set_m128i(convert8(load8(p + 8)), convert8(load8(p)));
}

template <bool kStream>
MARSTORE_AVX2 inline void store16(uint16_t* d, __m256i h) {
  if (kStream) _mm256_stream_si256(reinterpret_cast<__m256i*>(d), h);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), h);
}

template <typename Src, bool kStream>
MARSTORE_AVX2 void to_f16_avx2(const Src* s, uint16_t* d, int64_t n, Counts& c) {
  constexpr bool kFloat = std::is_same_v<Src, float>;
  int64_t i = 0;
  if (kStream) {  // 32-byte streaming stores need a 32-byte aligned destination
    i = std::min<int64_t>(n, ((32 - reinterpret_cast<uintptr_t>(d) % 32) % 32) / sizeof(uint16_t));
    if constexpr (kFloat) f32_to_f16_scalar(s, d, i, c);
    else bf16_to_f16_scalar(reinterpret_cast<const uint16_t*>(s), d, i, c);
  }
  const int64_t vec_begin = i;
  const __m256i magnitude = _mm256_set1_epi16(0x7fff);
  __m256i largest = _mm256_setzero_si256();
  // 32 values per iteration: independent conversions keep more loads in flight.
  for (; i + 32 <= n; i += 32) {
    if constexpr (kStream) {  // a large copy, read from memory: prefetch ahead (an address: no fault past the end)
      const uintptr_t ahead = reinterpret_cast<uintptr_t>(s + i) + kPrefetchBytes;
      _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
      if constexpr (sizeof(Src) == 4) _mm_prefetch(reinterpret_cast<const char*>(ahead + 64), _MM_HINT_T0);
    }
    const __m256i h0 = convert16(s + i), h1 = convert16(s + i + 16);
    largest = _mm256_max_epu16(largest, _mm256_and_si256(h0, magnitude));
    largest = _mm256_max_epu16(largest, _mm256_and_si256(h1, magnitude));
    store16<kStream>(d + i, h0);
    store16<kStream>(d + i + 16, h1);
  }
  for (; i + 16 <= n; i += 16) {
    const __m256i h = convert16(s + i);
    largest = _mm256_max_epu16(largest, _mm256_and_si256(h, magnitude));
    store16<kStream>(d + i, h);
  }
  if (lane_max16(largest) >= kHalfExpBits) {  // rare: count this span exactly
    for (int64_t k = vec_begin; k < i; ++k) {
      uint32_t bits;
      if constexpr (kFloat) bits = bits_of(s[k]);
      else bits = static_cast<uint32_t>(s[k].x) << 16;
      count_float(bits, kHalfOverflowBits, c);
    }
  }
  if constexpr (kFloat) f32_to_f16_scalar(s + i, d + i, n - i, c);
  else bf16_to_f16_scalar(reinterpret_cast<const uint16_t*>(s + i), d + i, n - i, c);
}
#else
bool detect_f16c() { return false; }
#endif

const bool kHaveF16C = detect_f16c();

// Converts elements [begin, end) of one source into the destination.
void convert_span(const at::Tensor& src, void* dst_base, at::ScalarType dst_type, int64_t begin,
                  int64_t end, bool streaming, Counts& c) {
  const int64_t n = end - begin;
  const auto src_type = src.scalar_type();
  const char* s = static_cast<const char*>(src.const_data_ptr()) + begin * src.element_size();
  char* d = static_cast<char*>(dst_base) + begin * c10::elementSize(dst_type);
  const auto* s16 = reinterpret_cast<const uint16_t*>(s);
  const auto* s32 = reinterpret_cast<const float*>(s);
  auto* d16 = reinterpret_cast<uint16_t*>(d);
  auto* d32 = reinterpret_cast<float*>(d);
  if (dst_type == at::kHalf) {
    if (src_type == at::kHalf) return copy16_scalar(s16, d16, n, 0x7c00, c);
#ifdef MARSTORE_X86
    if (kHaveF16C) {
      if (src_type == at::kFloat) {
        return streaming ? to_f16_avx2<float, true>(s32, d16, n, c)
                         : to_f16_avx2<float, false>(s32, d16, n, c);
      }
      const auto* bf16 = reinterpret_cast<const c10::BFloat16*>(s);
      return streaming ? to_f16_avx2<c10::BFloat16, true>(bf16, d16, n, c)
                       : to_f16_avx2<c10::BFloat16, false>(bf16, d16, n, c);
    }
#endif
    if (src_type == at::kFloat) return f32_to_f16_scalar(s32, d16, n, c);
    return bf16_to_f16_scalar(s16, d16, n, c);
  }
  if (dst_type == at::kFloat) {
    if (src_type == at::kFloat) return copy32_scalar(s32, d32, n, c);
    if (src_type == at::kHalf) return f16_to_f32_scalar(s16, d32, n, c);
    return bf16_to_f32_scalar(s16, d32, n, c);
  }
  return copy16_scalar(s16, d16, n, 0x7f80, c);  // bfloat16 -> bfloat16
}

// Converts every source into its region of dst in one parallel pass over all of them, small
// or large, and writes each source's [nonfinite, overflow] counts to counts_out.
void convert_all(at::TensorList srcs, const at::Tensor& dst, at::IntArrayRef offsets,
                 int64_t* counts_out) {
  // Small vectors: for the few sources of a typical call, no heap allocation at all.
  c10::SmallVector<at::Tensor, 16> sources;
  int64_t total = 0;
  for (const auto& s : srcs) {
    sources.push_back(s.contiguous());
    total += s.numel();
  }
  // Items are spans of one source, about an eighth of a thread's share (at least kGrain
  // elements), handed out one at a time from a shared counter: a thread that starts late or
  // runs on a slower core (a VM's vCPUs are not alike) takes fewer, where an even static
  // split waits for the slowest. One fork/join covers all sources, however many.
  const int64_t threads = at::get_num_threads();
  const int64_t piece = std::max(kGrain, total / (threads * kItemsPerThread));
  struct Item {
    size_t tensor;
    int64_t begin, end;
    Counts counts;
  };
  c10::SmallVector<Item, 32> items;
  for (size_t t = 0; t < sources.size(); ++t) {
    const int64_t n = sources[t].numel();
    for (int64_t b = 0; b < n; b += piece) items.push_back({t, b, std::min(n, b + piece), {}});
  }
  const auto dst_type = dst.scalar_type();
  const bool streaming = total * dst.element_size() >= kStreamingBytes;
  char* dst_base = static_cast<char*>(dst.data_ptr());
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(threads, static_cast<int64_t>(items.size()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (size_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < items.size();) {
      Item& it = items[k];
      Counts c;  // local: items of different threads share cache lines
      convert_span(sources[it.tensor], dst_base + offsets[it.tensor] * dst.element_size(), dst_type,
                   it.begin, it.end, streaming, c);
      it.counts = c;
    }
#ifdef MARSTORE_X86
    // Each thread orders its own non-temporal stores before the join that lets the caller
    // (or the thread that reads the slot next) see dst.
    if (streaming) _mm_sfence();
#endif
  });
  std::fill(counts_out, counts_out + 2 * sources.size(), 0);
  for (const Item& it : items) {
    counts_out[2 * it.tensor] += it.counts.nonfinite;
    counts_out[2 * it.tensor + 1] += it.counts.overflow;
  }
}

void cast_copy_many_into_cpu(at::TensorList srcs, const at::Tensor& dst, at::IntArrayRef offsets,
                             const at::Tensor& counts, int64_t /*mode*/) {
  check_destination("cast_copy_many", srcs, dst, offsets);
  check_counts("cast_copy_many", srcs, counts);
  convert_all(srcs, dst, offsets, counts.data_ptr<int64_t>());
}

at::Tensor cast_copy_many_cpu(at::TensorList srcs, const at::Tensor& dst, at::IntArrayRef offsets,
                              int64_t mode) {
  auto counts = at::empty({static_cast<int64_t>(srcs.size()), 2}, at::kLong);
  cast_copy_many_into_cpu(srcs, dst, offsets, counts, mode);
  return counts;
}

void cast_copy_into_cpu(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& counts,
                        int64_t mode) {
  check_single(src, dst);
  cast_copy_many_into_cpu(src, dst, {0}, counts, mode);
}

at::Tensor cast_copy_cpu(const at::Tensor& src, const at::Tensor& dst, int64_t mode) {
  auto counts = at::empty({2}, at::kLong);
  cast_copy_into_cpu(src, dst, counts, mode);
  return counts;
}

}  // namespace

bool cpu_has_f16c() { return kHaveF16C; }

// The _into forms write the counts into a tensor the caller keeps (int64, 2 per source, on
// the sources' device) instead of allocating one per call: allocating and wrapping a new
// tensor was the largest part of a call's fixed cost once the caches had gone cold.
TORCH_LIBRARY(marstore, m) {
  m.def("cast_copy(Tensor src, Tensor(a!) dst, int mode=0) -> Tensor");
  m.def("cast_copy_many(Tensor[] srcs, Tensor(a!) dst, int[] offsets, int mode=0) -> Tensor");
  m.def("cast_copy_into(Tensor src, Tensor(a!) dst, Tensor(b!) counts, int mode=0) -> ()");
  m.def("cast_copy_many_into(Tensor[] srcs, Tensor(a!) dst, int[] offsets, Tensor(b!) counts, int mode=0) -> ()");
}

TORCH_LIBRARY_IMPL(marstore, CPU, m) {
  m.impl("cast_copy", &cast_copy_cpu);
  m.impl("cast_copy_many", &cast_copy_many_cpu);
  m.impl("cast_copy_into", &cast_copy_into_cpu);
  m.impl("cast_copy_many_into", &cast_copy_many_into_cpu);
}

}  // namespace marstore
