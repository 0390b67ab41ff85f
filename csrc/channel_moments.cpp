// channel_moments: per-channel sums of a batch of rows, for the store's running statistics.
//
// channel_moments(x, shift) takes x of shape (rows, channels) in float16, bfloat16 or float32
// and shift of shape (channels,) in float32, and returns float64 (sum, sum of squares) of
// x - shift per channel. Rows are summed in float32 within blocks of kBlockRows (the values
// are shifted by about their mean, so the block sums stay small), and the block sums in
// float64. A non-finite value, or a square past float32's range, makes its channel's sums
// non-finite; the caller recomputes those channels exactly. One pass over x, one thread:
// the store's statistics thread calls it beside the HDF5 writer.
//
// moments_update(x, count, mean, m2, shift) is the store's common case in one call: shift is
// the running mean in float32 (every channel has values already). It sums x - shift as above
// and, when every sum is finite, combines the batch into the float64 running count, mean and
// M2 in place (Chan et al.), sets shift to the new mean, and returns true. Otherwise it changes
// nothing and returns false, and the caller's exact path takes the batch. The combination is
// the one marstore/store.py computes with numpy, term by term in the same order, so the two
// give the same bits; as a dozen numpy calls it cost more than the sums of a (2048, 64) batch.

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cast_copy.h"
#include "cpu_vec.h"

namespace marstore {
namespace {

constexpr int64_t kBlockRows = 256;
// The rows 4 KB ahead are prefetched: the batches arrive cold (a DMA into pinned memory, or a
// copy made before the forward ran on), and the hardware prefetcher alone left a 2 MB batch
// at 3-4 GB/s on one core; with this, 6 GB/s (4 KB, 8 KB and 16 KB measured alike).
constexpr int64_t kPrefetchBytes = 4096;

inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// Adds rows [0, rows) of x into the float32 accumulators, channels [from, channels).
template <typename T>
void accumulate_scalar(const T* x, int64_t rows, int64_t channels, int64_t from,
                       const float* shift, float* s, float* q) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * channels;
    for (int64_t c = from; c < channels; ++c) {
      const float v = to_float(row[c]) - shift[c];
      s[c] += v;
      q[c] += v * v;
    }
  }
}

#ifdef MARSTORE_X86
bool detect_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("fma");
}

// Four rows at a time, so that the accumulators are loaded and stored once per four rows.
template <typename T>
__attribute__((target("avx2,f16c,fma"))) int64_t accumulate_avx2(const T* x, int64_t rows,
                                                                 int64_t channels, const float* shift,
                                                                 float* s, float* q) {
  const int64_t vec_channels = channels / 8 * 8;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const T* row = x + r * channels;
    // an address, not a pointer: past the end of x it is still a valid prefetch (a hint, no fault)
    const uintptr_t ahead = reinterpret_cast<uintptr_t>(row) + kPrefetchBytes;
    for (uintptr_t off = 0; off < 4 * channels * sizeof(T); off += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
    }
    for (int64_t c = 0; c < vec_channels; c += 8) {
      const __m256 m = _mm256_loadu_ps(shift + c);
      __m256 sum = _mm256_loadu_ps(s + c), sq = _mm256_loadu_ps(q + c);
      for (int k = 0; k < 4; ++k) {
        const __m256 v = _mm256_sub_ps(load8(row + k * channels + c), m);
        sum = _mm256_add_ps(sum, v);
        sq = _mm256_fmadd_ps(v, v, sq);
      }
      _mm256_storeu_ps(s + c, sum);
      _mm256_storeu_ps(q + c, sq);
    }
  }
  for (; r < rows; ++r) {
    const T* row = x + r * channels;
    for (int64_t c = 0; c < vec_channels; c += 8) {
      const __m256 v = _mm256_sub_ps(load8(row + c), _mm256_loadu_ps(shift + c));
      _mm256_storeu_ps(s + c, _mm256_add_ps(_mm256_loadu_ps(s + c), v));
      _mm256_storeu_ps(q + c, _mm256_fmadd_ps(v, v, _mm256_loadu_ps(q + c)));
    }
  }
  return vec_channels;  // the caller adds the remaining channels
}
#else
bool detect_avx2() { return false; }
#endif

const bool kHaveAvx2 = detect_avx2();

template <typename T>
void moments(const T* x, int64_t rows, int64_t channels, const float* shift, double* sum,
             double* sumsq) {
  std::vector<float> s(channels), q(channels);
  for (int64_t first = 0; first < rows; first += kBlockRows) {
    const int64_t n = std::min(kBlockRows, rows - first);
    const T* block = x + first * channels;
    std::fill(s.begin(), s.end(), 0.f);
    std::fill(q.begin(), q.end(), 0.f);
    int64_t done = 0;
#ifdef MARSTORE_X86
    if (kHaveAvx2) done = accumulate_avx2(block, n, channels, shift, s.data(), q.data());
#endif
    accumulate_scalar(block, n, channels, done, shift, s.data(), q.data());
    for (int64_t c = 0; c < channels; ++c) {
      sum[c] += s[c];
      sumsq[c] += q[c];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> channel_moments_cpu(const at::Tensor& x, const at::Tensor& shift) {
  TORCH_CHECK(x.dim() == 2, "channel_moments: x must be 2-D (rows, channels), got ", std::to_string(x.dim()), " dimensions");
  const auto type = x.scalar_type();
  TORCH_CHECK(type == at::kHalf || type == at::kBFloat16 || type == at::kFloat,
              "channel_moments: x dtype ", dtype_name(type),
              " is not supported; accepted: torch.float16, torch.bfloat16, torch.float32");
  TORCH_CHECK(shift.scalar_type() == at::kFloat && shift.dim() == 1 && shift.size(0) == x.size(1),
              "channel_moments: shift must be float32 of shape (", std::to_string(x.size(1)), ",)");
  const auto xc = x.contiguous();
  const auto sc = shift.contiguous();
  const int64_t rows = x.size(0), channels = x.size(1);
  auto sum = at::zeros({channels}, at::kDouble);
  auto sumsq = at::zeros({channels}, at::kDouble);
  const float* m = sc.const_data_ptr<float>();
  double* s = sum.data_ptr<double>();
  double* q = sumsq.data_ptr<double>();
  if (type == at::kHalf) moments(xc.const_data_ptr<c10::Half>(), rows, channels, m, s, q);
  else if (type == at::kBFloat16) moments(xc.const_data_ptr<c10::BFloat16>(), rows, channels, m, s, q);
  else moments(xc.const_data_ptr<float>(), rows, channels, m, s, q);
  return {sum, sumsq};
}

void check_state(const at::Tensor& t, const char* name, int64_t channels) {
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.dim() == 1 && t.size(0) == channels && t.is_contiguous(),
              "moments_update: ", name, " must be contiguous float64 of shape (", std::to_string(channels),
              ",), got ", dtype_name(t.scalar_type()), " of shape ", t.sizes(),
              t.is_contiguous() ? "" : ", not contiguous");
}

bool moments_update_cpu(const at::Tensor& x, const at::Tensor& count, const at::Tensor& mean,
                        const at::Tensor& m2, const at::Tensor& shift) {
  const auto [sum, sumsq] = channel_moments_cpu(x, shift);  // checks x and shift
  const int64_t channels = x.size(1);
  check_state(count, "count", channels);
  check_state(mean, "mean", channels);
  check_state(m2, "m2", channels);
  TORCH_CHECK(shift.is_contiguous(), "moments_update: shift must be contiguous");
  if (x.size(0) == 0) return true;  // nothing to add (and no 0 / 0 below)
  const double* s = sum.const_data_ptr<double>();
  const double* q = sumsq.const_data_ptr<double>();
  for (int64_t c = 0; c < channels; ++c) {
    if (!std::isfinite(s[c]) || !std::isfinite(q[c])) return false;
  }
  const double n = static_cast<double>(x.size(0));
  double* cnt = count.data_ptr<double>();
  double* mu = mean.data_ptr<double>();
  double* m2s = m2.data_ptr<double>();
  float* ref = shift.data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    const double batch_mean = static_cast<double>(ref[c]) + s[c] / n;
    const double batch_m2 = std::max(q[c] - s[c] * s[c] / n, 0.0);
    const double total = cnt[c] + n;
    const double delta = batch_mean - mu[c];
    mu[c] = mu[c] + delta * n / total;
    m2s[c] = m2s[c] + batch_m2 + delta * delta * cnt[c] * n / total;
    cnt[c] = total;
    ref[c] = static_cast<float>(mu[c]);
  }
  return true;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(marstore, m) {
  m.def("channel_moments(Tensor x, Tensor shift) -> (Tensor, Tensor)");
  m.def("moments_update(Tensor x, Tensor(a!) count, Tensor(b!) mean, Tensor(c!) m2, Tensor(d!) shift) -> bool");
}

TORCH_LIBRARY_IMPL(marstore, CPU, m) {
  m.impl("channel_moments", &channel_moments_cpu);
  m.impl("moments_update", &moments_update_cpu);
}

}  // namespace marstore
