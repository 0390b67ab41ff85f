// Input checks of the cast-copy operators (declared in cast_copy.h).

#include "cast_copy.h"

#include <algorithm>
#include <numeric>
#include <vector>

namespace marstore {
namespace {

// Numbers go into messages as strings: a build that links its own libstdc++ statically (seen
// with some Python builds) crashed formatting integers through the shared library's locale.
std::string n(int64_t v) { return std::to_string(v); }

}  // namespace

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

void check_pair(const char* op, at::ScalarType src, at::ScalarType dst) {
  TORCH_CHECK(src == at::kFloat || src == at::kBFloat16 || src == at::kHalf,
              op, ": source dtype ", dtype_name(src),
              " is not supported; accepted: torch.float32, torch.bfloat16, torch.float16"
              " (cast float64 with .float() first)");
  TORCH_CHECK(dst == at::kHalf || dst == at::kFloat || dst == at::kBFloat16,
              op, ": destination dtype ", dtype_name(dst),
              " is not supported; accepted: torch.float16, torch.float32, torch.bfloat16");
  TORCH_CHECK(dst != at::kBFloat16 || src == at::kBFloat16,
              op, ": a torch.bfloat16 destination takes only torch.bfloat16 sources (a plain copy), got ",
              dtype_name(src), "; use a torch.float16 or torch.float32 destination");
}

void check_destination(const char* op, at::TensorList srcs, const at::Tensor& dst,
                              at::IntArrayRef offsets) {
  TORCH_CHECK(srcs.size() == offsets.size(), op, ": got ", n(srcs.size()), " sources and ",
              n(offsets.size()), " offsets; give one offset per source");
  TORCH_CHECK(dst.device().is_cpu(), op, ": destination is on ", dst.device().str(),
              "; it must be a host (CPU) tensor");
  TORCH_CHECK(dst.is_contiguous(), op, ": destination must be contiguous");
  const auto device = srcs.empty() ? at::Device(at::kCPU) : srcs[0].device();
  for (size_t i = 0; i < srcs.size(); ++i) {
    TORCH_CHECK(srcs[i].device() == device, op, ": source ", n(i), " is on ", srcs[i].device().str(),
                " but source 0 is on ", device.str(), "; all sources must be on one device");
    check_pair(op, srcs[i].scalar_type(), dst.scalar_type());
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] + srcs[i].numel() <= dst.numel(), op, ": region ",
                n(i), " [", n(offsets[i]), ", ", n(offsets[i] + srcs[i].numel()),
                ") lies outside the destination's ", n(dst.numel()), " elements");
  }
  if (device.is_cuda()) {
    TORCH_CHECK(dst.is_pinned(), op,
                ": destination is not pinned; a CUDA source needs a pinned host destination "
                "(torch.empty(..., pin_memory=True))");
  }
  std::vector<size_t> order(srcs.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return offsets[a] < offsets[b]; });
  for (size_t k = 1; k < order.size(); ++k) {
    const size_t prev = order[k - 1], cur = order[k];
    TORCH_CHECK(offsets[prev] + srcs[prev].numel() <= offsets[cur] || srcs[cur].numel() == 0 ||
                    srcs[prev].numel() == 0,
                op, ": region ", n(cur), " starting at ", n(offsets[cur]), " overlaps region ", n(prev),
                " [", n(offsets[prev]), ", ", n(offsets[prev] + srcs[prev].numel()), ")");
  }
}

void check_counts(const char* op, at::TensorList srcs, const at::Tensor& counts) {
  const auto device = srcs.empty() ? at::Device(at::kCPU) : srcs[0].device();
  const int64_t want = 2 * static_cast<int64_t>(srcs.size());
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous() && counts.numel() == want &&
                  counts.device() == device,
              op, ": counts must be a contiguous torch.int64 tensor of ", n(want), " elements (2 per source) on ",
              device.str(), ", got ", dtype_name(counts.scalar_type()), " of ", n(counts.numel()),
              " elements on ", counts.device().str());
}

void check_single(const at::Tensor& src, const at::Tensor& dst) {
  TORCH_CHECK(dst.numel() == src.numel(), "cast_copy: destination has ", n(dst.numel()),
              " elements but the source has ", n(src.numel()), "; they must match");
}

}  // namespace marstore
