"""Plain explicit-softmax versions of the attention controllers, used only by tests.

Each subclass keeps the controller's bookkeeping (windows, rows, token maps) and replaces
its fused ``attend`` by the reference formulation: materialise ``P = softmax(Q Kᵀ·s)``,
edit the maps as the papers' code does, then ``P V``. The fast path must match these.
"""

from __future__ import annotations

import torch

from pyinv.control import MasaCtrl, PnP
from pyinv.control.p2p import P2P


def softmax_maps(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``P (R, H, n, m) = softmax(q kᵀ · scale)``."""
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)


class ExplicitP2P(P2P):
    """Prompt-to-Prompt on materialised maps (the reference's edit order)."""

    def attend(self, layer, q, k, v, scale):
        P = softmax_maps(q, k, scale)
        s, tc = self.source_cond, self.target_cond.tolist()
        if not layer.is_cross:
            if self.self_active and layer.tokens <= self.self_max_tokens:
                P = P.clone()
                for r in tc:
                    P[r] = P[s]
            return torch.matmul(P, v)
        a, e, keep = (x.to(P.dtype) for x in (self._a, self._eq, self._keep))  # (T, L)
        P_src, P_tgt = P[s], P[tc]  # (H, n, L), (T, H, n, L)
        if self.edit == "replace":
            edited = torch.einsum("hnl,tlm->thnm", P_src, self._base.to(P.dtype))
        elif self.edit == "refine":
            idx = self.refine_index[self._order].to(P.device)
            gathered = torch.stack([P_src[..., idx[t]] for t in range(len(tc))])
            edited = gathered * keep[:, None, None, :] + P_tgt * (1 - keep[:, None, None, :])
        else:
            edited = P_src.unsqueeze(0).expand_as(P_tgt)
        edited = edited * e[:, None, None, :]
        new = edited * a[:, None, None, :] + (1 - a[:, None, None, :]) * P_tgt
        P = P.clone()
        for t, r in enumerate(tc):
            P[r] = new[t]
        if layer.name in self.blend_layers:
            src = (P_src * self._blend_src.to(P.dtype)).sum(-1).sum(0, keepdim=True)  # (1, n)
            tgt = (new * self._blend_tgt.to(P.dtype)[:, None, None, :]).sum(-1).sum(1)  # (T, n)
            maps = torch.cat([src, tgt]).float()
            self._blend_sum = maps if self._blend_sum is None else self._blend_sum + maps
        return torch.matmul(P, v)


class ExplicitMasaCtrl(MasaCtrl):
    """MasaCtrl on materialised maps: a target row attends over its source half's tokens."""

    def attend(self, layer, q, k, v, scale):
        if not self.active:
            return torch.matmul(softmax_maps(q, k, scale), v)
        out = []
        for r, (branch, kind) in enumerate(self.rows.layout.rows):
            src = self.rows.source_row(kind) if branch >= 1 else r
            P = softmax_maps(q[r : r + 1], k[src : src + 1], scale)
            out.append(torch.matmul(P, v[src : src + 1]))
        return torch.cat(out)


class ExplicitPnP(PnP):
    """PnP on materialised maps: a target row's map is the source pass's map."""

    def attend(self, layer, q, k, v, scale):
        P = softmax_maps(q, k, scale)
        if self.attention_active:
            src = self.rows.source_row("uncond")
            P = P.clone()
            for kind in ("uncond", "cond"):
                for r, _ in self.rows.targets[kind]:
                    P[r] = P[src]
        return torch.matmul(P, v)
