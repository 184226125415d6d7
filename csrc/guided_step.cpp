// CPU twin of pyinv/kernels/guided_step.py (the reference there is the source of truth).
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
// tensor in latents' dtype. One pass: each task (a (b, channel) plane of H·W elements, in
// chunks that stay in L1) reads its inputs once and writes once; with LocalBlend it
// recomputes row 0's stepped value at the same offsets. The inner loops are branch-free
// (flags are template parameters) so the compiler vectorises them. Registered as the op
// pyinv::guided_step_cpp (CPU), which the Python implementation of pyinv::guided_step
// (pyinv/ops.py) calls when the C++ implementation is chosen.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "guided_step_args.h"
#include "guided_step_schema.h"

namespace {

template <typename A>
struct Params {
  A sqrt_at, sqrt_1m_at, sqrt_as, direction, sigma;
  bool v_prediction;
};

// One row's input pointers (nullptr: the flag is off).
template <typename T, typename A>
struct Row {
  const T* z;
  const T* u;
  const T* c;
  const T* n;
  const T* o;
  const T* p;  // nullptr also when this row is not pinned
  A w;
};

// Steps 1–4 for `len` elements into `dst` (math dtype A). The flags are template
// parameters so that the loop is branch-free and the compiler vectorises it.
template <typename T, typename A, bool V, bool HAS_NOISE, bool HAS_OFFSET>
void step_chunk(const Row<T, A>& r, int64_t off, int64_t len, const Params<A>& P, A* __restrict__ dst) {
  const T* __restrict__ zp = r.z + off;
  const T* __restrict__ up = r.u + off;
  const T* __restrict__ cp = r.c + off;
  const T* __restrict__ np = HAS_NOISE ? r.n + off : nullptr;
  const T* __restrict__ op = HAS_OFFSET ? r.o + off : nullptr;
  const A w = r.w, sa = P.sqrt_at, sb = P.sqrt_1m_at, sas = P.sqrt_as, dir = P.direction, sigma = P.sigma;
  for (int64_t i = 0; i < len; ++i) {
    const A z = static_cast<A>(zp[i]);
    const A u = static_cast<A>(up[i]);
    const A m = u + w * (static_cast<A>(cp[i]) - u);
    A x0, eps;
    if constexpr (V) {
      x0 = sa * z - sb * m;
      eps = sa * m + sb * z;
    } else {
      eps = m;
      x0 = (z - sb * eps) / sa;
    }
    A out = sas * x0 + dir * eps;
    if constexpr (HAS_NOISE) out = out + sigma * static_cast<A>(np[i]);
    if constexpr (HAS_OFFSET) out = out + static_cast<A>(op[i]);
    dst[i] = out;
  }
}

// z'_row at [off, off + len) into `dst`: the pinned value, or the step.
template <typename T, typename A>
void row_chunk(const Row<T, A>& r, int64_t off, int64_t len, const Params<A>& P, A* __restrict__ dst) {
  if (r.p) {
    const T* __restrict__ pp = r.p + off;
    for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<A>(pp[i]);
    return;
  }
  const int key = (P.v_prediction ? 4 : 0) | (r.n ? 2 : 0) | (r.o ? 1 : 0);
  switch (key) {
    case 0: return step_chunk<T, A, false, false, false>(r, off, len, P, dst);
    case 1: return step_chunk<T, A, false, false, true>(r, off, len, P, dst);
    case 2: return step_chunk<T, A, false, true, false>(r, off, len, P, dst);
    case 3: return step_chunk<T, A, false, true, true>(r, off, len, P, dst);
    case 4: return step_chunk<T, A, true, false, false>(r, off, len, P, dst);
    case 5: return step_chunk<T, A, true, false, true>(r, off, len, P, dst);
    case 6: return step_chunk<T, A, true, true, false>(r, off, len, P, dst);
    default: return step_chunk<T, A, true, true, true>(r, off, len, P, dst);
  }
}

// elements per chunk: two math-dtype buffers on the stack, small enough to stay in L1
constexpr int64_t kChunk = 512;

template <typename T, typename A>
void run(pyinv_step::Prepared& r) {
  at::Tensor& out = r.out;
  const int64_t B = out.size(0), C = out.size(1), HW = out.size(2) * out.size(3);
  const int64_t n_row = C * HW;
  Params<A> P;
  P.sqrt_at = static_cast<A>(r.sqrt_at);
  P.sqrt_1m_at = static_cast<A>(r.sqrt_1m_at);
  P.sqrt_as = static_cast<A>(r.sqrt_as);
  P.direction = static_cast<A>(r.direction);
  P.sigma = static_cast<A>(r.sigma);
  P.v_prediction = r.v_prediction;
  const A* w = r.w.const_data_ptr<A>();
  const uint8_t* pinned = r.pinned.defined() ? r.pinned.const_data_ptr<uint8_t>() : nullptr;
  auto ptr = [](const at::Tensor& t, int64_t b) { return t.defined() ? t.const_data_ptr<T>() + b * t.stride(0) : nullptr; };
  auto row_of = [&](int64_t b) {
    Row<T, A> row;
    row.z = ptr(r.z, b), row.u = ptr(r.u, b), row.c = ptr(r.c, b), row.n = ptr(r.n, b), row.o = ptr(r.o, b);
    row.p = pinned == nullptr || pinned[b] != 0 ? ptr(r.p, b) : nullptr;
    row.w = w[b];
    return row;
  };
  // the loops read the blend mask one (b, channel) plane at a time
  const bool has_blend = r.blend.defined();
  if (has_blend) {
    const auto s = r.blend.strides();
    if (!((s[3] == 1 || out.size(3) == 1) && (s[2] == out.size(3) || out.size(2) == 1))) r.blend = r.blend.contiguous();
  }
  const A* bm = has_blend ? r.blend.const_data_ptr<A>() : nullptr;
  const int64_t bs0 = has_blend ? r.blend.stride(0) : 0, bs1 = has_blend ? r.blend.stride(1) : 0;
  T* dst = out.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(HW, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    alignas(64) A value[kChunk];
    alignas(64) A source[kChunk];
    const Row<T, A> r0 = row_of(0);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / C, ch = plane % C, off = ch * HW;
      const Row<T, A> rb = row_of(b);
      T* o = dst + b * n_row + off;
      for (int64_t j = 0; j < HW; j += kChunk) {
        const int64_t len = std::min(kChunk, HW - j);
        row_chunk(rb, off + j, len, P, value);
        if (has_blend) {
          // LocalBlend: row 0's stepped value at the same offsets, recomputed here
          row_chunk(r0, off + j, len, P, source);
          const A* __restrict__ m = bm + b * bs0 + ch * bs1 + j;
          for (int64_t i = 0; i < len; ++i) value[i] = source[i] + m[i] * (value[i] - source[i]);
        }
        T* __restrict__ oj = o + j;
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
  TORCH_CHECK(latents.device().is_cpu(), "pyinv::guided_step_cpp: latents must be a CPU tensor");
  pyinv_step::Prepared r = pyinv_step::prepare("pyinv::guided_step_cpp", latents, out_uncond, out_cond, guidance,
                                               alpha_t, alpha_s, v_prediction, sigma, noise, offset, pin, pin_mask,
                                               blend_mask);
  if (r.out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.in, "pyinv_guided_step_cpu",
                                    [&] { run<scalar_t, at::opmath_type<scalar_t>>(r); });
  }
  return r.in == latents.scalar_type() ? r.out : r.out.to(latents.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyinv, m) { m.def("guided_step_cpp" PYINV_GUIDED_STEP_SCHEMA); }

TORCH_LIBRARY_IMPL(pyinv, CPU, m) { m.impl("guided_step_cpp", &guided_step_cpu); }

// Built by setup.py (which defines TORCH_EXTENSION_NAME): an importable module pyinv._C whose
// import registers the kernel above. Built by CMake: a plain library for torch.ops.load_library.
#ifdef TORCH_EXTENSION_NAME
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "pyinv compiled per-step ops (CPU)"; }
#endif
