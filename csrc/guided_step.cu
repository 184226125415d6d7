// The CUDA kernel of pyinv::guided_step (pyinv/kernels/guided_step.py holds the reference,
// the source of truth, and pyinv/ops.py the op's schema, fake implementation and autograd).
//
// One pass: each thread reads VEC consecutive elements of every map with one 128-bit load
// per map (when the rows are 16-byte aligned and C·H·W % VEC == 0), computes in fp32 (fp64
// for fp64), and writes its VEC results with one store; LocalBlend recomputes row 0's
// stepped value at the same offsets instead of a second pass. The per-thread body and the
// per-element formulas are guided_step_kernel.cuh (host-compilable: the CPU kernel uses the
// same formulas, and the tests run the body on the CPU), the argument handling
// guided_step_args.h; this file adds the grid-stride launch and the registration as the
// CUDA kernel of pyinv::guided_step. The setup.py build (module pyinv._C_cuda) also
// exposes it as the plain function pyinv._C_cuda.guided_step, outside the dispatcher.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "guided_step_args.h"
#include "guided_step_kernel.cuh"

namespace pyinv_step {
namespace {

constexpr int kThreads = 256;

template <int VEC, bool V, typename T, typename A>
__global__ void __launch_bounds__(kThreads) guided_step_kernel(const StepArgs<T, A> a, const int64_t n_vec) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; v < n_vec; v += stride) {
    step_vector<VEC, V>(a, v);
  }
}

template <int VEC, bool V, typename T, typename A>
void launch_variant(const StepArgs<T, A>& a, int64_t numel, cudaStream_t stream) {
  const int64_t n_vec = numel / VEC;
  // One thread per vector up to a grid of 2^20 blocks; past that the threads loop.
  const int64_t blocks = std::min<int64_t>((n_vec + kThreads - 1) / kThreads, int64_t{1} << 20);
  guided_step_kernel<VEC, V, T, A><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, n_vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch(Prepared& r, cudaStream_t stream) {
  using A = at::opmath_type<T>;
  const StepArgs<T, A> a = step_args<T, A>(r);
  const int64_t numel = r.out.numel();
  with_variant<T>(r, [&](auto vec, auto v) { launch_variant<decltype(vec)::value, decltype(v)::value>(a, numel, stream); });
}

at::Tensor guided_step_cuda(const at::Tensor& latents, const at::Tensor& out_uncond, const at::Tensor& out_cond,
                            const at::Tensor& guidance, double alpha_t, double alpha_s, bool v_prediction,
                            double sigma, const std::optional<at::Tensor>& noise,
                            const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& pin,
                            const std::optional<at::Tensor>& pin_mask,
                            const std::optional<at::Tensor>& blend_mask) {
  constexpr const char* who = "pyinv::guided_step (cuda)";
  TORCH_CHECK(latents.is_cuda(), who, ": latents must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(latents.device());
  Prepared r = prepare(who, latents, out_uncond, out_cond, guidance, alpha_t, alpha_s,
                       v_prediction, sigma, noise, offset, pin, pin_mask, blend_mask);
  if (r.out.numel() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.in, "pyinv_guided_step_cuda",
                                    [&] { launch<scalar_t>(r, stream); });
  }
  return r.in == latents.scalar_type() ? r.out : r.out.to(latents.scalar_type());
}

}  // namespace
}  // namespace pyinv_step

TORCH_LIBRARY_IMPL(pyinv, CUDA, m) { m.impl("guided_step", &pyinv_step::guided_step_cuda); }

// Built by setup.py (which defines TORCH_EXTENSION_NAME): the importable module
// pyinv._C_cuda, whose import registers the kernel above and which also exposes it as a
// plain function for calling this implementation by name. Built by CMake: a plain library
// for torch.ops.load_library, which only registers the kernel.
#ifdef TORCH_EXTENSION_NAME
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyinv compiled per-step ops (CUDA)";
  m.def("guided_step", &pyinv_step::guided_step_cuda, "The CUDA kernel of pyinv::guided_step (same arguments)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
#endif
