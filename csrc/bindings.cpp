// The Python module iapt_kernels._C: the CPU kernels of csrc/, GIL released while they run
// (they parallelise with at::parallel_for and touch no Python object).
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "iapt_kernels C++ CPU kernels";
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("rational_fwd", &iapt::rational_fwd, "Rational activation forward", py::arg("x"),
        py::arg("numerator"), py::arg("denominator"), py::arg("version_b"), nogil);
  m.def("rational_bwd", &iapt::rational_bwd, "Rational activation backward", py::arg("grad"), py::arg("x"),
        py::arg("numerator"), py::arg("denominator"), py::arg("version_b"), nogil);
  m.def("attention_pool_fwd", &iapt::attention_pool_fwd, "Attention pooling forward", py::arg("h"),
        py::arg("mask"), py::arg("cu_seqlens"), py::arg("down_weight"), py::arg("down_bias"),
        py::arg("pool_weight"), py::arg("max_seqlen"), nogil);
  m.def("attention_pool_bwd", &iapt::attention_pool_bwd, "Attention pooling backward", py::arg("grad_u"),
        py::arg("h"), py::arg("mask"), py::arg("cu_seqlens"), py::arg("down_weight"), py::arg("pool_weight"),
        py::arg("a"), py::arg("z"), py::arg("n"), py::arg("max_seqlen"), nogil);
  m.def("multi_tenant_generator_fwd", &iapt::multi_tenant_generator_fwd, "Multi-tenant generator forward",
        py::arg("h"), py::arg("mask"), py::arg("cu_seqlens"), py::arg("order"), py::arg("seg_start"),
        py::arg("seg_tenant"), py::arg("down_weight"), py::arg("down_bias"), py::arg("pool_weight"),
        py::arg("numerator"), py::arg("denominator"), py::arg("up_weight"), py::arg("up_bias"),
        py::arg("version_b"), py::arg("max_seqlen"), nogil);
  m.def("multi_tenant_generator_bwd", &iapt::multi_tenant_generator_bwd, "Multi-tenant generator backward",
        py::arg("grad"), py::arg("h"), py::arg("mask"), py::arg("cu_seqlens"), py::arg("order"),
        py::arg("seg_start"), py::arg("seg_tenant"), py::arg("down_weight"), py::arg("pool_weight"),
        py::arg("numerator"), py::arg("denominator"), py::arg("up_weight"), py::arg("a"), py::arg("z"),
        py::arg("u"), py::arg("g"), py::arg("n"), py::arg("pool_product"), py::arg("version_b"),
        py::arg("max_seqlen"), nogil);
}
