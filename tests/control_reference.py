"""Plain explicit-softmax versions of the attention controllers, used only by tests.

Each subclass plans its edit as the controller does (windows, rows, token maps: the same
tables) and replaces the plan's rule by the reference formulation: materialise
``P = softmax(Q Kᵀ·s)``, edit the maps as the papers' code does — from the plan's token maps
(``a``, the equaliser, refine's alignment, the replace mapper), not from the fused path's
mixing matrices — then ``P V``. The fast path must match these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyinv.control import MasaCtrl, PnP
from pyinv.control.attention import Rows
from pyinv.control.base import ControlRule, StepControl
from pyinv.control.masactrl import MasaRule
from pyinv.control.p2p import P2P, P2PPlan
from pyinv.control.pnp import PnPRule


def softmax_maps(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``P (R, H, n, m) = softmax(q kᵀ · scale)``."""
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)


@dataclass(frozen=True, eq=False, kw_only=True)
class ExplicitP2PRule(ControlRule):
    """Prompt-to-Prompt on materialised maps (the reference's edit order)."""

    plan: P2PPlan
    edit: str

    def attend(self, name, q, k, v, scale, call):
        plan, step = self.plan, call.step
        x = step.inputs
        P = softmax_maps(q, k, scale)
        s, tc = plan.fused_rule.source_cond, plan.target_cond.tolist()
        if name in plan.fused_rule.self_layers:
            if "self" in step.active:
                P = P.clone()
                for r in tc:
                    P[r] = P[s]
            return torch.matmul(P, v)
        maps = plan.maps
        a = x["alpha"].to(P.dtype)  # (T, L), this call's cross window
        e, keep = (t[plan.order].to(P.device, P.dtype) for t in (maps.eq, maps.keep))
        P_src, P_tgt = P[s], P[tc]  # (H, n, L), (T, H, n, L)
        if self.edit == "replace":
            edited = torch.einsum("hnl,tlm->thnm", P_src, maps.base[plan.order].to(P.device, P.dtype))
        elif self.edit == "refine":
            idx = maps.refine_index[plan.order].to(P.device)
            gathered = torch.stack([P_src[..., idx[t]] for t in range(len(tc))])
            edited = gathered * keep[:, None, None, :] + P_tgt * (1 - keep[:, None, None, :])
        else:
            edited = P_src.unsqueeze(0).expand_as(P_tgt)
        edited = edited * e[:, None, None, :]
        new = edited * a[:, None, None, :] + (1 - a[:, None, None, :]) * P_tgt
        P = P.clone()
        for t, r in enumerate(tc):
            P[r] = new[t]
        if name in plan.fused_rule.map_layers:
            src = (P_src * maps.blend_source.to(P.device, P.dtype)).sum(-1).sum(0, keepdim=True)  # (1, n)
            tgt = (new * maps.blend_targets[plan.order].to(P.device, P.dtype)[:, None, None, :]).sum(-1).sum(1)
            call.maps.append(torch.cat([src, tgt]).float())
        return torch.matmul(P, v)


class ExplicitP2PPlan(P2PPlan):
    """The P2P plan with the explicit rule; each step also carries its window ``a (T, L)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_rule = self.rule
        self.rule = ExplicitP2PRule(layers=self.rule.layers, plan=self, edit=self.edit)  # P2PPlan keeps the edit kind

    def step(self, i):
        step = super().step(i)
        alpha = self.alpha[i - self.first_step].to(self.target_cond.device)
        return StepControl(self.rule, {**step.inputs, "alpha": alpha}, step.active)


class ExplicitP2P(P2P):
    def plan(self, model, program, layout, context):
        defaults = context.method_defaults.get("p2p", {})
        n = program.schedule.num_steps
        maps = self.token_maps(model.tokenizer, context.source_prompt, list(context.targets), n, defaults)
        return ExplicitP2PPlan(self, model, program, layout, maps, self.self_max_tokens(defaults))


@dataclass(frozen=True, eq=False, kw_only=True)
class ExplicitMasaRule(MasaRule):
    """MasaCtrl on materialised maps: a target row attends over its source half's tokens."""

    rows: Rows | None = None

    def attend(self, name, q, k, v, scale, call):
        if "masa" not in call.step.active:
            return torch.matmul(softmax_maps(q, k, scale), v)
        out = []
        for r, (branch, kind) in enumerate(self.rows.layout.rows):
            src = self.rows.source_row(kind) if branch >= 1 else r
            P = softmax_maps(q[r : r + 1], k[src : src + 1], scale)
            out.append(torch.matmul(P, v[src : src + 1]))
        return torch.cat(out)


class ExplicitMasaCtrl(MasaCtrl):
    def plan(self, model, program, layout, context):
        plan = super().plan(model, program, layout, context)
        plan.rule = ExplicitMasaRule(layers=plan.rule.layers, rows=Rows(layout, model.device))
        return plan


@dataclass(frozen=True, eq=False, kw_only=True)
class ExplicitPnPRule(PnPRule):
    """PnP on materialised maps: a target row's map is the source pass's map; the feature
    block's output of every target row is the source pass's."""

    rows: Rows | None = None

    def attend(self, name, q, k, v, scale, call):
        P = softmax_maps(q, k, scale)
        if "attention" in call.step.active:
            src = self.rows.source_row("uncond")
            P = P.clone()
            for kind in ("uncond", "cond"):
                for r, _ in self.rows.targets[kind]:
                    P[r] = P[src]
        return torch.matmul(P, v)

    def features(self, name, output, call):
        if "features" not in call.step.active:
            return None
        src = self.rows.source_row("uncond")
        out = output.clone()
        for kind in ("uncond", "cond"):
            for r, _ in self.rows.targets[kind]:
                out[r] = output[src]
        return out


class ExplicitPnP(PnP):
    def plan(self, model, program, layout, context):
        plan = super().plan(model, program, layout, context)
        rule = plan.rule
        plan.rule = ExplicitPnPRule(
            layers=rule.layers, feature_modules=rule.feature_modules, rows=Rows(layout, model.device)
        )
        return plan
