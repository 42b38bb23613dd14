// What every C++ kernel file shares: the storage dtypes a kernel is instantiated for, the compute
// type, the function attributes of the hot loops, and the huge-page advice for large outputs
// (docs/design.md section 4). One copy, so the files cannot drift apart.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// ATen's OpenMP backend implements at::parallel_for inline in its headers: compiled without
// -fopenmp, every parallel_for would silently run on one thread.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "iapt_kernels: build with -fopenmp (compile and link), or the kernels run single-threaded"
#endif

// Hot entry points are compiled twice (GCC target_clones: x86-64-v3 = AVX2 + FMA, and the
// baseline) and picked at load time, so the .so runs everywhere but uses ymm + FMA where it can.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define IAPT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define IAPT_MULTIVERSION
#endif

// The kernels must be inlined into the multiversioned entry points so that their bodies get
// compiled for each target; a plain `inline` is only a hint.
#if defined(__GNUC__)
#define IAPT_INLINE inline __attribute__((always_inline))
#else
#define IAPT_INLINE inline
#endif

// The dtype table: `FN<S>(...)` for the storage type S of `ST` (float, double, half, bfloat16);
// `WHAT` names the op in the error for any other dtype.
#define IAPT_DISPATCH_FLOATING(ST, WHAT, FN, ...)                           \
  switch (ST) {                                                           \
    case at::kFloat: FN<float>(__VA_ARGS__); break;                       \
    case at::kDouble: FN<double>(__VA_ARGS__); break;                     \
    case at::kHalf: FN<c10::Half>(__VA_ARGS__); break;                    \
    case at::kBFloat16: FN<c10::BFloat16>(__VA_ARGS__); break;            \
    default: TORCH_CHECK(false, WHAT, ": unsupported dtype ", ST);        \
  }

namespace iapt {

// Kernels compute in double for float64 storage, in float otherwise (docs/design.md section 5).
inline at::ScalarType compute_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// A fresh output of many MB costs more in first-touch page faults (one per 4 KiB page, each
// zeroed by the kernel) than the kernel itself takes to fill it. Asking for transparent huge pages
// on the 2 MiB-aligned interior of the new buffer cuts the fault count 512-fold where THP is in
// "madvise" mode (a common default). It is advice about memory this tensor owns; if THP is off or
// the allocator hands back already-touched memory it does nothing.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = end & ~(kHuge - 1);
  if (t.nbytes() >= 4 * kHuge && hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace iapt
