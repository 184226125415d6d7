// Host-side preparation of one guided-step call for the kernels: checks, dtype
// unification, row-contiguous views, the vector width, and the StepArgs pointers of
// guided_step_kernel.cuh. Shared by the CPU kernel (guided_step.cpp), the CUDA launcher
// (guided_step.cu) and the host test loop (tests/csrc/guided_step_host.cpp), so all of them
// run exactly the same argument handling.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

#include "guided_step_kernel.cuh"

namespace pyinv_step {

// `t` broadcast to `shape` with each row t[b] one contiguous block (any batch stride, so an
// expanded row costs no copy); otherwise a contiguous copy. Converted to `dtype` first.
inline at::Tensor row_contiguous(const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype) {
  at::Tensor x = t.to(dtype).expand(shape);
  const int64_t C = shape[1], H = shape[2], W = shape[3];
  const auto s = x.strides();
  const bool ok = (s[3] == 1 || W == 1) && (s[2] == W || H == 1) && (s[1] == H * W || C == 1);
  return ok ? x : x.contiguous();
}

// The tensors one call reads and writes, kept alive while the kernel runs.
struct Prepared {
  at::Tensor z, u, c, n, o, p, w, pinned, blend, out;
  at::ScalarType in;  // the maps' common dtype (the kernel's T)
  int vec = 1;        // elements per thread
  double sqrt_at = 0, sqrt_1m_at = 0, sqrt_as = 0, direction = 0, sigma = 0;
  bool v_prediction = false;
};

inline bool aligned16(const at::Tensor& t) {
  return !t.defined() || reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

inline Prepared prepare(const char* who, const at::Tensor& latents, const at::Tensor& out_uncond,
                        const at::Tensor& out_cond, const at::Tensor& guidance, double alpha_t, double alpha_s,
                        bool v_prediction, double sigma, const std::optional<at::Tensor>& noise,
                        const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& pin,
                        const std::optional<at::Tensor>& pin_mask, const std::optional<at::Tensor>& blend_mask) {
  TORCH_CHECK(latents.dim() == 4, who, ": latents must be (B, C, H, W), got ", latents.sizes());
  TORCH_CHECK(at::isFloatingType(latents.scalar_type()), who, ": latents must be floating point");
  TORCH_CHECK(!pin_mask.has_value() || pin.has_value(), who, ": pin_mask given without pin");
  const auto device = latents.device();
  auto same_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == device, who, ": ", name, " is on ", t.device(), ", latents on ", device);
  };
  same_device(out_uncond, "out_uncond");
  same_device(out_cond, "out_cond");
  const bool use_noise = noise.has_value() && sigma > 0.0;
  if (use_noise) same_device(*noise, "noise");
  if (offset.has_value()) same_device(*offset, "offset");
  if (pin.has_value()) same_device(*pin, "pin");

  const auto shape = latents.sizes();
  const int64_t B = shape[0];
  const at::ScalarType dtype = latents.scalar_type();
  const at::ScalarType acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  // One dtype for all maps: the latents' when they all share it, else the math dtype (exact
  // for half inputs, which the reference converts the same way).
  bool same = out_uncond.scalar_type() == dtype && out_cond.scalar_type() == dtype;
  if (use_noise) same = same && noise->scalar_type() == dtype;
  if (offset.has_value()) same = same && offset->scalar_type() == dtype;
  if (pin.has_value()) same = same && pin->scalar_type() == dtype;

  Prepared r;
  r.in = same ? dtype : acc;
  r.z = row_contiguous(latents, shape, r.in);
  r.u = row_contiguous(out_uncond, shape, r.in);
  r.c = row_contiguous(out_cond, shape, r.in);
  if (use_noise) r.n = row_contiguous(*noise, shape, r.in);
  if (offset.has_value()) r.o = row_contiguous(*offset, shape, r.in);
  if (pin.has_value()) r.p = row_contiguous(*pin, shape, r.in);
  r.w = guidance.to(device, acc).reshape({-1}).expand({B}).contiguous();
  if (pin_mask.has_value()) r.pinned = pin_mask->to(device, at::kByte).reshape({-1}).expand({B}).contiguous();
  if (blend_mask.has_value()) r.blend = blend_mask->to(device, acc).expand(shape);
  r.out = at::empty(shape, latents.options().dtype(r.in).memory_format(at::MemoryFormat::Contiguous));

  const int64_t n_row = shape[1] * shape[2] * shape[3];
  const int vec = static_cast<int>(16 / at::elementSize(r.in));
  bool vectorised = n_row % vec == 0;
  for (const at::Tensor* t : {&r.z, &r.u, &r.c, &r.n, &r.o, &r.p, &r.out}) {
    if (t->defined()) vectorised = vectorised && aligned16(*t) && t->stride(0) % vec == 0;
  }
  r.vec = vectorised ? vec : 1;

  r.sqrt_at = std::sqrt(alpha_t);
  r.sqrt_1m_at = std::sqrt(1.0 - alpha_t);
  r.sqrt_as = std::sqrt(alpha_s);
  r.direction = std::sqrt(std::max(1.0 - alpha_s - sigma * sigma, 0.0));
  r.sigma = sigma;
  r.v_prediction = v_prediction;
  return r;
}

// The kernel's view of a prepared call (T: the maps' dtype, A: the math dtype).
template <typename T, typename A>
StepArgs<T, A> step_args(Prepared& r) {
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; };
  auto stride = [](const at::Tensor& t) { return t.defined() ? t.stride(0) : int64_t{0}; };
  StepArgs<T, A> a;
  a.out = r.out.data_ptr<T>();
  a.z = ptr(r.z), a.u = ptr(r.u), a.c = ptr(r.c), a.n = ptr(r.n), a.o = ptr(r.o), a.p = ptr(r.p);
  a.sz = stride(r.z), a.su = stride(r.u), a.sc = stride(r.c);
  a.sn = stride(r.n), a.so = stride(r.o), a.sp = stride(r.p);
  a.w = r.w.const_data_ptr<A>();
  a.pinned = r.pinned.defined() ? r.pinned.const_data_ptr<uint8_t>() : nullptr;
  a.blend = r.blend.defined() ? r.blend.const_data_ptr<A>() : nullptr;
  a.sb0 = a.sb1 = a.sb2 = a.sb3 = 0;
  if (r.blend.defined()) a.sb0 = r.blend.stride(0), a.sb1 = r.blend.stride(1), a.sb2 = r.blend.stride(2), a.sb3 = r.blend.stride(3);
  a.n_row = r.out.size(1) * r.out.size(2) * r.out.size(3);
  a.hw = r.out.size(2) * r.out.size(3);
  a.width = r.out.size(3);
  a.k = {static_cast<A>(r.sqrt_at), static_cast<A>(r.sqrt_1m_at), static_cast<A>(r.sqrt_as),
         static_cast<A>(r.direction), static_cast<A>(r.sigma)};
  return a;
}

// Calls fn(std::integral_constant<int, VEC>, std::bool_constant<V>) with the call's vector
// width (16 / sizeof(T), or 1) and prediction type (v or ε), so the kernel's variants are
// chosen in one place for the CUDA launcher and the host test loop.
template <typename T, typename F>
void with_variant(const Prepared& r, F&& fn) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  using Vector = std::integral_constant<int, kVec>;
  using Scalar = std::integral_constant<int, 1>;
  if (r.vec == kVec) {
    r.v_prediction ? fn(Vector{}, std::true_type{}) : fn(Vector{}, std::false_type{});
  } else {
    r.v_prediction ? fn(Scalar{}, std::true_type{}) : fn(Scalar{}, std::false_type{});
  }
}

}  // namespace pyinv_step
