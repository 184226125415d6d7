// The element-wise math of the guided step, shared by the CUDA kernel (csrc/guided_step.cu)
// and the C++ CPU kernel (csrc/guided_step.cpp). Every function is C10_HOST_DEVICE:
// `__host__ __device__` under nvcc, empty for a plain C++ compiler, so the same code builds
// for both. The test suite also builds the CUDA kernel's per-thread body (step_vector) into a
// host loop (tests/csrc/guided_step_host.cpp) and checks it against the reference on the CPU.
//
// For each batch row b with UNet outputs u_b, c_b at level ᾱ_t and guidance w_b
// (pyinv/kernels/guided_step.py is the source of truth):
//   m_b  = u_b + w_b (c_b − u_b)
//   ε-prediction: ε_b = m_b,                x̂0_b = (z_b − √(1−ᾱ_t) ε_b) / √ᾱ_t
//   v-prediction: x̂0_b = √ᾱ_t z_b − √(1−ᾱ_t) m_b,  ε_b = √ᾱ_t m_b + √(1−ᾱ_t) z_b
//   z'_b = √ᾱ_s x̂0_b + √(max(1−ᾱ_s−σ², 0)) ε_b  [+ σ n_b]  [+ o_b]
//   z'_b = p_b where row b is pinned
//   LocalBlend: z'_b = z'_0 + m_b (z'_b − z'_0)
// step_element, with_noise, with_offset and blend_element are these formulas for one
// element, in the math dtype A (fp32, or fp64 for fp64 maps).
//
// Layout: every map is (B, C, H, W) with each row (b) one contiguous block of n_row = C·H·W
// elements at a per-map row stride (0 for a map broadcast over the batch); the output is
// contiguous. The blend mask (math dtype) is indexed through four strides, so any
// broadcast of it costs no copy. A CUDA thread handles VEC consecutive elements of one row:
// VEC = 16 / sizeof(T) when every row start is 16-byte aligned and n_row % VEC == 0 (one
// 128-bit load per map), else 1.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

// "#pragma unroll" for nvcc; host compilers unroll these fixed-count loops themselves.
#if defined(__CUDACC__)
#define PYINV_UNROLL _Pragma("unroll")
#else
#define PYINV_UNROLL
#endif

namespace pyinv_step {

template <typename A>
struct Scalars {
  A sqrt_at, sqrt_1m_at, sqrt_as, direction, sigma;
};

// Pointers and strides of one call; a null map pointer means the flag is off.
template <typename T, typename A>
struct StepArgs {
  T* out;
  const T* z;
  const T* u;
  const T* c;
  const T* n;   // noise (DDPM step), or nullptr
  const T* o;   // Direct Inversion offset, or nullptr
  const T* p;   // pinned source, or nullptr
  int64_t sz, su, sc, sn, so, sp;  // row strides in elements
  const A* w;                      // (B,) guidance
  const uint8_t* pinned;           // (B,) 0/1 per row, or nullptr: every row pinned when p is given
  const A* blend;                  // LocalBlend mask or nullptr
  int64_t sb0, sb1, sb2, sb3;      // its strides over (B, C, H, W)
  int64_t n_row, hw, width;        // C·H·W, H·W, W
  Scalars<A> k;
};

// Steps 1–3 for one element (without the DDPM noise term): CFG, the split of the guided
// prediction into x̂0 and ε (V: v-prediction, else ε-prediction), and the move to ᾱ_s.
template <bool V, typename A>
C10_HOST_DEVICE inline A step_element(A z, A u, A c, A w, const Scalars<A>& k) {
  const A m = u + w * (c - u);
  A x0, eps;
  if (V) {
    x0 = k.sqrt_at * z - k.sqrt_1m_at * m;
    eps = k.sqrt_at * m + k.sqrt_1m_at * z;
  } else {
    eps = m;
    x0 = (z - k.sqrt_1m_at * eps) / k.sqrt_at;
  }
  return k.sqrt_as * x0 + k.direction * eps;
}

// The DDPM noise term σ n.
template <typename A>
C10_HOST_DEVICE inline A with_noise(A out, A n, const Scalars<A>& k) {
  return out + k.sigma * n;
}

// Direct Inversion's reference offset o.
template <typename A>
C10_HOST_DEVICE inline A with_offset(A out, A o) {
  return out + o;
}

// LocalBlend: the source row's value where the mask is 0, the row's own where it is 1.
template <typename A>
C10_HOST_DEVICE inline A blend_element(A source, A value, A mask) {
  return source + mask * (value - source);
}

// Whether row b takes the pinned source instead of the step.
template <typename T, typename A>
C10_HOST_DEVICE inline bool row_pinned(const StepArgs<T, A>& a, int64_t b) {
  return a.p != nullptr && (a.pinned == nullptr || a.pinned[b] != 0);
}

// VEC elements of type T, aligned so that a load or store of one is a single instruction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename T, typename A>
C10_HOST_DEVICE inline void load_vec(const T* ptr, A (&dst)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(ptr);
  PYINV_UNROLL
  for (int i = 0; i < VEC; ++i) dst[i] = static_cast<A>(pack.v[i]);
}

// z'_b at row offsets [j, j + VEC): the pinned source, or steps 1–4.
template <int VEC, bool V, typename T, typename A>
C10_HOST_DEVICE inline void stepped(const StepArgs<T, A>& a, int64_t b, int64_t j, A (&out)[VEC]) {
  if (row_pinned(a, b)) {
    load_vec<VEC>(a.p + b * a.sp + j, out);
    return;
  }
  A z[VEC], u[VEC], c[VEC];
  load_vec<VEC>(a.z + b * a.sz + j, z);
  load_vec<VEC>(a.u + b * a.su + j, u);
  load_vec<VEC>(a.c + b * a.sc + j, c);
  const A w = a.w[b];
  const Scalars<A> k = a.k;
  PYINV_UNROLL
  for (int i = 0; i < VEC; ++i) out[i] = step_element<V>(z[i], u[i], c[i], w, k);
  if (a.n != nullptr) {  // the flags are the same for every thread: no divergence
    A n[VEC];
    load_vec<VEC>(a.n + b * a.sn + j, n);
    PYINV_UNROLL
    for (int i = 0; i < VEC; ++i) out[i] = with_noise(out[i], n[i], k);
  }
  if (a.o != nullptr) {
    A o[VEC];
    load_vec<VEC>(a.o + b * a.so + j, o);
    PYINV_UNROLL
    for (int i = 0; i < VEC; ++i) out[i] = with_offset(out[i], o[i]);
  }
}

// The whole step for elements [VEC·v, VEC·v + VEC) of the flattened (B, n_row) output.
template <int VEC, bool V, typename T, typename A>
C10_HOST_DEVICE inline void step_vector(const StepArgs<T, A>& a, int64_t v) {
  const int64_t i = v * VEC;
  const int64_t b = i / a.n_row;
  const int64_t j = i - b * a.n_row;
  A out[VEC];
  stepped<VEC, V>(a, b, j, out);
  if (a.blend != nullptr) {
    // LocalBlend mixes with row 0's stepped value: recomputed here at the same offsets.
    A src[VEC];
    stepped<VEC, V>(a, 0, j, src);
    PYINV_UNROLL
    for (int e = 0; e < VEC; ++e) {
      const int64_t jj = j + e;
      const int64_t ch = jj / a.hw;
      const int64_t rem = jj - ch * a.hw;
      const int64_t h = rem / a.width;
      const int64_t x = rem - h * a.width;
      out[e] = blend_element(src[e], out[e], a.blend[b * a.sb0 + ch * a.sb1 + h * a.sb2 + x * a.sb3]);
    }
  }
  Pack<T, VEC> pack;
  PYINV_UNROLL
  for (int e = 0; e < VEC; ++e) pack.v[e] = static_cast<T>(out[e]);
  *reinterpret_cast<Pack<T, VEC>*>(a.out + i) = pack;
}

}  // namespace pyinv_step
