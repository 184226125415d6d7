// The argument list of the guided-step ops: the same as pyinv::guided_step, which
// pyinv/ops.py defines (with its fake implementation) and which calls these compiled ops.
#pragma once

#define PYINV_GUIDED_STEP_SCHEMA                                                                 \
  "(Tensor latents, Tensor out_uncond, Tensor out_cond, Tensor guidance, float alpha_t, "        \
  "float alpha_s, bool v_prediction, float sigma, Tensor? noise, Tensor? offset, Tensor? pin, " \
  "Tensor? pin_mask, Tensor? blend_mask) -> Tensor"
