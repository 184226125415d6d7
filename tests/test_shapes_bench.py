"""ShapesBench cases and scoring, the background metrics, and the demo model's training script."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyinv.bench import shapes_bench as sb
from pyinv.bench.metrics import masked_mse, masked_psnr, masked_ssim, to_unit_tensor
from pyinv.errors import PyinvError
from pyinv.shapes import render, shape_mask


# ---------------------------------------------------------------------- cases
def test_cases_are_deterministic_and_change_exactly_one_attribute():
    cases = sb.make_cases(12)
    assert cases == sb.make_cases(12)
    assert [c.kind for c in cases[:6]] == list(sb.EDIT_KINDS) * 2
    assert len({c.id for c in cases}) == len(cases) == 36
    for case in cases:
        changed = [a for a in ("shape", "color", "background") if getattr(case.source, a) != getattr(case.target, a)]
        assert changed == [case.kind]
        assert (case.source.center, case.source.size) == (case.target.center, case.target.size)
        src_word, tgt_word = case.words
        assert src_word in case.source_prompt.split() and tgt_word in case.target_prompt.split()
    # the benchmark does not repeat one scene: the sources differ
    assert len({c.source for c in cases}) == len(cases)


def test_kinds_can_be_chosen_and_unknown_kinds_are_refused():
    cases = sb.make_cases(3, kinds=["shape"])
    assert [c.kind for c in cases] == ["shape"] * 3
    with pytest.raises(PyinvError, match="unknown edit kind"):
        sb.make_cases(2, kinds=["size"])


def test_edit_masks():
    cases = sb.make_cases(4)
    for case in cases:
        mask = case.edit_mask(32)
        before, after = shape_mask(case.source, 32), shape_mask(case.target, 32)
        if case.kind == "background":
            # the shape is what must be kept
            assert not (mask & before & after).any() and mask[~before].all()
        else:
            assert np.array_equal(mask, before | after)
        # outside the mask, source and target renders agree pixel for pixel
        src, tgt = np.asarray(case.image(32)), np.asarray(render(case.target, 32))
        assert np.array_equal(src[~mask], tgt[~mask])
        assert not np.array_equal(src[mask], tgt[mask])


# ---------------------------------------------------------------------- scoring
def test_a_perfect_edit_scores_perfectly_and_no_edit_fails():
    for case in sb.make_cases(3):
        perfect = sb.score(case, render(case.target, 32))
        assert perfect["success"] is True
        assert perfect["iou"] == 1.0 and perfect["centroid_shift"] == pytest.approx(0.0, abs=1e-9)
        assert perfect["psnr"] == math.inf and perfect["mse"] == 0.0 and perfect["ssim"] == pytest.approx(1.0, abs=1e-6)
        unchanged = sb.score(case, case.image(32))
        assert unchanged["success"] is False
        assert unchanged["psnr"] == math.inf  # the background was kept, trivially


def test_damage_outside_the_mask_lowers_the_background_scores():
    case = sb.make_cases(1, kinds=["color"])[0]
    edited = np.asarray(render(case.target, 32)).copy()
    keep = ~case.edit_mask(32)
    ys, xs = np.nonzero(keep)
    ys, xs = ys[::23][:20], xs[::23][:20]  # scattered pixels of the kept region
    edited[ys, xs] = 255 - edited[ys, xs]
    scores = sb.score(case, edited)
    assert scores["success"] is True  # the evaluator still reads the edit
    assert math.isfinite(scores["psnr"]) and scores["mse"] > 0 and scores["ssim"] < 1


def test_masked_metrics_follow_the_reference_definition():
    """Both images multiplied by the keep-mask, then the whole-image metric (values in [0, 1])."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 16, 16, generator=gen)
    b = torch.rand(2, 3, 16, 16, generator=gen)
    keep = torch.zeros(2, 16, 16)
    keep[:, :8] = 1
    expected_mse = ((a - b) * keep[:, None]).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(masked_mse(a, b, keep), expected_mse, atol=1e-7)
    assert torch.allclose(masked_psnr(a, b, keep), 10 * torch.log10(1 / expected_mse), atol=1e-4)
    # differences inside the edit region do not count
    c = b.clone()
    c[:, :, 8:] = a[:, :, 8:] + 0.5
    assert torch.allclose(masked_mse(a, c, keep), masked_mse(a, b, keep))
    assert torch.allclose(masked_ssim(a, c, keep), masked_ssim(a, b, keep))
    assert masked_ssim(a, a, keep).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        masked_mse(a, b[:, :, :8])


def test_unit_tensor():
    img = render(sb.make_cases(1)[0].source, 8)
    t = to_unit_tensor([img, img])
    assert t.shape == (2, 3, 8, 8) and 0 <= float(t.min()) and float(t.max()) <= 1


# ---------------------------------------------------------------------- configurations
def test_default_matrix_and_chosen_configurations():
    from pyinv.inversion import METHODS

    default = sb.matrix()
    labels = [c.label for c in default]
    assert len(default) == len(METHODS) + 4
    assert "edict + none" in labels and "null-text + p2p" in labels
    assert {"ddim + masactrl", "ddim + pnp", "direct + masactrl", "direct + pnp"} <= set(labels)
    assert [c.label for c in sb.matrix(["nti", "direct"], ["pnp", "none"])] == [
        "null-text + pnp",
        "null-text + none",
        "direct + pnp",
        "direct + none",
    ]
    # a method without control is left out of a control-only choice, refused when named
    assert "edict + p2p" not in [c.label for c in sb.matrix(None, ["p2p"])]
    with pytest.raises(PyinvError, match="takes no attention control"):
        sb.matrix(["edict"], ["p2p"])
    with pytest.raises(PyinvError, match="unknown method"):
        sb.matrix(["nope"], None)


def test_summary_and_tables():
    results = [
        sb.CaseResult("color-000", "color", "direct", "p2p", True, 30.0, 0.001, 0.9, 0.8, 0.5, 1.0),
        sb.CaseResult("shape-000", "shape", "direct", "p2p", False, math.inf, 0.0, 1.0, 0.6, math.nan, 3.0),
        sb.CaseResult("color-000", "color", "ddim", "none", False, 20.0, 0.01, 0.5, 0.0, math.nan, 2.0),
    ]
    rows = sb.summarize(results)
    assert [(r.method, r.control, r.cases) for r in rows] == [("direct", "p2p", 2), ("ddim", "none", 1)]
    first = rows[0]
    assert first.success == 0.5 and first.success_by_kind == {"color": 1.0, "shape": 0.0}
    assert first.psnr == 30.0  # the infinite PSNR of an untouched background is left out of the mean
    assert first.mse_e4 == pytest.approx(5.0) and first.iou == pytest.approx(0.7)
    assert first.centroid_shift == 0.5 and first.seconds == 2.0
    assert math.isnan(rows[1].centroid_shift)
    text = sb.table_lines(rows)
    assert len(text) == 4 and "success %" in text[0] and "–" in text[3]
    md = sb.markdown_lines(rows)
    assert md[0].startswith("| method | control |") and len(md) == 4
    assert all(line.count("|") == len(sb.COLUMNS) + 1 for line in md)


# ---------------------------------------------------------------------- training script
def _tiny_config(**changes):
    from pyinv.shapes.train import TrainConfig

    values = dict(steps=4, batch=2, warmup=2, channels=(16, 32, 32))
    values.update(changes)
    return TrainConfig(**values)


def test_training_resumes_exactly_and_exports_a_loadable_model(tmp_path):
    from pyinv.models import load_model
    from pyinv.shapes.train import CHECKPOINT, Trainer, scene_batch, train

    a = train(str(tmp_path / "a"), _tiny_config(), checkpoint_every=100, progress=False)
    train(str(tmp_path / "b"), _tiny_config(), progress=False, until=2)
    assert Trainer.load(str(tmp_path / "b")).step == 2
    b = train(str(tmp_path / "b"), _tiny_config(), progress=False)
    assert a.losses == b.losses and len(a.losses) == 4
    assert all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)
    for name in (CHECKPOINT, "config.json", "loss.png"):
        assert (tmp_path / "b" / name).is_file()
    with pytest.raises(ValueError, match="other settings"):
        train(str(tmp_path / "b"), _tiny_config(lr=1e-3, steps=6), progress=False)
    # batches are a function of the step alone
    x1, c1 = scene_batch(7, 3)
    x2, c2 = scene_batch(7, 3)
    assert torch.equal(x1, x2) and c1 == c2 and x1.shape == (3, 3, 32, 32)
    assert float(x1.min()) >= -1 and float(x1.max()) <= 1

    b.export(str(tmp_path / "model"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model" / "text_encoder" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
    model = load_model(str(tmp_path / "model"))
    assert model.vae is None and model.prediction_type == "v_prediction" and model.image_size == 32
    assert model.token_count("a purple triangle on a white background") == 7


def test_lr_schedule():
    cfg = _tiny_config(steps=100, warmup=10, lr=1e-3, final_lr_fraction=0.1)
    assert cfg.lr_at(0) == pytest.approx(1e-4) and cfg.lr_at(9) == pytest.approx(1e-3)
    assert cfg.lr_at(10) == pytest.approx(1e-3) and cfg.lr_at(100) == pytest.approx(1e-4)
    assert all(cfg.lr_at(s) >= cfg.lr_at(s + 1) for s in range(10, 100))
