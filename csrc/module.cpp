// The Python module marstore._C: loading it registers the operators (torch.ops.marstore.*);
// its attributes say what it was built against, so that Python can refuse a stale build.
//
// The functions here are direct entries to the same operators: they call the
// dispatcher from C++, which costs well under a microsecond, where torch.ops' Python
// dispatch costs several (as much as the copy itself for a 64 KB activation).

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

namespace marstore {
std::string cpu_kernels();
std::vector<std::string> cpu_kernels_available();
void set_cpu_kernels(const std::string& name);

namespace {

// The operators have no autograd formula (their result is a count), so the entries go
// straight to the backend kernel rather than through autograd's boxed fallback.
at::Tensor cast_copy(const at::Tensor& src, const at::Tensor& dst, int64_t mode) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("marstore::cast_copy", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(src, dst, mode);
}

at::Tensor cast_copy_many(const std::vector<at::Tensor>& srcs, const at::Tensor& dst,
                          const std::vector<int64_t>& offsets, int64_t mode) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("marstore::cast_copy_many", "")
          .typed<at::Tensor(at::TensorList, const at::Tensor&, at::IntArrayRef, int64_t)>();
  return op.call(srcs, dst, offsets, mode);
}

void cast_copy_into(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& counts, int64_t mode) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("marstore::cast_copy_into", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  op.call(src, dst, counts, mode);
}

void cast_copy_many_into(const std::vector<at::Tensor>& srcs, const at::Tensor& dst,
                         const std::vector<int64_t>& offsets, const at::Tensor& counts, int64_t mode) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("marstore::cast_copy_many_into", "")
          .typed<void(at::TensorList, const at::Tensor&, at::IntArrayRef, const at::Tensor&, int64_t)>();
  op.call(srcs, dst, offsets, counts, mode);
}

// The statistics pass runs in the store's stats threads. On a large batch it takes
// milliseconds, and holding the GIL through it stalled the model's thread and the HDF5
// writer; on a small one, getting the GIL back afterwards can take longer than the pass (the
// model's thread keeps it for up to the switch interval), so small inputs keep it. The
// cast-copies keep it too: they take microseconds, on the model's own thread.
constexpr int64_t kReleaseGilElems = 1 << 20;

std::tuple<at::Tensor, at::Tensor> channel_moments(const at::Tensor& x, const at::Tensor& shift) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("marstore::channel_moments", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>();
  if (x.numel() >= kReleaseGilElems) {
    py::gil_scoped_release no_gil;
    return op.call(x, shift);
  }
  return op.call(x, shift);
}

bool moments_update(const at::Tensor& x, const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2,
                    const at::Tensor& shift) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("marstore::moments_update", "")
          .typed<bool(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  if (x.numel() >= kReleaseGilElems) {
    py::gil_scoped_release no_gil;
    return op.call(x, count, mean, m2, shift);
  }
  return op.call(x, count, mean, m2, shift);
}

}  // namespace
}  // namespace marstore

PYBIND11_MODULE(_C, m) {
  m.doc() = "marstore's cast-copy operators; see marstore.ops for the Python API";
  m.attr("torch_version") = MARSTORE_TORCH_VERSION;
#ifdef MARSTORE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_kernels", &marstore::cpu_kernels,
        "The kernel set the CPU float16 conversions use: 'avx512', 'avx2' (with F16C) or 'scalar'");
  m.def("cpu_kernels_available", &marstore::cpu_kernels_available,
        "The kernel sets this processor runs, best last");
  m.def("set_cpu_kernels", &marstore::set_cpu_kernels,
        "Makes the CPU conversions use a lesser kernel set (tests, benchmarks); all give the same bytes",
        py::arg("name"));
  m.def("cast_copy", &marstore::cast_copy, "torch.ops.marstore.cast_copy without Python dispatch",
        py::arg("src"), py::arg("dst"), py::arg("mode") = 0);
  m.def("cast_copy_many", &marstore::cast_copy_many,
        "torch.ops.marstore.cast_copy_many without Python dispatch", py::arg("srcs"), py::arg("dst"),
        py::arg("offsets"), py::arg("mode") = 0);
  m.def("cast_copy_into", &marstore::cast_copy_into,
        "torch.ops.marstore.cast_copy_into without Python dispatch", py::arg("src"), py::arg("dst"),
        py::arg("counts"), py::arg("mode") = 0);
  m.def("cast_copy_many_into", &marstore::cast_copy_many_into,
        "torch.ops.marstore.cast_copy_many_into without Python dispatch", py::arg("srcs"), py::arg("dst"),
        py::arg("offsets"), py::arg("counts"), py::arg("mode") = 0);
  m.def("channel_moments", &marstore::channel_moments,
        "torch.ops.marstore.channel_moments without Python dispatch", py::arg("x"), py::arg("shift"));
  m.def("moments_update", &marstore::moments_update,
        "torch.ops.marstore.moments_update without Python dispatch", py::arg("x"), py::arg("count"),
        py::arg("mean"), py::arg("m2"), py::arg("shift"));
}
