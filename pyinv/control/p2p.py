"""Prompt-to-Prompt attention control (Hertz et al., arXiv 2208.01626) on fused attention.

Only the conditional passes are controlled: every target's conditional pass reads the
source's conditional pass. With ``P = softmax(Q Kᵀ·s)`` the reference edits the target's
cross-attention map, per target token ``j`` (columns) at call ``k`` of the edit:

    P'_tgt[:, j] = a_j e_j (α_j P_src[:, idx_j] + (1 − α_j) P_tgt[:, j]) + (1 − a_j) P_tgt[:, j]   (refine)
    P'_tgt       = a ⊙ e ⊙ (P_src · M) + (1 − a) ⊙ P_tgt                                          (replace)
    P'_tgt       = a ⊙ e ⊙ P_src + (1 − a) ⊙ P_tgt                                                 (reweight only)

with ``a`` the per-token cross-attention window (1 inside), ``e`` the reweighting
equaliser, ``M`` the replace mapper and ``idx, α`` the refine alignment
(:mod:`pyinv.control.words`). Every edit is linear in the key axis, so

    P'_tgt V_tgt = P_src (A V_tgt) + P_tgt (b ⊙ V_tgt),   A = base · diag(a e α),  b = a e (1 − α) + 1 − a

(``base`` = ``M``, the 0/1 selection of ``idx``, or ``I``) — two ``scaled_dot_product_attention``
calls, no map materialised. Self-attention replace (calls in the self window, layers with
≤ 32² queries) is ``SDPA(Q_src, K_src, V_tgt)``.

LocalBlend needs word maps ``P E`` (``E`` = 0/1 indicator of the words' tokens): the same
identity with ``E`` in place of ``V``, on the cross-attention layers at 16×16 of the encoder
and decoder. As in the reference, the target's maps are taken after the edit, summed over
heads, layers and all calls so far; the mask is max-pooled (3×3), nearest-upsampled to the
latent size, divided by its maximum, thresholded, and united with the source's mask. From
call ``int(start·N)`` on, the step op mixes ``z_tgt ← z_src + mask ⊙ (z_tgt − z_src)``.
Each UNet call returns its layers' maps summed, ``(1 + T, h·w)``, as an extra output; the loop
keeps only their running sum across calls.

The plan (:class:`P2PPlan`) builds every step's tensors before the first step: ``A``, ``b``
and the self-attention row index stacked over the calls, and which terms each call applies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import PyinvError
from .attention import AttentionLayer, Rows, attention_layers, sdpa
from .base import Controller, ControlRule, EditContext, StepTable
from .words import check_window, refine_alignment, replace_mapper, window_alpha, word_weights

EDITS = ("refine", "replace", "reweight")
#: self-attention is replaced only in layers with at most this many query tokens (the P2P and
#: NTI code's 32²; EF-DDPM's P2P code uses 16², see :attr:`Method.control_defaults`)
SELF_REPLACE_MAX_TOKENS = 32 * 32
#: the windows when none are given: the P2P paper's code (with DDIM inversion) and NTI's
DEFAULT_CROSS_REPLACE, DEFAULT_SELF_REPLACE = 0.8, 0.4


def _words(value, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(",") if "," in value else [value]
    if not isinstance(value, Sequence) or not value or not all(isinstance(w, str) and w.strip() for w in value):
        raise PyinvError(f"{what} must be a word or a list of words, got {value!r}")
    return tuple(w.strip() for w in value)


@dataclass
class LocalBlend:
    """Keep the image outside the edited words' region: see the module docstring.

    Args:
        source_words: word(s) of the source prompt whose region may change.
        target_words: word(s) of every target prompt whose region may change.
        threshold: mask threshold on the max-normalised map (reference 0.3).
        start: fraction of the steps before blending starts (reference 0.2: from call
            ``int(0.2·N)`` on).
        resolution: side of the attention maps used (if the model has no cross-attention
            layer of that size, the closest size is used). ``None``: the reference's 16 on
            SD 1.x/2.x, and on SDXL the same fraction of the image, 1/32 of its side (the 16²
            maps of SD at 512² are 32² at SDXL's 1024²; the reference has no SDXL code).
    """

    source_words: str | Sequence[str]
    target_words: str | Sequence[str]
    threshold: float = 0.3
    start: float = 0.2
    resolution: int | None = None

    def __post_init__(self):
        self.source_words = _words(self.source_words, "blend source words")
        self.target_words = _words(self.target_words, "blend target words")
        for name in ("threshold", "start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
                raise PyinvError(f"blend {name} must be a number in [0, 1], got {value!r}")
        if self.resolution is None:
            return
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 1:
            raise PyinvError(f"blend resolution must be a positive integer, got {self.resolution!r}")


class P2P(Controller):
    """Prompt-to-Prompt: ``P2P(edit="refine", cross_replace=None, self_replace=None, reweight=None, blend=None)``.

    Args:
        edit: ``"refine"`` (words added or changed; global token alignment), ``"replace"``
            (same word count; word-to-token mapper) or ``"reweight"`` (only ``reweight``).
        cross_replace: cross-attention window — a fraction, a pair ``(start, end)``, or a
            dict ``{"default_": 0.8, "word": (s, e)}`` with per-word windows (target words).
            ``None``: the inversion method's reference value — 0.8 (P2P's code, which pairs
            it with DDIM inversion; NTI, NPI, PTI, Direct Inversion), 0.6 with EF-DDPM
            (DDPM_inversion's P2P runs).
        self_replace: self-attention replace window — a fraction or a pair; ``None``: 0.4, or
            0.2 with EF-DDPM.
        reweight: ``{word: scale}`` for target words (columns scaled, not renormalised).
        blend: a :class:`LocalBlend`, or ``(source_words, target_words)`` for its defaults.
        graph_static: apply every term at every step (see :class:`~pyinv.control.base.Controller`).

    Windows count the calls of the edit, as the references' controllers do (``cur_step``
    starts at 0 at the first sampling step and advances once per step), in fractions of the
    schedule's N steps: self-attention replace covers calls ``int(s·N) ≤ k < int(e·N)``,
    cross-attention ``int(s·(N+1)) ≤ k < int(e·(N+1))`` (the reference's ``N+1``-row table)
    and LocalBlend mixes from call ``int(start·N)``. With EF-DDPM's skip (``first_step = 36``
    of 100) they are still fractions of N = 100 counted from step 36 — DDPM_inversion hands its
    controller ``num_diffusion_steps`` (100) and starts sampling at step ``skip`` — so
    ``self_replace=0.2`` covers 20 of the 64 steps run and ``cross_replace=0.6`` 60.
    """

    reads_source = frozenset({"cond"})

    def __init__(
        self,
        edit: str = "refine",
        cross_replace=None,
        self_replace=None,
        reweight: dict[str, float] | None = None,
        blend: LocalBlend | tuple | None = None,
        graph_static: bool | None = None,
    ):
        if edit not in EDITS:
            raise PyinvError(f"unknown P2P edit {edit!r}; use one of {', '.join(EDITS)}")
        if edit == "reweight" and not reweight:
            raise PyinvError("the reweight edit needs words to reweight (reweight={'word': scale})")
        for word, value in (reweight or {}).items():
            if not isinstance(word, str) or not word.strip():
                raise PyinvError(f"reweight words must be non-empty strings, got {word!r}")
            if isinstance(value, bool) or not isinstance(value, int | float) or not float(value) == float(value):
                raise PyinvError(f"reweight scale of {word!r} must be a number, got {value!r}")
        if isinstance(cross_replace, dict):
            for value in cross_replace.values():
                check_window(value, "cross_replace")
        elif cross_replace is not None:
            check_window(cross_replace, "cross_replace")
        if self_replace is not None:
            check_window(self_replace, "self_replace")
        if blend is not None and not isinstance(blend, LocalBlend):
            if not isinstance(blend, Sequence) or isinstance(blend, str) or len(blend) != 2:
                raise PyinvError(f"blend must be a LocalBlend or a pair (source words, target words), got {blend!r}")
            blend = LocalBlend(*blend)
        self.edit = edit
        self.cross_replace = cross_replace
        self.self_replace = self_replace
        self.reweight = dict(reweight or {})
        self.blend = blend
        self.graph_static = None if graph_static is None else bool(graph_static)

    def windows(self, defaults) -> tuple:
        """``(cross_replace, self_replace)``: as given, else the inversion method's P2P reference
        values ``defaults`` (``Method.control_defaults["p2p"]``), else P2P's own."""
        d = defaults
        cross = self.cross_replace if self.cross_replace is not None else d.get("cross_replace", DEFAULT_CROSS_REPLACE)
        own = self.self_replace if self.self_replace is not None else d.get("self_replace", DEFAULT_SELF_REPLACE)
        return cross, own

    @staticmethod
    def self_max_tokens(defaults) -> int:
        """Self-attention is replaced in layers with at most this many queries (the method's
        ``defaults["self_max_tokens"]``, else 32²)."""
        return int(defaults.get("self_max_tokens", SELF_REPLACE_MAX_TOKENS))

    @classmethod
    def pie_bench(
        cls, source_word: str | None = None, target_word: str | None = None, graph_static: bool | None = None
    ) -> P2P:
        """The P2P settings of PnP-Inversion's PIE-Bench runs: refine, cross-attention window
        0.4, self-attention window 0.6, LocalBlend on the edited words, and the target's
        edited word reweighted ×2. Without the words (an entry with no blended word) it is
        refine with the same windows, no blend and no reweighting."""
        if (source_word is None) != (target_word is None):
            raise PyinvError("P2P.pie_bench needs both the source and the target word, or neither")
        words = target_word is not None
        return cls(
            edit="refine",
            cross_replace=0.4,
            self_replace=0.6,
            reweight={target_word: 2.0} if words else None,
            blend=LocalBlend(source_word, target_word) if words else None,
            graph_static=graph_static,
        )

    def __repr__(self) -> str:
        return (
            f"P2P(edit={self.edit!r}, cross_replace={self.cross_replace!r}, self_replace={self.self_replace!r},"
            f" reweight={self.reweight!r}, blend={self.blend!r})"
        )

    # ------------------------------------------------------------------ per edit
    def check_prompts(self, model, source_prompt: str, targets: list[str], num_steps: int | None = None) -> None:
        self.token_maps(model.tokenizer, source_prompt, targets, num_steps or 50, {})

    def token_maps(self, tok, source_prompt: str, targets: list[str], n: int, defaults) -> TokenMaps:
        """The edit's token maps for these prompts and N = ``n`` steps (CPU, fp64, ``(T, L, …)``)."""
        length = int(tok.model_max_length)
        T = len(targets)
        base = torch.zeros(T, length, length, dtype=torch.float64)
        keep = torch.ones(T, length, dtype=torch.float64)  # α: weight of the source column
        refine_index = torch.arange(length).repeat(T, 1)
        for t, target in enumerate(targets):
            if self.edit == "replace":
                base[t] = replace_mapper(tok, source_prompt, target, length)
            elif self.edit == "refine":
                idx, alpha = refine_alignment(tok, source_prompt, target, length)
                base[t, idx, torch.arange(length)] = 1.0
                keep[t], refine_index[t] = alpha, idx
            else:
                base[t] = torch.eye(length, dtype=torch.float64)
        eq = torch.stack(
            [word_weights(tok, target, self.reweight, length, base=1.0, what="reweight word") for target in targets]
        )
        cross, own = self.windows(defaults)
        s, e = check_window(own, "self_replace")
        maps = TokenMaps(
            base, keep, eq, refine_index, window_alpha(tok, targets, n, cross, length), (int(n * s), int(n * e))
        )
        if self.blend is not None:
            words = {w: 1.0 for w in self.blend.source_words}
            maps.blend_source = word_weights(tok, source_prompt, words, length, what="blend source word")
            words = {w: 1.0 for w in self.blend.target_words}
            maps.blend_targets = torch.stack(
                [word_weights(tok, target, words, length, what="blend target word") for target in targets]
            )
            maps.blend_start = int(self.blend.start * n)
        return maps

    def plan(self, model, program, layout, context: EditContext) -> P2PPlan:
        """The edit's tables: per call ``k`` the key-mixing matrices ``A_k (T, L, L)``, the
        vectors ``b_k (T, L)`` and their per-row form ``(R, L)`` (1 on rows that are not
        targets), the self-attention row index ``(R,)``; the blend indicators; the active terms."""
        defaults = context.method_defaults.get("p2p", {})
        n = program.schedule.num_steps
        maps = self.token_maps(model.tokenizer, context.source_prompt, list(context.targets), n, defaults)
        return P2PPlan(self, model, program, layout, maps, self.self_max_tokens(defaults))


@dataclass
class TokenMaps:
    """Per-edit token maps (CPU): ``base (T, L, L)`` (replace mapper, refine selection or I),
    ``keep (T, L)`` (refine's α), ``eq (T, L)`` (equaliser), ``refine_index (T, L)``,
    ``cross_alpha (N+1, T, L)`` (cross window per call), ``self_steps`` (self window, calls),
    and LocalBlend's ``blend_source (L,)``, ``blend_targets (T, L)``, ``blend_start`` (call)."""

    base: torch.Tensor
    keep: torch.Tensor
    eq: torch.Tensor
    refine_index: torch.Tensor
    cross_alpha: torch.Tensor
    self_steps: tuple[int, int]
    blend_source: torch.Tensor | None = None
    blend_targets: torch.Tensor | None = None
    blend_start: int = 0


@dataclass(frozen=True, kw_only=True)
class P2PRule(ControlRule):
    """P2P's attention on the layers it controls (see the module docstring).

    ``layers``: the self-attention layers in ``self_layers`` (replaced in the self window)
    and every cross-attention layer; ``map_layers``: the cross-attention layers whose word
    maps LocalBlend sums; ``source_cond``: the source's conditional row. A ``multi_source`` rule
    serves several edits in one call (:mod:`pyinv.control.shared`): each target reads the
    source row ``target_source[t]`` and LocalBlend's source maps come from the rows
    ``sources`` (one per edit), with ``blend_source (E, L)``.
    """

    self_layers: frozenset[str]
    map_layers: frozenset[str]
    source_cond: int
    multi_source: bool = False

    shared_inputs = {
        "self_qk": "index",
        "targets": "index",
        "key_scale": "concat",
        "mix": "concat",
        "target_scale": "concat",
        "blend_targets": "concat",
        "blend_source": "stack",
    }

    def share_identity(self) -> P2PRule:
        return dataclasses.replace(self, source_cond=0, multi_source=False)

    def shared(self, steps, offsets):
        sources, per_target = [], []
        for step, offset in zip(steps, offsets, strict=True):
            row = step.rule.source_cond + offset
            sources.append(row)
            per_target += [row] * int(step.inputs["targets"].shape[0])
        device = steps[0].inputs["targets"].device
        extra = {
            "sources": torch.tensor(sources, dtype=torch.long, device=device),
            "target_source": torch.tensor(per_target, dtype=torch.long, device=device),
        }
        return dataclasses.replace(self, source_cond=0, multi_source=True), extra

    def split_maps(self, maps, steps):
        """Rows ``(E + T, n)`` of a shared call (the edits' sources, then all targets) →
        per edit ``(1 + T_e, n)``."""
        out, first = [], len(steps)
        for e, step in enumerate(steps):
            count = int(step.inputs["targets"].shape[0])
            out.append(torch.cat([maps[e : e + 1], maps[first : first + count]]))
            first += count
        return out

    def attend(self, name: str, q, k, v, scale: float, call) -> torch.Tensor:
        step = call.step
        x = step.inputs
        if name in self.self_layers:
            if "self" not in step.active:
                return sdpa(q, k, v, scale)
            idx = x["self_qk"]
            return sdpa(q.index_select(0, idx), k.index_select(0, idx), v, scale)
        edit = "cross" in step.active
        targets = x["targets"]
        if edit:
            out = sdpa(q, k, v * x["key_scale"][:, None, :, None], scale)
            from_source = self.from_source(q, k, v.index_select(0, targets), x, scale)
            out = out.index_add(0, targets, from_source)
        else:
            out = sdpa(q, k, v, scale)
        if name in self.map_layers:
            call.maps.append(self.word_maps(q, k, scale, x, edit))
        return out

    def from_source(self, q, k, values, x, scale: float) -> torch.Tensor:
        """``SDPA(Q_src, K_src, A_t · values_t)`` for every target ``t``: ``(T, H, n, ·)``."""
        if self.multi_source:
            src = x["target_source"]
            qs, ks = q.index_select(0, src), k.index_select(0, src)
        else:
            T, s = values.shape[0], self.source_cond
            qs = q[s : s + 1].expand(T, -1, -1, -1)
            ks = k[s : s + 1].expand(T, -1, -1, -1)
        return sdpa(qs, ks, torch.matmul(x["mix"][:, None], values), scale)

    def word_maps(self, q, k, scale: float, x, edited: bool) -> torch.Tensor:
        """This layer's word maps summed over heads, ``(1 + T, n)`` float32: the source's, then
        each target's after the edit."""
        heads = q.shape[1]
        s, tc = self.source_cond, x["targets"]
        dt = q.dtype
        e_tgt = x["blend_targets"].to(dt)[:, None, :, None].expand(-1, heads, -1, -1)  # (T, H, L, 1)
        if self.multi_source:  # one source map per edit: (E, H, L, 1)
            rows = x["sources"]
            e_src = x["blend_source"].to(dt)[:, None, :, None].expand(-1, heads, -1, -1)
            src = sdpa(q.index_select(0, rows), k.index_select(0, rows), e_src, scale)
        else:
            e_src = x["blend_source"].to(dt)[None, None, :, None].expand(1, heads, -1, -1)
            src = sdpa(q[s : s + 1], k[s : s + 1], e_src, scale)
        q_t, k_t = q.index_select(0, tc), k.index_select(0, tc)
        if edited:
            tgt = sdpa(q_t, k_t, e_tgt * x["target_scale"].to(dt)[:, None, :, None], scale)
            tgt = tgt + self.from_source(q, k, e_tgt, x, scale)
        else:
            tgt = sdpa(q_t, k_t, e_tgt, scale)
        return torch.cat([src, tgt]).sum(1)[..., 0].float()


class P2PPlan(StepTable):
    """P2P's tables for one edit (see :meth:`P2P.plan`); ``maps`` the edit's :class:`TokenMaps`."""

    def __init__(self, control: P2P, model, program, layout, maps: TokenMaps, self_max_tokens: int):
        dev, dtype = model.device, model.dtype
        rows = Rows(layout, dev)
        self.maps, self.self_max_tokens, self.edit = maps, self_max_tokens, control.edit
        self.latent_size = tuple(int(s) for s in program.start.shape[-2:])
        layers = attention_layers(model.unet, self.latent_size)
        blend = control.blend
        map_layers: list[AttentionLayer] = []
        if blend is not None:
            map_layers = _blend_layers(layers, blend_side(blend, model))
            self.blend_size = map_layers[0].size  # all chosen layers share it
        s0, s1 = maps.self_steps
        self_layers = [x for x in layers if not x.is_cross and s1 > s0 and x.tokens <= self_max_tokens]
        cross_layers = [x for x in layers if x.is_cross]
        rule = P2PRule(
            layers=frozenset(x.name for x in self_layers + cross_layers),
            self_layers=frozenset(x.name for x in self_layers),
            map_layers=frozenset(x.name for x in map_layers),
            source_cond=rows.source_row("cond"),
        )
        self.order = order = rows.target_numbers("cond")
        self.target_cond = rows.target_index("cond")
        first, n = program.first_step, program.schedule.num_steps
        calls = n - first
        # per call k: a_k (T, L), A_k = base · diag(a e α), b_k = a e (1 − α) + 1 − a
        base, keep, eq = (x[order] for x in (maps.base, maps.keep, maps.eq))
        last = maps.cross_alpha.shape[0] - 1
        alpha = maps.cross_alpha[[min(k, last) for k in range(calls)]][:, order]  # (S, T, L)
        self.alpha = alpha
        coef = alpha * eq * keep
        mix = base[None] * coef[:, :, None, :]  # (S, T, L, L)
        target_scale = alpha * eq * (1.0 - keep) + (1.0 - alpha)  # (S, T, L)
        key_scale = torch.ones(calls, rows.size, alpha.shape[-1], dtype=torch.float64)
        key_scale[:, [r for r, _ in rows.targets["cond"]]] = target_scale
        in_self = [s0 <= k < s1 for k in range(calls)]
        static = control.static_for(model)
        active = []
        for k in range(calls):
            terms = {"maps"} if blend is not None else set()
            if bool(alpha[k].any()):
                terms.add("cross")
            if in_self[k]:
                terms.add("self")
            active.append(frozenset(terms))
        per_step = {
            "mix": mix.to(dev, dtype),
            "target_scale": target_scale.to(dev, dtype),
            "key_scale": key_scale.to(dev, dtype),
        }
        if self_layers:
            per_step["self_qk"] = rows.per_step_index({"cond": "cond"}, in_self if static else [True] * calls)
        constant = {"targets": self.target_cond}
        terms = frozenset({"cross", "self"} | ({"maps"} if blend is not None else set()))
        if blend is not None:
            constant["blend_source"] = maps.blend_source.to(dev)
            constant["blend_targets"] = maps.blend_targets[order].to(dev)
            self.maps_shape = (1 + len(order), self.blend_size[0] * self.blend_size[1])
            self.blend_start, self.threshold = first + maps.blend_start, blend.threshold
        super().__init__(rule, first, per_step, constant, active, terms, static)

    def blend_mask(self, i: int, maps: torch.Tensor | None) -> torch.Tensor | None:
        if self.maps_shape is None or i < self.blend_start:
            return None
        return blend_mask_from_maps(maps, self.blend_size, self.latent_size, self.threshold)


def blend_mask_from_maps(maps: torch.Tensor, size: tuple[int, int], latent_size, threshold: float) -> torch.Tensor:
    """LocalBlend mask ``(1 + T, 1, H, W)`` (float 0/1) from summed word maps ``(1 + T, h·w)``:
    3×3 max-pool, nearest upsample, divide by the max, ``> threshold``, union with row 0."""
    m = maps.view(maps.shape[0], 1, *size)
    m = F.max_pool2d(m, kernel_size=3, stride=1, padding=1)
    m = F.interpolate(m, size=tuple(latent_size))
    m = m / m.amax(dim=(2, 3), keepdim=True)
    mask = m > threshold
    return (mask[:1] | mask).to(maps.dtype)


#: LocalBlend's map side on SD 1.x/2.x (the reference's 16², at any image size)
SD_BLEND_SIDE = 16


def blend_side(blend: LocalBlend, model) -> int:
    """The side of the maps ``blend`` uses on ``model`` (see :attr:`LocalBlend.resolution`)."""
    if blend.resolution is not None:
        return int(blend.resolution)
    if getattr(model, "family", "SD") == "SDXL":
        return max(1, int(model.image_size) // 32)
    return SD_BLEND_SIDE


def _blend_layers(layers: list[AttentionLayer], resolution: int) -> list[AttentionLayer]:
    """Encoder and decoder cross-attention layers at ``resolution²`` (else the closest size)."""
    candidates = [x for x in layers if x.is_cross and x.part in ("down", "up")]
    if not candidates:
        raise PyinvError("LocalBlend needs cross-attention layers in the UNet's encoder or decoder")
    target = resolution * resolution
    best = min(candidates, key=lambda x: (abs(x.tokens - target), -x.tokens)).size
    return [x for x in candidates if x.size == best]
