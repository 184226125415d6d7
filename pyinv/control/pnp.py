"""Plug-and-Play feature injection (Tumanyan et al., arXiv 2211.12572).

The source pass is the source latent with the empty prompt (the source branch's
unconditional pass). Into both target passes (unconditional and conditional):

- at schedule steps ``i < int(feature_steps·N)``, the residual-branch output of the decoder
  ResNet ``up_blocks[1].resnets[1]`` (its ``conv2`` output, before the skip connection is
  added) is replaced by the source's — on SD 1.x/2.x; on other UNets the ResNet at the same
  place, :func:`reference_feature_layer`;
- at schedule steps ``i < int(attention_steps·N)``, the self-attention queries and keys of
  the decoder's self-attention layers after the first (SD 1.x: decoder layers 4–11) are
  replaced by the source's: ``out_tgt = SDPA(Q_src, K_src, V_tgt)``.

Steps are counted as the reference counts them: indices into the N-step schedule, whatever
step the edit starts at. PnP-Inversion's runner (``run_editing_pnp.py``, which pairs PnP with
DDIM and Direct Inversion, as pyinv does) injects at the timesteps
``scheduler.timesteps[:int(N·f)]``, tested by value in the hooks; the original code
(MichalGeyer/plug-and-play, ``run_pnp.py``) also indexes by schedule step but injects at
``i ≤ threshold`` (41 and 26 of 50 steps, one more each); pyinv follows PnP-Inversion. An
edit that starts at step ``first_step > 0`` (EF-DDPM's skip) therefore gets
``int(f·N) − first_step`` injected steps, not ``int(f·N)``.

Targets use ``negative_prompt`` for their unconditional pass (the reference's
"ugly, blurry, black, low res, unrealistic"). The default is kept only on a model that knows
its words: on a closed-vocabulary model (the demo model, whose captions never hold "ugly" or
"blurry", and whose world has the colour "black") the targets keep the method's own
unconditional embedding instead; a negative prompt given explicitly is always used. With
plain DDIM inversion the source branch is the guidance-1 reconstruction with the source
prompt, as in the reference.
Both injections are row indices, so they stay inside the fused attention call and the
forward hook on the public ``conv2`` module (installed once per model); the plan stacks them
over the steps (the identity outside the windows where every step applies them, ``graph_static``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import PyinvError
from .attention import AttentionLayer, Rows, attention_layers, feature_modules, sdpa
from .base import Controller, ControlRule, EditContext, StepTable
from .words import check_window, unknown_words

DEFAULT_NEGATIVE_PROMPT = "ugly, blurry, black, low res, unrealistic"
DEFAULT_FEATURE_LAYER = "up_blocks.1.resnets.1"


class PnP(Controller):
    """``PnP(feature_steps=0.8, attention_steps=0.5, feature_layer=None,
    attention_layers=None, negative_prompt="ugly, blurry, black, low res, unrealistic")``.

    ``feature_layer``: module name of the ResNet block whose features are injected (``None``:
    :func:`reference_feature_layer`, SD's ``up_blocks.1.resnets.1``).
    ``attention_layers``: module names of the self-attention layers to inject (``None``:
    every decoder self-attention layer except the first). ``negative_prompt=None`` keeps the
    method's own unconditional embedding for the targets; the default (the reference's text)
    does the same on a model whose vocabulary lacks its words (:func:`words.unknown_words`).
    """

    reads_source = frozenset({"uncond"})

    def __init__(
        self,
        feature_steps: float = 0.8,
        attention_steps: float = 0.5,
        feature_layer: str | None = None,
        attention_layers: list[str] | None = None,
        negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT,
        graph_static: bool | None = None,
    ):
        for name, value in (("feature_steps", feature_steps), ("attention_steps", attention_steps)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PyinvError(f"PnP {name} must be a number in [0, 1], got {value!r}")
            check_window(value, f"PnP {name}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise PyinvError(f"negative prompt must be a string, got {type(negative_prompt).__name__}")
        self.feature_steps = float(feature_steps)
        self.attention_steps = float(attention_steps)
        self.feature_layer = feature_layer
        self.attention_layers = None if attention_layers is None else list(attention_layers)
        self.negative_prompt = negative_prompt
        #: the negative prompt is the reference's default (dropped where the model lacks its words)
        self.reference_negative = negative_prompt is DEFAULT_NEGATIVE_PROMPT
        self.graph_static = None if graph_static is None else bool(graph_static)

    def __repr__(self) -> str:
        return (
            f"PnP(feature_steps={self.feature_steps}, attention_steps={self.attention_steps},"
            f" feature_layer={self.feature_layer!r}, negative_prompt={self.negative_prompt!r})"
        )

    def check_prompts(self, model, source_prompt: str, targets: list[str], num_steps: int | None = None) -> None:
        _conv2(model.unet, self.resolved_feature_layer(model.unet))
        self.controlled_layers(attention_layers(model.unet, (model.latent_size, model.latent_size)))

    def prepare(self, model, program, source_prompt: str, targets: list[str]):
        _conv2(model.unet, self.resolved_feature_layer(model.unet))  # fails early with a clear error
        changes = {}
        negative = self.resolved_negative_prompt(model.tokenizer)
        if negative is not None:
            changes["uncond"] = _targets_uncond(program, model.encode_prompts([negative]))
        if program.has_source and program.source_drifts:
            guidance = program.guidance.clone()
            guidance[0] = 1.0
            changes["guidance"] = guidance
        return dataclasses.replace(program, **changes) if changes else program

    def resolved_negative_prompt(self, tokenizer) -> str | None:
        """The targets' negative prompt for a model with ``tokenizer`` (``None``: the method's own
        unconditional embedding). The reference's default text is dropped when the model has no
        token for some of its words: they would be byte pieces its text encoder never saw."""
        if self.reference_negative and unknown_words(tokenizer, self.negative_prompt):
            return None
        return self.negative_prompt

    def controlled_layers(self, layers: list[AttentionLayer]) -> list[AttentionLayer]:
        own = [x for x in layers if not x.is_cross]
        if self.attention_layers is None:
            return [x for x in own if x.part == "up" and x.decoder_index >= 1]
        by_module = {x.module: x for x in own}
        missing = [name for name in self.attention_layers if name not in by_module]
        if missing:
            raise PyinvError(f"PnP attention layer(s) {', '.join(missing)} are not self-attention layers of this UNet")
        return [by_module[name] for name in self.attention_layers]

    def resolved_feature_layer(self, unet) -> str:
        return self.feature_layer if self.feature_layer is not None else reference_feature_layer(unet)

    def plan(self, model, program, layout, context: EditContext) -> StepTable:
        """Per schedule step: the feature and query/key row indices ``(R,)`` (every target row →
        the source's unconditional row)."""
        n, first = program.schedule.num_steps, program.first_step
        feature_until, attention_until = int(n * self.feature_steps), int(n * self.attention_steps)
        feature = self.resolved_feature_layer(model.unet)
        _conv2(model.unet, feature)
        size = tuple(int(s) for s in program.start.shape[-2:])
        chosen = self.controlled_layers(attention_layers(model.unet, size))
        rows = Rows(layout, model.device)
        source = {"uncond": "uncond", "cond": "uncond"}
        steps = range(first, n)
        features, attention = [i < feature_until for i in steps], [i < attention_until for i in steps]
        everywhere, static = [True] * len(steps), self.static_for(model)
        per_step = {
            "features": rows.per_step_index(source, features if static else everywhere),
            "qk": rows.per_step_index(source, attention if static else everywhere),
        }
        active = [
            frozenset({"features"} if f else set()) | frozenset({"attention"} if a else set())
            for f, a in zip(features, attention, strict=True)
        ]
        rule = PnPRule(layers=frozenset(x.name for x in chosen), feature_modules=frozenset({feature}))
        terms = frozenset({"features", "attention"})
        return StepTable(rule, first, per_step, {}, active, terms, static)


@dataclass(frozen=True, kw_only=True)
class PnPRule(ControlRule):
    """``out = SDPA(Q[qk], K[qk], V)`` on the controlled self-attention layers and
    ``h ← h[features]`` on the feature block's ``conv2`` output."""

    shared_inputs = {"qk": "index", "features": "index"}

    def share_identity(self) -> PnPRule:
        return self  # no row numbers in the rule itself

    def attend(self, name: str, q, k, v, scale: float, call):
        step = call.step
        if "attention" not in step.active:
            return sdpa(q, k, v, scale)
        qk = step.inputs["qk"]
        return sdpa(q.index_select(0, qk), k.index_select(0, qk), v, scale)

    def features(self, name: str, output: torch.Tensor, call) -> torch.Tensor | None:
        step = call.step
        if "features" not in step.active:
            return None
        return output.index_select(0, step.inputs["features"])


def reference_feature_layer(unet) -> str:
    """The reference's feature layer by its place in the UNet: the second ResNet of the first
    decoder block with attention. On SD 1.x/2.x that is ``up_blocks.1.resnets.1`` (16×16 of a
    64×64 latent, the paper's "decoder layer 4"; ``up_blocks[0]`` there has no attention). On a
    UNet with fewer levels the name alone would move it up a resolution: the demo model's
    ``up_blocks[1]`` works at half the latent's side, its ``up_blocks[0]`` at a quarter, as SD's
    ``up_blocks[1]`` does."""
    for k, block in enumerate(unet.up_blocks):
        if getattr(block, "attentions", None):
            return f"up_blocks.{k}.resnets.{min(1, len(block.resnets) - 1)}"
    return DEFAULT_FEATURE_LAYER


def _conv2(unet, name: str) -> torch.nn.Module:
    try:
        block = unet.get_submodule(name)
    except AttributeError:
        raise PyinvError(f"PnP feature layer {name!r} is not a module of this UNet") from None
    conv = feature_modules(unet).get(name)
    if conv is None or not isinstance(getattr(block, "conv2", None), torch.nn.Module):
        raise PyinvError(f"PnP feature layer {name!r} is not a ResNet block (it has no conv2)")
    return conv


def _targets_uncond(program, negative: torch.Tensor):
    """The program's unconditional embeddings with every target row set to ``negative``."""
    first = 1 if program.has_source else 0
    old = program.uncond

    def replaced(u: torch.Tensor) -> torch.Tensor:
        u = u.clone()
        u[first:] = negative.to(u.device, u.dtype)
        return u

    if callable(old):
        return lambda i: replaced(old(i))
    return replaced(old)
