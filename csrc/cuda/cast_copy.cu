// CUDA kernels of the cast-copy operators (schema in ../cast_copy.cpp).
//
// One launch converts up to kMaxTensors sources: every block owns kBlockElems elements of one
// source, found from the per-source first-block table passed by value. The kernel writes
// either straight into the pinned host destination (mapped into the device's address space),
// or into a device staging buffer from which DMA copies move it to the host. A large staged
// copy goes in pieces: a second stream copies each piece as soon as it is converted, so that
// converting the rest hides behind the DMA. Everything is ordered on the caller's current
// stream; the counts stay on the device for the caller to copy (the _into forms write them
// into a tensor the caller keeps, zeroed here in stream order).

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "../cast_copy.h"

namespace marstore {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // elements per thread per step: 16 bytes of float16
constexpr int64_t kBlockElems = kThreads * kVec * 4;
constexpr int kMaxTensors = 48;  // keeps the launch parameters under 4 KB
// Up to this many destination bytes the kernel writes to host memory directly; above it,
// staging in device memory plus DMA copies is faster (benchmarks/RESULTS.md: on an H100,
// direct won at 2 MiB of float16, staged at 8). The environment variable
// MARSTORE_DIRECT_MAX_BYTES overrides it, for measuring the crossover.
constexpr int64_t kDirectMaxBytes = 2 << 20;
// A staged copy goes in k pieces: the first piece's conversion shows (C/k, C the whole
// conversion's time) and each piece after it costs about 5 us of launches and waits, so the
// best k grows as the square root of the size. Measured on an H100: 4 pieces lost time against 1
// at 8 MiB of destination, 8 pieces won at 128 and 256 MiB; k = sqrt(bytes / kPieceBytes)
// gives 1 piece below 16 MiB, 2 at 16-32, 4 at 64 and 8 from 256 MiB.
constexpr double kPieceBytes = 4 << 20;
constexpr int kMaxPieces = 8;

int64_t direct_max_bytes() {
  static const int64_t value = [] {
    const char* env = std::getenv("MARSTORE_DIRECT_MAX_BYTES");
    return env ? std::atoll(env) : kDirectMaxBytes;
  }();
  return value;
}

enum class Kind : int32_t { F32, BF16, F16 };

struct Desc {
  const void* src;
  void* dst;
  int64_t numel;
  int64_t first_block;
  unsigned long long* counts;  // [nonfinite, overflow]
  Kind src_kind, dst_kind;
};

struct Params {
  Desc d[kMaxTensors];
  int n;
  int64_t base_block;  // the launch's first block in the numbering of first_block
};

// The Desc that owns a block (in the numbering of first_block): on the device for each block,
// on the host for the ends of each piece.
__host__ __device__ __forceinline__ int desc_of(const Params& p, int64_t block) {
  int t = 0;
  while (t + 1 < p.n && p.d[t + 1].first_block <= block) ++t;
  return t;
}

Kind kind_of(at::ScalarType t) {
  return t == at::kFloat ? Kind::F32 : (t == at::kBFloat16 ? Kind::BF16 : Kind::F16);
}

template <typename T>
struct alignas(16) Pack {
  T v[kVec];
};

template <typename S, typename D>
__device__ __forceinline__ void convert_one(S s, D& d, unsigned& nonfinite, unsigned& overflow) {
  const float x = static_cast<float>(s);
  // torch's own conversions (through float32, as its copy kernel), so the bits match .to()
  if constexpr (std::is_same_v<S, D>) d = s;
  else d = static_cast<D>(x);
  const bool finite = isfinite(x);
  nonfinite += !finite;
  overflow += finite && isinf(static_cast<float>(d));
}

template <typename S, typename D>
__device__ void convert_range(const Desc& desc, int64_t begin, int64_t end, unsigned& nonfinite,
                              unsigned& overflow) {
  const S* __restrict__ src = static_cast<const S*>(desc.src);
  D* __restrict__ dst = static_cast<D*>(desc.dst);
  const bool aligned = (reinterpret_cast<uintptr_t>(src + begin) % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(dst + begin) % 16 == 0);
  int64_t scalar_from = begin;
  if (aligned) {
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t i = begin + threadIdx.x * kVec; i < vec_end; i += int64_t(blockDim.x) * kVec) {
      Pack<S> in;
      constexpr int kWords = sizeof(Pack<S>) / sizeof(uint4);
#pragma unroll
      for (int w = 0; w < kWords; ++w) {
        reinterpret_cast<uint4*>(&in)[w] = __ldcs(reinterpret_cast<const uint4*>(src + i) + w);
      }
      Pack<D> out;
#pragma unroll
      for (int k = 0; k < kVec; ++k) convert_one(in.v[k], out.v[k], nonfinite, overflow);
      constexpr int kOutWords = sizeof(Pack<D>) / sizeof(uint4);
#pragma unroll
      for (int w = 0; w < kOutWords; ++w) {
        reinterpret_cast<uint4*>(dst + i)[w] = reinterpret_cast<const uint4*>(&out)[w];
      }
    }
    scalar_from = vec_end;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += blockDim.x) {
    convert_one(src[i], dst[i], nonfinite, overflow);
  }
}

__device__ __forceinline__ unsigned block_sum(unsigned v, unsigned* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0;
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  __syncthreads();
  return v;  // valid in thread 0
}

__global__ void __launch_bounds__(kThreads) cast_copy_kernel(const __grid_constant__ Params p) {
  const int64_t block = p.base_block + blockIdx.x;
  const Desc& desc = p.d[desc_of(p, block)];
  const int64_t begin = (block - desc.first_block) * kBlockElems;
  const int64_t end = min(desc.numel, begin + kBlockElems);
  unsigned nonfinite = 0, overflow = 0;
  using c10::BFloat16;
  using c10::Half;
  switch (desc.dst_kind) {
    case Kind::F16:
      if (desc.src_kind == Kind::F32) convert_range<float, Half>(desc, begin, end, nonfinite, overflow);
      else if (desc.src_kind == Kind::BF16) convert_range<BFloat16, Half>(desc, begin, end, nonfinite, overflow);
      else convert_range<Half, Half>(desc, begin, end, nonfinite, overflow);
      break;
    case Kind::F32:
      if (desc.src_kind == Kind::F32) convert_range<float, float>(desc, begin, end, nonfinite, overflow);
      else if (desc.src_kind == Kind::BF16) convert_range<BFloat16, float>(desc, begin, end, nonfinite, overflow);
      else convert_range<Half, float>(desc, begin, end, nonfinite, overflow);
      break;
    case Kind::BF16:
      convert_range<BFloat16, BFloat16>(desc, begin, end, nonfinite, overflow);
      break;
  }
  __shared__ unsigned shared[kThreads / 32];
  nonfinite = block_sum(nonfinite, shared);
  overflow = block_sum(overflow, shared);
  if (threadIdx.x == 0) {
    if (nonfinite) atomicAdd(desc.counts, static_cast<unsigned long long>(nonfinite));
    if (overflow) atomicAdd(desc.counts + 1, static_cast<unsigned long long>(overflow));
  }
}

// Events for ordering the pieces of a staged copy, created once per thread and device and
// reused (a stream wait takes the event's state when it is enqueued, so re-recording it for
// the next call is safe; per thread, so that two threads never record the same one).
cudaEvent_t piece_event(c10::DeviceIndex device, size_t i) {
  thread_local std::vector<std::vector<cudaEvent_t>> pool;
  if (pool.size() <= static_cast<size_t>(device)) pool.resize(device + 1);
  auto& events = pool[device];
  while (events.size() <= i) {
    cudaEvent_t e;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    events.push_back(e);
  }
  return events[i];
}

void launch(const Params& p, int64_t first_block, int64_t end_block, cudaStream_t stream) {
  Params q = p;
  q.base_block = first_block;
  cast_copy_kernel<<<static_cast<unsigned>(end_block - first_block), kThreads, 0, stream>>>(q);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cast_copy_many_into_cuda(at::TensorList srcs, const at::Tensor& dst, at::IntArrayRef offsets,
                              const at::Tensor& counts, int64_t mode) {
  check_destination("cast_copy_many", srcs, dst, offsets);
  check_counts("cast_copy_many", srcs, counts);
  TORCH_CHECK(mode == kAuto || mode == kDirect || mode == kStaged,
              "cast_copy_many: mode ", std::to_string(mode), " is not one of 0 (auto), 1 (direct), 2 (staged)");
  const int64_t n = static_cast<int64_t>(srcs.size());
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(srcs[0].device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t elem = dst.element_size();

  // Non-contiguous sources are compacted on the device first; temporaries allocated here
  // are freed in stream order, so the allocator cannot hand their memory out too early.
  std::vector<at::Tensor> sources;
  sources.reserve(n);
  int64_t lo = dst.numel(), hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    sources.push_back(srcs[i].contiguous());
    if (srcs[i].numel() > 0) {
      lo = std::min(lo, offsets[i]);
      hi = std::max(hi, offsets[i] + srcs[i].numel());
    }
  }
  // cudaMemsetAsync costs the host less than a fill kernel, on a path timed per call.
  C10_CUDA_CHECK(cudaMemsetAsync(counts.data_ptr(), 0, counts.nbytes(), stream));
  if (hi <= lo) return;

  const int64_t span_bytes = (hi - lo) * elem;
  bool staged = mode == kStaged || (mode == kAuto && span_bytes > direct_max_bytes());
  char* dst_base = nullptr;  // device-visible address of destination element 0
  if (!staged) {
    void* mapped = nullptr;
    if (cudaHostGetDevicePointer(&mapped, dst.data_ptr(), 0) == cudaSuccess) {
      dst_base = static_cast<char*>(mapped);
    } else {
      (void)cudaGetLastError();  // clear it: staging is the documented alternative
      TORCH_CHECK(mode != kDirect, "cast_copy_many: the destination is not mapped into the "
                                   "device's address space; use mode 0 (auto) or 2 (staged)");
      TORCH_WARN_ONCE("marstore.cast_copy_many: pinned destination is not device-mapped; "
                      "using a device staging buffer instead");
      staged = true;
    }
  }
  at::Tensor staging;
  if (staged) {
    staging = at::empty({span_bytes}, srcs[0].options().dtype(at::kByte));
    dst_base = static_cast<char*>(staging.data_ptr()) - lo * elem;
  }

  auto* count_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  char* host = static_cast<char*>(dst.data_ptr());
  bool piecewise = false;
  for (int64_t first = 0; first < n; first += kMaxTensors) {
    Params p{};
    int64_t blocks = 0;
    int64_t region[kMaxTensors][2];  // destination elements [begin, end) of each Desc
    bool ascending = true;  // regions in source order, none overlapping the next
    for (int64_t i = first; i < std::min(n, first + kMaxTensors); ++i) {
      if (sources[i].numel() == 0) continue;
      ascending = ascending && (p.n == 0 || region[p.n - 1][1] <= offsets[i]);
      region[p.n][0] = offsets[i];
      region[p.n][1] = offsets[i] + sources[i].numel();
      Desc& d = p.d[p.n++];
      d.src = sources[i].const_data_ptr();
      d.dst = dst_base + offsets[i] * elem;
      d.numel = sources[i].numel();
      d.first_block = blocks;
      d.counts = count_ptr + 2 * i;
      d.src_kind = kind_of(sources[i].scalar_type());
      d.dst_kind = kind_of(dst.scalar_type());
      blocks += (d.numel + kBlockElems - 1) / kBlockElems;
    }
    if (p.n == 0) continue;
    TORCH_CHECK(blocks <= INT32_MAX, "cast_copy_many: sources too large for one launch");
    // Pieces only where this launch is the whole copy and its regions ascend: then each
    // piece of blocks writes one stretch of the destination, copied on its own.
    const int64_t pieces = staged && ascending && n <= kMaxTensors
                               ? std::min<int64_t>({kMaxPieces, int64_t(std::sqrt(span_bytes / kPieceBytes)), blocks})
                               : 1;
    if (pieces < 2) {
      launch(p, 0, blocks, stream);
      continue;
    }
    piecewise = true;
    // The copies run on a second stream that waits for each piece's kernel; the caller's
    // stream then waits for the last copy, so that everything after it (and the allocator,
    // which hands the staging buffer out again only to work on the caller's stream) sees
    // the whole copy done.
    const auto copier = c10::cuda::getStreamFromPool(false, stream.device_index());
    const auto stretch = [&](int64_t block, bool end) {  // destination element at a block's start or end
      const int t = desc_of(p, block);
      const int64_t begin = region[t][0] + (block - p.d[t].first_block) * kBlockElems;
      return end ? std::min(region[t][1], begin + kBlockElems) : begin;
    };
    for (int64_t k = 0; k < pieces; ++k) {
      const int64_t b0 = blocks * k / pieces, b1 = blocks * (k + 1) / pieces;
      launch(p, b0, b1, stream);
      const cudaEvent_t converted = piece_event(stream.device_index(), k);
      C10_CUDA_CHECK(cudaEventRecord(converted, stream));
      C10_CUDA_CHECK(cudaStreamWaitEvent(copier, converted, 0));
      const int64_t from = stretch(b0, false), to = stretch(b1 - 1, true);
      C10_CUDA_CHECK(cudaMemcpyAsync(host + from * elem, dst_base + from * elem, (to - from) * elem,
                                     cudaMemcpyDeviceToHost, copier));
    }
    const cudaEvent_t copied = piece_event(stream.device_index(), kMaxPieces);
    C10_CUDA_CHECK(cudaEventRecord(copied, copier));
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream, copied, 0));
  }
  if (staged && !piecewise) {
    C10_CUDA_CHECK(cudaMemcpyAsync(host + lo * elem, staging.data_ptr(), span_bytes, cudaMemcpyDeviceToHost,
                                   stream));
  }
}

at::Tensor cast_copy_many_cuda(at::TensorList srcs, const at::Tensor& dst, at::IntArrayRef offsets,
                               int64_t mode) {
  const auto options = srcs.empty() ? at::TensorOptions() : srcs[0].options();
  auto counts = at::empty({static_cast<int64_t>(srcs.size()), 2}, options.dtype(at::kLong));
  cast_copy_many_into_cuda(srcs, dst, offsets, counts, mode);
  return counts;
}

void cast_copy_into_cuda(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& counts,
                         int64_t mode) {
  check_single(src, dst);
  cast_copy_many_into_cuda(src, dst, {0}, counts, mode);
}

at::Tensor cast_copy_cuda(const at::Tensor& src, const at::Tensor& dst, int64_t mode) {
  auto counts = at::empty({2}, src.options().dtype(at::kLong));
  cast_copy_into_cuda(src, dst, counts, mode);
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(marstore, CUDA, m) {
  m.impl("cast_copy", &cast_copy_cuda);
  m.impl("cast_copy_many", &cast_copy_many_cuda);
  m.impl("cast_copy_into", &cast_copy_into_cuda);
  m.impl("cast_copy_many_into", &cast_copy_many_into_cuda);
}

}  // namespace marstore
