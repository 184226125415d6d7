// The CPU kernel of pyinv::guided_step (pyinv/kernels/guided_step.py holds the reference,
// the source of truth, and pyinv/ops.py the op's schema, fake implementation and autograd).
//
// For each batch row b with UNet outputs u_b, c_b at level ᾱ_t and guidance w_b:
//   m_b  = u_b + w_b (c_b − u_b)
//   ε-prediction: ε_b = m_b,                x̂0_b = (z_b − √(1−ᾱ_t) ε_b) / √ᾱ_t
//   v-prediction: x̂0_b = √ᾱ_t z_b − √(1−ᾱ_t) m_b,  ε_b = √ᾱ_t m_b + √(1−ᾱ_t) z_b
//   z'_b = √ᾱ_s x̂0_b + √(max(1−ᾱ_s−σ², 0)) ε_b  [+ σ n_b if noise and σ > 0]  [+ o_b]
//   z'_b = p_b where pin_mask_b (everywhere when pin is given without a mask)
//   LocalBlend: z'_b = z'_0 + m_b (z'_b − z'_0), m of any shape broadcastable to (B, C, H, W)
//
// Shapes: latents, outputs, noise, offset, pin (B, C, H, W); guidance (B,); pin_mask (B,).
// Math in fp32 for fp16/bf16/fp32 inputs (fp64 for fp64); the result is a new contiguous
// tensor in latents' dtype. The formulas are the per-element functions of
// guided_step_kernel.cuh (step_element, with_noise, with_offset, blend_element), the
// argument handling prepare() and step_args() of guided_step_args.h, both shared with the
// CUDA kernel. One pass: at::parallel_for over the (b, channel) planes, each in chunks of
// H·W elements that stay in L1; a chunk reads its inputs once and writes once, and with
// LocalBlend recomputes row 0's stepped value at the same offsets. The inner loops are
// branch-free (the flags are template parameters) so the compiler vectorises them.
//
// Registered as the CPU kernel of pyinv::guided_step; the setup.py build (module pyinv._C)
// also exposes it as the plain function pyinv._C.guided_step, outside the dispatcher.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "guided_step_args.h"
#include "guided_step_kernel.cuh"

namespace pyinv_step {
namespace {

// Steps 1–4 of row b for row offsets [off, off + len) into `dst` (math dtype A). The flags
// are template parameters so that the loop is branch-free and the compiler vectorises it.
template <bool V, bool HAS_NOISE, bool HAS_OFFSET, typename T, typename A>
void step_chunk(const StepArgs<T, A>& a, int64_t b, int64_t off, int64_t len, A* __restrict__ dst) {
  const T* __restrict__ zp = a.z + b * a.sz + off;
  const T* __restrict__ up = a.u + b * a.su + off;
  const T* __restrict__ cp = a.c + b * a.sc + off;
  const T* __restrict__ np = HAS_NOISE ? a.n + b * a.sn + off : nullptr;
  const T* __restrict__ op = HAS_OFFSET ? a.o + b * a.so + off : nullptr;
  const A w = a.w[b];
  const Scalars<A> k = a.k;
  for (int64_t i = 0; i < len; ++i) {
    A out = step_element<V>(static_cast<A>(zp[i]), static_cast<A>(up[i]), static_cast<A>(cp[i]), w, k);
    if constexpr (HAS_NOISE) out = with_noise(out, static_cast<A>(np[i]), k);
    if constexpr (HAS_OFFSET) out = with_offset(out, static_cast<A>(op[i]));
    dst[i] = out;
  }
}

// z'_b at row offsets [off, off + len) into `dst`: the pinned source, or the step.
template <typename T, typename A>
void row_chunk(const StepArgs<T, A>& a, bool v_prediction, int64_t b, int64_t off, int64_t len, A* __restrict__ dst) {
  if (row_pinned(a, b)) {
    const T* __restrict__ pp = a.p + b * a.sp + off;
    for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<A>(pp[i]);
    return;
  }
  const int key = (v_prediction ? 4 : 0) | (a.n != nullptr ? 2 : 0) | (a.o != nullptr ? 1 : 0);
  switch (key) {
    case 0: return step_chunk<false, false, false>(a, b, off, len, dst);
    case 1: return step_chunk<false, false, true>(a, b, off, len, dst);
    case 2: return step_chunk<false, true, false>(a, b, off, len, dst);
    case 3: return step_chunk<false, true, true>(a, b, off, len, dst);
    case 4: return step_chunk<true, false, false>(a, b, off, len, dst);
    case 5: return step_chunk<true, false, true>(a, b, off, len, dst);
    case 6: return step_chunk<true, true, false>(a, b, off, len, dst);
    default: return step_chunk<true, true, true>(a, b, off, len, dst);
  }
}

// elements per chunk: two math-dtype buffers on the stack, small enough to stay in L1
constexpr int64_t kChunk = 512;

template <typename T>
void run(Prepared& r) {
  using A = at::opmath_type<T>;
  const int64_t C = r.out.size(1), H = r.out.size(2), W = r.out.size(3), HW = H * W;
  // the loops read the blend mask one (b, channel) plane at a time: each plane contiguous
  if (r.blend.defined()) {
    const auto s = r.blend.strides();
    if (!((s[3] == 1 || W == 1) && (s[2] == W || H == 1))) r.blend = r.blend.contiguous();
  }
  const StepArgs<T, A> a = step_args<T, A>(r);
  const bool v_prediction = r.v_prediction;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(HW, 1));
  at::parallel_for(0, r.out.size(0) * C, grain, [&](int64_t begin, int64_t end) {
    alignas(64) A value[kChunk];
    alignas(64) A source[kChunk];
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / C, ch = plane % C, off = ch * HW;
      T* out = a.out + b * a.n_row + off;
      for (int64_t j = 0; j < HW; j += kChunk) {
        const int64_t len = std::min(kChunk, HW - j);
        row_chunk(a, v_prediction, b, off + j, len, value);
        if (a.blend != nullptr) {
          // LocalBlend: row 0's stepped value at the same offsets, recomputed here
          row_chunk(a, v_prediction, 0, off + j, len, source);
          const A* __restrict__ m = a.blend + b * a.sb0 + ch * a.sb1 + j;
          for (int64_t i = 0; i < len; ++i) value[i] = blend_element(source[i], value[i], m[i]);
        }
        T* __restrict__ oj = out + j;
        for (int64_t i = 0; i < len; ++i) oj[i] = static_cast<T>(value[i]);
      }
    }
  });
}

at::Tensor guided_step_cpu(const at::Tensor& latents, const at::Tensor& out_uncond, const at::Tensor& out_cond,
                           const at::Tensor& guidance, double alpha_t, double alpha_s, bool v_prediction, double sigma,
                           const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& offset,
                           const std::optional<at::Tensor>& pin, const std::optional<at::Tensor>& pin_mask,
                           const std::optional<at::Tensor>& blend_mask) {
  constexpr const char* who = "pyinv::guided_step (cpp)";
  TORCH_CHECK(latents.device().is_cpu(), who, ": latents must be a CPU tensor");
  Prepared r = prepare(who, latents, out_uncond, out_cond, guidance, alpha_t, alpha_s, v_prediction, sigma, noise,
                       offset, pin, pin_mask, blend_mask);
  if (r.out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.in, "pyinv_guided_step_cpu", [&] { run<scalar_t>(r); });
  }
  return r.in == latents.scalar_type() ? r.out : r.out.to(latents.scalar_type());
}

}  // namespace
}  // namespace pyinv_step

TORCH_LIBRARY_IMPL(pyinv, CPU, m) { m.impl("guided_step", &pyinv_step::guided_step_cpu); }

// Built by setup.py (which defines TORCH_EXTENSION_NAME): the importable module pyinv._C,
// whose import registers the kernel above and which also exposes it as a plain function
// for calling this implementation by name. Built by CMake: a plain library for
// torch.ops.load_library, which only registers the kernel.
#ifdef TORCH_EXTENSION_NAME
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyinv compiled per-step ops (CPU)";
  m.def("guided_step", &pyinv_step::guided_step_cpu, "The CPU kernel of pyinv::guided_step (same arguments)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
#endif
