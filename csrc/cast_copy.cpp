// The cast-copy operators: schema and CPU kernels.
//
// cast_copy(src, dst) converts src (float32, bfloat16 or float16, any strides) into the
// preallocated host tensor dst and returns int64 [nonfinite, overflow] counts, where overflow
// counts finite values that become infinite in dst's dtype. cast_copy_many does the same for a
// list of sources into regions of one destination, in one parallel pass. The results are
// bit-identical to torch's own `src.to(dst.dtype)` on this processor, NaN payloads included.

#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "cast_copy.h"
#include "cpu_vec.h"

namespace marstore {
namespace {

constexpr int64_t kGrain = 1 << 15;  // fewest elements in a work item: torch's own grain
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

// The kernel sets of the float16 conversions, best last. The best one the processor has is
// used; tests and benchmarks may choose a lesser one (set_cpu_kernels), as every set gives
// the same bytes and counts.
enum class Kernels : int { kScalar, kAvx2, kAvx512 };
constexpr const char* kKernelNames[] = {"scalar", "avx2", "avx512"};

// Converts n values with the scalar loop of the source's dtype.
template <typename Src>
void to_f16_scalar(const Src* s, uint16_t* d, int64_t n, Counts& c) {
  if constexpr (std::is_same_v<Src, float>) f32_to_f16_scalar(s, d, n, c);
  else bf16_to_f16_scalar(reinterpret_cast<const uint16_t*>(s), d, n, c);
}

#ifdef MARSTORE_X86
Kernels best_kernels() {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c")) return Kernels::kScalar;
  return __builtin_cpu_supports("avx512f") ? Kernels::kAvx512 : Kernels::kAvx2;
}

// The screen runs on the float16 results: a finite source that overflows becomes infinity,
// and a non-finite one stays non-finite, so one unsigned max of |h| over 16 lanes tells
// whether a span needs exact counting (nearly never); it costs two operations per 16 values.
constexpr uint16_t kHalfExpBits = 0x7c00;

MARSTORE_AVX2 inline __m256i screen16(__m256i largest, __m256i h) {
  return _mm256_max_epu16(largest, _mm256_and_si256(h, _mm256_set1_epi16(0x7fff)));
}

MARSTORE_AVX2 inline uint16_t lane_max16(__m256i v) {
  alignas(32) uint16_t lanes[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  return *std::max_element(lanes, lanes + 16);
}

// Sixteen values -> sixteen float16 lanes (round to nearest even, as torch): two 8-lane
// conversions with AVX2/F16C, one 16-lane conversion with AVX-512.
template <typename Src>
MARSTORE_AVX2 inline __m256i convert16_avx2(const Src* p) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return _mm256_set_m128i(_mm256_cvtps_ph(load8(p + 8), kRound), _mm256_cvtps_ph(load8(p), kRound));
}

template <typename Src>
MARSTORE_AVX512 inline __m256i convert16_avx512(const Src* p) {
  return _mm512_maskz_cvtps_ph(kAllLanes, load16(p), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

template <bool kStream>
MARSTORE_AVX2 inline void store16(uint16_t* d, __m256i h) {
  if (kStream) _mm256_stream_si256(reinterpret_cast<__m256i*>(d), h);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), h);
}

// A large copy reads from memory: prefetch ahead (an address: no fault past the end).
template <typename Src>
inline void prefetch_ahead(const Src* s) {
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(s) + kPrefetchBytes;
  _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
  if constexpr (sizeof(Src) == 4) _mm_prefetch(reinterpret_cast<const char*>(ahead + 64), _MM_HINT_T0);
}

// The vector loops' two ends. The head: 32-byte streaming stores need a 32-byte aligned
// destination, so a streamed span converts its first few values one by one; returns how many.
template <typename Src, bool kStream>
int64_t convert_head(const Src* s, uint16_t* d, int64_t n, Counts& c) {
  if constexpr (!kStream) return 0;
  const int64_t head =
      std::min<int64_t>(n, ((32 - reinterpret_cast<uintptr_t>(d) % 32) % 32) / sizeof(uint16_t));
  to_f16_scalar(s, d, head, c);
  return head;
}

// The end: counts [begin, end) exactly where the screen saw a non-finite result (rare), and
// converts the values after end one by one.
template <typename Src>
void finish_span(const Src* s, uint16_t* d, int64_t begin, int64_t end, int64_t n,
                 uint16_t largest, Counts& c) {
  if (largest >= kHalfExpBits) {
    for (int64_t k = begin; k < end; ++k) {
      uint32_t bits;
      if constexpr (std::is_same_v<Src, float>) bits = bits_of(s[k]);
      else bits = static_cast<uint32_t>(s[k].x) << 16;
      count_float(bits, kHalfOverflowBits, c);
    }
  }
  to_f16_scalar(s + end, d + end, n - end, c);
}

// The two vector loops differ only in their conversion, yet cannot share one template: GCC
// inlines no AVX-512 function into a function compiled for AVX2, and compiling the shared
// loop for AVX-512 would let AVX-512 instructions into the AVX2 build of it. 32 values per
// iteration: independent conversions keep more loads in flight.
template <typename Src, bool kStream>
MARSTORE_AVX2 void to_f16_avx2(const Src* s, uint16_t* d, int64_t n, Counts& c) {
  const int64_t begin = convert_head<Src, kStream>(s, d, n, c);
  __m256i largest = _mm256_setzero_si256();
  int64_t i = begin;
  for (; i + 32 <= n; i += 32) {
    if constexpr (kStream) prefetch_ahead(s + i);
    const __m256i h0 = convert16_avx2(s + i), h1 = convert16_avx2(s + i + 16);
    largest = screen16(screen16(largest, h0), h1);
    store16<kStream>(d + i, h0);
    store16<kStream>(d + i + 16, h1);
  }
  for (; i + 16 <= n; i += 16) {
    const __m256i h = convert16_avx2(s + i);
    largest = screen16(largest, h);
    store16<kStream>(d + i, h);
  }
  finish_span(s, d, begin, i, n, lane_max16(largest), c);
}

// AVX-512 converts 16 lanes in one instruction where AVX2 needs two and a merge: with the
// data in L3 (a 4 MB activation just written by the model) it ran 12-20% faster on one
// core of an AVX-512 Zen host, and came within 1-3% of torch's own AVX-512 copy.
template <typename Src, bool kStream>
MARSTORE_AVX512 void to_f16_avx512(const Src* s, uint16_t* d, int64_t n, Counts& c) {
  const int64_t begin = convert_head<Src, kStream>(s, d, n, c);
  __m256i largest = _mm256_setzero_si256();
  int64_t i = begin;
  for (; i + 32 <= n; i += 32) {
    if constexpr (kStream) prefetch_ahead(s + i);
    const __m256i h0 = convert16_avx512(s + i), h1 = convert16_avx512(s + i + 16);
    largest = screen16(screen16(largest, h0), h1);
    store16<kStream>(d + i, h0);
    store16<kStream>(d + i + 16, h1);
  }
  for (; i + 16 <= n; i += 16) {
    const __m256i h = convert16_avx512(s + i);
    largest = screen16(largest, h);
    store16<kStream>(d + i, h);
  }
  finish_span(s, d, begin, i, n, lane_max16(largest), c);
}

template <typename Src>
void to_f16(Kernels kernels, bool streaming, const Src* s, uint16_t* d, int64_t n, Counts& c) {
  switch (kernels) {
    case Kernels::kAvx512:
      return streaming ? to_f16_avx512<Src, true>(s, d, n, c) : to_f16_avx512<Src, false>(s, d, n, c);
    case Kernels::kAvx2:
      return streaming ? to_f16_avx2<Src, true>(s, d, n, c) : to_f16_avx2<Src, false>(s, d, n, c);
    case Kernels::kScalar:
      return to_f16_scalar(s, d, n, c);
  }
}
#else
Kernels best_kernels() { return Kernels::kScalar; }

template <typename Src>
void to_f16(Kernels, bool, const Src* s, uint16_t* d, int64_t n, Counts& c) {
  to_f16_scalar(s, d, n, c);
}
#endif

const Kernels kBestKernels = best_kernels();
std::atomic<Kernels> kernels_in_use{kBestKernels};

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
    const Kernels kernels = kernels_in_use.load(std::memory_order_relaxed);
    if (src_type == at::kFloat) return to_f16(kernels, streaming, s32, d16, n, c);
    return to_f16(kernels, streaming, reinterpret_cast<const c10::BFloat16*>(s), d16, n, c);
  }
  if (dst_type == at::kFloat) {
    if (src_type == at::kFloat) return copy32_scalar(s32, d32, n, c);
    if (src_type == at::kHalf) return f16_to_f32_scalar(s16, d32, n, c);
    return bf16_to_f32_scalar(s16, d32, n, c);
  }
  return copy16_scalar(s16, d16, n, 0x7f80, c);  // bfloat16 -> bfloat16
}

// A range of work items that its own thread takes from the front, in memory order, and that
// threads done with their own take from the back. Front and back share one atomic word.
class alignas(64) ItemRange {
 public:
  void reset(size_t front, size_t back) { range_.store(pack(front, back), std::memory_order_relaxed); }
  void extend() { range_.fetch_add(uint64_t{1} << 32, std::memory_order_relaxed); }  // back + 1
  bool take_front(size_t& k) { return take(k, true); }
  bool take_back(size_t& k) { return take(k, false); }

 private:
  static uint64_t pack(uint64_t front, uint64_t back) { return front | (back << 32); }
  bool take(size_t& k, bool front) {
    uint64_t r = range_.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t f = r & 0xffffffffu, b = r >> 32;
      if (f >= b) return false;
      k = front ? f : b - 1;
      if (range_.compare_exchange_weak(r, front ? pack(f + 1, b) : pack(f, b - 1),
                                       std::memory_order_relaxed)) {
        return true;
      }
    }
  }
  std::atomic<uint64_t> range_{0};
};

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
  // Each thread has a share of the elements, end to end over the sources, cut into items of
  // one source each. It takes its own items front to back, in memory order, the first half of
  // its share in one item, then halves of what is left, down to kGrain elements. A thread done
  // with its share takes the others' last (smallest) items: a thread that starts late or runs
  // on a slower core (a VM's vCPUs are not alike) then does less. Items of an eighth of a
  // share each, handed out from one counter, balanced as well but ran a 4 MB source 3% slower
  // (copy_'s time over marstore's, median of five alternating runs: 0.965 against 0.997).
  // One fork/join covers all sources, however many.
  const int64_t workers = std::clamp<int64_t>((total + kGrain - 1) / kGrain, 0, at::get_num_threads());
  struct Item {
    size_t tensor;
    int64_t begin, end;
    Counts counts;
  };
  c10::SmallVector<Item, 32> items;
  std::vector<ItemRange> shares(workers);
  if (workers > 0) {
    const int64_t share = (total + workers - 1) / workers;
    int64_t done = 0;  // elements of the sources before the item being cut
    for (size_t t = 0; t < sources.size(); ++t) {
      const int64_t n = sources[t].numel();
      for (int64_t b = 0; b < n;) {
        const int64_t w = done / share, left = (w + 1) * share - done;  // of the share
        const int64_t end = b + std::min({n - b, left, std::max(kGrain, left / 2)});
        if (done == w * share) shares[w].reset(items.size(), items.size());
        items.push_back({t, b, end, {}});
        shares[w].extend();
        done += end - b;
        b = end;
      }
    }
  }
  const auto dst_type = dst.scalar_type();
  const bool streaming = total * dst.element_size() >= kStreamingBytes;
  char* dst_base = static_cast<char*>(dst.data_ptr());
  auto run_item = [&](size_t k) {
    Item& it = items[k];
    Counts c;  // local: items of different threads share cache lines
    convert_span(sources[it.tensor], dst_base + offsets[it.tensor] * dst.element_size(), dst_type,
                 it.begin, it.end, streaming, c);
    it.counts = c;
  };
  // Each thread gets one share, unless parallel_for runs the whole range on one thread (as
  // it does inside another parallel region): that thread then takes every share.
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    size_t k;
    for (int64_t w = begin; w < end; ++w) {
      while (shares[w].take_front(k)) run_item(k);
    }
    for (int64_t o = 1; o < workers; ++o) {
      while (shares[(begin + o) % workers].take_back(k)) run_item(k);
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

std::string cpu_kernels() { return kKernelNames[static_cast<int>(kernels_in_use.load())]; }

std::vector<std::string> cpu_kernels_available() {
  return {kKernelNames, kKernelNames + static_cast<int>(kBestKernels) + 1};
}

void set_cpu_kernels(const std::string& name) {
  const auto available = cpu_kernels_available();
  const auto found = std::find(available.begin(), available.end(), name);
  TORCH_CHECK_VALUE(found != available.end(), "set_cpu_kernels: '", name,
                    "' is not a kernel set this processor runs; it runs ", c10::Join(", ", available));
  kernels_in_use.store(static_cast<Kernels>(found - available.begin()));
}

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
