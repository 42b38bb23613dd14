# if 0
# The schemas of the iapt:: ops, written once and read by both languages.
#
# C++ (csrc/registration.cpp) includes this file inside TORCH_LIBRARY(iapt, m) with IAPT_OP defined as
# m.def: the preprocessor drops this block, and each IAPT_OP line below is a C++ statement. Python
# (iapt_kernels.library) imports it and defines the same schemas when the C++ extension is not built:
# the preprocessor lines are comments there, and IAPT_OP appends to SCHEMAS. Adjacent string literals
# concatenate in both languages. Keep the file to IAPT_OP calls, without apostrophes (the C++
# preprocessor still tokenises the skipped block).
#
# No op takes a backend: CPU tensors run the C++ kernels, CUDA tensors the Triton launchers.
# The multi-tenant ops take their TenantGroups tensors and stacked weights as lists:
#   groups = TenantGroups.tensors(): [order, seg_start, seg_tenant, wsel, unit] and, when known,
#     absent; the C++ kernels read the first three, the rest are the Triton launch lists and
#     zero-fill list, computed once per batch and not per layer,
#   weights (forward) = [down_weight, down_bias, pool_weight, numerator, denominator, up_weight, up_bias],
#   weights (backward) = [down_weight, pool_weight, numerator, denominator, up_weight],
#   saved = [A, Z, U, G, n, Wdp], the forward outputs after P.

SCHEMAS: list[str] = []
IAPT_OP = SCHEMAS.append
# endif

IAPT_OP("rational_fwd(Tensor x, Tensor numerator, Tensor denominator, str version) -> Tensor")
IAPT_OP(
    "rational_bwd(Tensor grad, Tensor x, Tensor numerator, Tensor denominator, str version)"
    " -> (Tensor, Tensor, Tensor)"
)
IAPT_OP(
    "attention_pool_fwd(Tensor hidden_states, Tensor? mask, Tensor? cu_seqlens, Tensor down_weight,"
    " Tensor down_bias, Tensor pool_weight, int max_seqlen) -> (Tensor, Tensor, Tensor, Tensor)"
)
IAPT_OP(
    "attention_pool_bwd(Tensor grad, Tensor hidden_states, Tensor? mask, Tensor? cu_seqlens,"
    " Tensor down_weight, Tensor pool_weight, Tensor weights, Tensor pooled_inputs, Tensor nonempty,"
    " int max_seqlen) -> (Tensor, Tensor, Tensor, Tensor)"
)
IAPT_OP(
    "multi_tenant_generator_fwd(Tensor hidden_states, Tensor? mask, Tensor? cu_seqlens, Tensor[] groups,"
    " Tensor[] weights, str version, int max_seqlen)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
IAPT_OP(
    "multi_tenant_generator_bwd(Tensor grad, Tensor hidden_states, Tensor? mask, Tensor? cu_seqlens,"
    " Tensor[] groups, Tensor[] weights, Tensor[] saved, str version, int max_seqlen)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
