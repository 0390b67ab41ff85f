// Shared by the CPU and CUDA kernels of the cast-copy operators: the input checks, so that
// both backends refuse the same inputs with the same messages. They are defined once, in
// checks.cpp, so that the host compiler and nvcc never emit two copies of them.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace marstore {

// Operator mode: where a CUDA kernel writes. kAuto picks by size; the others force a way.
enum CopyMode : int64_t { kAuto = 0, kDirect = 1, kStaged = 2 };

std::string dtype_name(at::ScalarType t);

// Refuses an unsupported (source, destination) dtype pair.
void check_pair(const char* op, at::ScalarType src, at::ScalarType dst);

// Checks the destination and the regions [offset, offset + numel) that the sources fill.
void check_destination(const char* op, at::TensorList srcs, const at::Tensor& dst,
                       at::IntArrayRef offsets);

// The counts tensor of the _into forms: contiguous int64, 2 elements per source, on the
// sources' device.
void check_counts(const char* op, at::TensorList srcs, const at::Tensor& counts);

// cast_copy's own check: one source, a destination of the same element count.
void check_single(const at::Tensor& src, const at::Tensor& dst);

}  // namespace marstore
