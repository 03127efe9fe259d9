// Matrix products on fp32 tiles, issued from inside the kernels' parallel region: one thread,
// one product, the result written into (or added to) a caller-owned contiguous buffer.
//
// Two engines, both shipped inside the torch wheel:
// * oneDNN (ATen's exported at::native::mkldnn_matmul). Its JIT picks the widest vector unit
//   the CPU has. Preferred: on AMD EPYC (Zen 4/5) the x86 wheels' MKL runs its AVX2 code
//   (MKL dispatches on the CPU vendor), so the same tile product runs ~2.2x faster in oneDNN
//   (measured: 450-480 vs 190-220 GFLOP/s on 2 Zen-5 cores, fp32, H = 1024, tiles of 256-1024).
//   It follows torch's fp32 matmul precision setting, as torch's own oneDNN matmuls do.
// * BLAS through ATen (at::mm_out / addmm_, MKL in the x86 wheels): the fallback where ATen
//   lacks the oneDNN entry point (builds without it, or a torch that stops exporting it).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <string_view>

namespace at {
namespace native {
// result = beta * result + alpha * mat1 @ mat2 (ATen/native/mkldnn/Matmul.h, TORCH_API, not in
// the wheel's headers). Weak: null when this torch does not export it.
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha)
    __attribute__((weak));
}  // namespace native
}  // namespace at

// MKL is told by torch not to adapt its thread count, so an MKL product issued inside our
// parallel region would start a nested team of its own: oversubscription, and on a busy machine
// a 4x slowdown. The Fortran-convention entry point (argument by pointer) is the one the wheels
// export. Weak: absent when torch uses another BLAS, which then runs as it would anyway.
// (oneDNN needs nothing of the kind: inside an OpenMP parallel region it runs on the caller's
// thread alone.)
extern "C" int mkl_set_num_threads_local_(const int*) __attribute__((weak));

namespace spin_kernels {

enum class Gemm { kBlas, kOneDnn };

inline bool onednn_available() { return at::native::mkldnn_matmul != nullptr; }

// "auto" (oneDNN when available, else BLAS), "onednn" (an error when unavailable) or "blas".
inline Gemm resolve_gemm(c10::string_view requested) {
  const std::string_view name(requested.data(), requested.size());
  if (name == "blas") return Gemm::kBlas;
  if (name == "onednn") {
    TORCH_CHECK(onednn_available(), "gemm='onednn' is not available: this torch does not export "
                                    "at::native::mkldnn_matmul; use gemm='blas' or 'auto'");
    return Gemm::kOneDnn;
  }
  TORCH_CHECK(name == "auto", "gemm must be 'auto', 'onednn' or 'blas', got '", std::string(name), "'");
  return onednn_available() ? Gemm::kOneDnn : Gemm::kBlas;
}

// Single-threaded BLAS on this thread while alive (see mkl_set_num_threads_local_ above).
class SerialBlas {
 public:
  SerialBlas() : active_(mkl_set_num_threads_local_ != nullptr) {
    const int one = 1;
    if (active_) previous_ = mkl_set_num_threads_local_(&one);
  }
  ~SerialBlas() {
    if (active_) mkl_set_num_threads_local_(&previous_);
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  bool active_;
  int previous_ = 0;
};

// out = a @ b, or out += a @ b when `accumulate`. fp32 2-D operands; a and b may be strided
// views (a transposed tile, a column range of the weight); out must be contiguous, so that
// oneDNN writes it in place instead of through a buffer of its own.
inline void tile_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, bool accumulate, Gemm gemm) {
  if (out.numel() == 0) return;
  if (a.size(1) == 0) {  // an empty sum; not every engine takes K = 0
    if (!accumulate) std::fill_n(out.data_ptr<float>(), out.numel(), 0.0f);
    return;
  }
  if (gemm == Gemm::kOneDnn) {
    at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
  } else if (accumulate) {
    const_cast<at::Tensor&>(out).addmm_(a, b);
  } else {
    at::mm_out(const_cast<at::Tensor&>(out), a, b);
  }
}

}  // namespace spin_kernels
