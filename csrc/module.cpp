// The Python module marstore._C: loading it registers the operators (torch.ops.marstore.*);
// its attributes say what it was built against, so that Python can refuse a stale build.

#include <pybind11/pybind11.h>

namespace marstore {
bool cpu_has_f16c();
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "marstore's cast-copy operators; see marstore.ops for the Python API";
  m.attr("torch_version") = MARSTORE_TORCH_VERSION;
#ifdef MARSTORE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_has_f16c", &marstore::cpu_has_f16c,
        "Whether the CPU kernels use the AVX2/F16C path on this processor");
}
