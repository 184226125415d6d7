"""Prompt words → token positions, and the P2P token maps built from them."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

import pyinv
from pyinv.control import MasaCtrl, PnP
from pyinv.control.attention import attention_layers
from pyinv.control.p2p import _blend_layers
from pyinv.control.words import (
    refine_alignment,
    replace_mapper,
    window_alpha,
    word_positions,
    word_tokens,
)
from pyinv.errors import PyinvError

L = 77


@pytest.fixture(scope="module")
def tok(editor):
    return editor.model.tokenizer


def test_word_tokens_cover_the_prompt_tokens_in_order(tok):
    prompt = "a photo of a zebra, ball"
    ids = tok(prompt)["input_ids"]
    words = word_tokens(tok, prompt)
    positions = [p for _, pos in words for p in pos]
    assert positions == list(range(1, len(ids) - 1))  # every text token once, start/end excluded
    zebra = dict(words)["zebra,"]
    assert len(zebra) > 1  # a word the vocabulary splits
    assert tok.decode([ids[p] for p in zebra]).replace(" ", "") == "zebra,"


def test_word_positions_ignore_case_and_punctuation_and_name_the_prompt(tok):
    prompt = "a photo of a Zebra, ball"
    assert word_positions(tok, prompt, "zebra") == dict(word_tokens(tok, prompt))["Zebra,"]
    assert word_positions(tok, prompt, "a") == [1, 5]  # every occurrence
    with pytest.raises(PyinvError, match="'cat' is not in the prompt 'a photo of a Zebra, ball'"):
        word_positions(tok, prompt, "cat")


def test_replace_mapper_maps_words_position_by_position(tok):
    src, tgt = "a photo of a red ball", "a photo of a blue cube"
    M = replace_mapper(tok, src, tgt, L)
    assert torch.equal(M, torch.eye(L, dtype=M.dtype))  # same token counts: one to one
    assert torch.allclose(M.sum(0), torch.ones(L, dtype=M.dtype))  # every target column is a distribution


def test_replace_mapper_spreads_a_word_over_a_longer_replacement(tok):
    src, tgt = "a red ball", "a red zebra"
    M = replace_mapper(tok, src, tgt, L)
    ball = word_positions(tok, src, "ball")
    zebra = word_positions(tok, tgt, "zebra")
    assert len(ball) == 1 and len(zebra) > 1
    for j in zebra:
        assert M[ball[0], j] == pytest.approx(1 / len(zebra))
    end_src, end_tgt = ball[-1] + 1, zebra[-1] + 1  # the end tokens stay paired
    assert M[end_src, end_tgt] == 1.0
    # each source token's attention is conserved: its row sums to 1
    assert torch.allclose(M[: end_src + 1].sum(1), torch.ones(end_src + 1, dtype=M.dtype))


def test_replace_needs_equal_word_counts_and_suggests_refine(tok):
    with pytest.raises(PyinvError, match="same number of words.*refine"):
        replace_mapper(tok, "a photo of a ball", "a photo of a red ball", L)


def test_refine_alignment_marks_new_tokens_and_aligns_the_rest(tok):
    src, tgt = "a photo of a ball", "a photo of a red ball"
    idx, alpha = refine_alignment(tok, src, tgt, L)
    red = word_positions(tok, tgt, "red")
    assert alpha[red].eq(0).all() and alpha.sum() == L - len(red)
    assert idx[word_positions(tok, tgt, "ball")].tolist() == word_positions(tok, src, "ball")
    n_src = len(tok(src)["input_ids"])
    assert idx[: red[0]].tolist() == list(range(red[0]))  # shared prefix (start token included)
    assert idx[red[-1] + 2].item() == n_src - 1  # the target's end token reads the source's


def test_window_alpha_follows_the_reference_rounding_and_per_word_windows(tok):
    targets = ["a photo of a blue cube"]
    a = window_alpha(tok, targets, 10, 0.4, L)
    assert a.shape == (11, 1, L)
    assert a[:4].eq(1).all() and a[4:].eq(0).all()  # int(0.4 · 11) = 4 rows
    cube = word_positions(tok, targets[0], "cube")
    a = window_alpha(tok, targets, 10, {"default_": 0.8, "cube": (0.2, 0.5)}, L)
    assert a[:, 0, cube[0]].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert a[:8, 0, 1].eq(1).all() and a[8:, 0, 1].eq(0).all()


@pytest.mark.parametrize(
    "window, message",
    [
        (1.5, "outside"),
        ((0.5, 0.2), "starts after it ends"),
        ({"default_": 0.8, "cube": (0.0, 2.0)}, "outside"),
        ({"dog": 0.5}, "'dog' is not in the target"),
        ("soon", "must be a number"),
    ],
)
def test_window_alpha_rejects_bad_windows(tok, window, message):
    with pytest.raises(PyinvError, match=message):
        window_alpha(tok, ["a photo of a blue cube"], 10, window, L)


# ---------------------------------------------------------------------- layer choice on SD 1.x's UNet
@pytest.fixture(scope="module")
def sd15_layers():
    with torch.device("meta"):  # the architecture only: no weights are allocated
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    return unet, attention_layers(unet, (64, 64))


def test_sd15_layers_in_execution_order_with_their_sizes(sd15_layers):
    _, layers = sd15_layers
    own = [x for x in layers if not x.is_cross]
    assert len(own) == 16 and len([x for x in layers if x.is_cross]) == 16
    assert [x.size[0] for x in own] == [64, 64, 32, 32, 16, 16, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]
    assert [x.part for x in own] == ["down"] * 6 + ["mid"] + ["up"] * 9


def test_local_blend_reads_the_five_16x16_layers_of_sd15(sd15_layers):
    _, layers = sd15_layers
    names = [x.module for x in _blend_layers(layers, 16)]
    assert names == [
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2",
        "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2",
    ]


def test_pnp_injects_decoder_layers_4_to_11_of_sd15(sd15_layers):
    _, layers = sd15_layers
    chosen = [x.module.split(".transformer")[0] for x in PnP().controlled_layers(layers)]
    expected = [
        f"up_blocks.{b}.attentions.{a}" for b, attns in ((1, (1, 2)), (2, (0, 1, 2)), (3, (0, 1, 2))) for a in attns
    ]
    assert chosen == expected


def test_masactrl_default_is_layer_10_of_sd15s_16(sd15_layers):
    _, layers = sd15_layers
    chosen = MasaCtrl().controlled_layers(layers)
    assert [x.index for x in chosen] == list(range(10, 16))
    assert all(x.module.startswith(("up_blocks.2", "up_blocks.3")) for x in chosen)


def test_tiny_model_layers_scale_the_defaults(editor):
    layers = attention_layers(editor.model.unet, (16, 16))
    own = [x for x in layers if not x.is_cross]
    assert len(own) == 7
    assert [x.index for x in MasaCtrl().controlled_layers(layers)] == [4, 5, 6]  # round(10/16 · 7) = 4
    with pytest.raises(PyinvError, match="past the model's 7 self-attention layers"):
        MasaCtrl(start_layer=7).controlled_layers(layers)
    assert isinstance(pyinv.P2P(), pyinv.Controller)
