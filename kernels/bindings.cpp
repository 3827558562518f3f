// The one pybind11 module, minipt._C.
//
// Bindings take raw device or host pointers, shapes and (for CUDA) the stream as
// integers. The Python side (minipt/ops/native.py) validates tensors and passes
// data_ptr(); this keeps the extension free of libtorch, so it builds in seconds
// and in an isolated build environment that has no torch.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "minipt native kernels (C++ for the CPU, CUDA when built with it)";
#ifdef MINIPT_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
