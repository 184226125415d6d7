// Test build of the CUDA guided step's body on the CPU: the same argument handling
// (csrc/guided_step_args.h) and per-thread code (csrc/guided_step_kernel.cuh) as
// csrc/guided_step.cu, with the grid-stride launch replaced by a loop over the thread
// indices. Registered as the CPU kernel of pyinv_test::guided_step_cuda_body, an op of the
// test namespace whose schema the test defines from pyinv.ops.GUIDED_STEP_SCHEMA.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>

#include "guided_step_args.h"
#include "guided_step_kernel.cuh"

namespace {

template <int VEC, bool V, typename T, typename A>
void loop(const pyinv_step::StepArgs<T, A>& a, int64_t numel) {
  for (int64_t v = 0; v < numel / VEC; ++v) pyinv_step::step_vector<VEC, V>(a, v);
}

template <typename T>
void run(pyinv_step::Prepared& r) {
  using A = at::opmath_type<T>;
  const auto a = pyinv_step::step_args<T, A>(r);
  const int64_t numel = r.out.numel();
  pyinv_step::with_variant<T>(r, [&](auto vec, auto v) { loop<decltype(vec)::value, decltype(v)::value>(a, numel); });
}

at::Tensor guided_step_cuda_body(const at::Tensor& latents, const at::Tensor& out_uncond, const at::Tensor& out_cond,
                                 const at::Tensor& guidance, double alpha_t, double alpha_s, bool v_prediction,
                                 double sigma, const std::optional<at::Tensor>& noise,
                                 const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& pin,
                                 const std::optional<at::Tensor>& pin_mask,
                                 const std::optional<at::Tensor>& blend_mask) {
  auto r = pyinv_step::prepare("pyinv_test::guided_step_cuda_body", latents, out_uncond, out_cond, guidance, alpha_t,
                               alpha_s, v_prediction, sigma, noise, offset, pin, pin_mask, blend_mask);
  if (r.out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.in, "guided_step_cuda_body", [&] { run<scalar_t>(r); });
  }
  return r.in == latents.scalar_type() ? r.out : r.out.to(latents.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(pyinv_test, CPU, m) { m.impl("guided_step_cuda_body", &guided_step_cuda_body); }

// Reports the vector width prepare() picks (the tests check both paths are exercised).
TORCH_LIBRARY_FRAGMENT(pyinv_test, m) {
  m.def("vector_width(Tensor latents, Tensor out_uncond, Tensor out_cond) -> int", [](const at::Tensor& z, const at::Tensor& u, const at::Tensor& c) -> int64_t {
    auto g = at::ones({z.size(0)}, z.options().dtype(at::kFloat));
    return pyinv_step::prepare("vector_width", z, u, c, g, 0.5, 0.6, false, 0.0, std::nullopt, std::nullopt,
                               std::nullopt, std::nullopt, std::nullopt).vec;
  });
}
