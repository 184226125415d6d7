"""PIE-Bench: mask decoding, reading the data set, the metric models, the summary, and
``pyinv eval pie-bench`` end to end on the tiny model with tiny random metric models."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from conftest import make_test_image

from pyinv import cli
from pyinv.bench import pie_bench as pb
from pyinv.bench.pie_metrics import (
    ClipSimilarity,
    DinoStructure,
    Lpips,
    MetricUnavailable,
    PieMetrics,
    key_self_similarity,
    resize_shorter,
)
from pyinv.bench.shapes_bench import BenchConfig
from pyinv.control.p2p import P2P
from pyinv.errors import PyinvError

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing may try the network (hub ids must fail fast)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# ---------------------------------------------------------------------- fixtures
def _rect_rle(top: int, left: int, height: int, width: int, side: int = 512) -> list[int]:
    """Run-length code of a rectangle: one [start, length] pair per row."""
    return [v for r in range(top, top + height) for v in (r * side + left, width)]


ENTRIES = {
    "111000000000": {
        "image_path": "1_change_object_80/111000000000.jpg",
        "original_prompt": "a photo of a [cat] on a table",
        "editing_prompt": "a photo of a [dog] on a table",
        "editing_instruction": "make the cat a dog",
        "editing_type_id": "1",
        "blended_word": "cat dog",
        "mask": _rect_rle(100, 150, 200, 220),
    },
    "111000000001": {
        "image_path": "1_change_object_80/111000000001.png",
        "original_prompt": "a red [ball] in a field",
        "editing_prompt": "a red [cube] in a field",
        "editing_instruction": "turn the ball into a cube",
        "editing_type_id": "1",
        "blended_word": "ball cube",
        "mask": _rect_rle(200, 200, 100, 100),
    },
    "621000000000": {
        "image_path": "6_change_attribute_color_40/621000000000.png",
        "original_prompt": "a [red] car on a road",
        "editing_prompt": "a [blue] car on a road",
        "editing_instruction": "make the car blue",
        "editing_type_id": "6",
        "blended_word": "",
        "mask": _rect_rle(0, 0, 256, 512),
    },
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A three-image PIE-Bench-format set; the second image lies beside the mapping file
    (image_path relative to DIR), the others in annotation_images/ as PIE-Bench has them."""
    root = tmp_path_factory.mktemp("pie")
    for k, item in enumerate(ENTRIES.values()):
        folder = root if k == 1 else root / "annotation_images"
        path = folder / item["image_path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        make_test_image(48, seed=k).save(path, format="PNG")
    (root / "mapping_file.json").write_text(json.dumps(ENTRIES))
    return root


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, patch_size=8, image_size=224
    )
    folder = tmp_path_factory.mktemp("dino")
    ViTModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from pyinv.presets import write_tiny_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    write_tiny_tokenizer(str(folder))
    tok = CLIPTokenizer.from_pretrained(str(folder))
    pixels = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=pixels, tokenizer=tok).save_pretrained(folder)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32)
    torch.manual_seed(0)
    config = CLIPConfig(text_config={**text, **ids}, vision_config={**vision, "patch_size": 8}, projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def metrics(dino_dir, clip_dir):
    return PieMetrics.load(dino_dir, clip_dir, "squeeze")


# ---------------------------------------------------------------------- masks and data
def test_decode_mask_hand_made_cases():
    # 4x5: run [6, 3] is row 1, columns 1-3; run [13, 4] wraps from row 2 col 3 to row 3 col 1
    got = pb.decode_mask([6, 3, 13, 4], shape=(4, 5))
    want = np.array(
        [
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
            [1, 0, 0, 1, 1],
            [1, 1, 1, 1, 1],
        ],
        dtype=bool,
    )
    assert got.dtype == bool and np.array_equal(got, want)
    # an empty code leaves the one-pixel border only
    border = pb.decode_mask([], shape=(5, 6))
    assert border.sum() == 2 * 6 + 2 * 3 and not border[1:-1, 1:-1].any()
    # runs are cut at the end of the image; a start beyond it sets nothing
    tail = pb.decode_mask([7 * 7 - 2, 10, 100, 5], shape=(7, 7))
    assert tail.sum() == 4 * 7 - 4
    # a run in the interior of the 512x512 default
    big = pb.decode_mask([512 * 10 + 20, 5])
    assert big.shape == (512, 512)
    assert big[10, 20:25].all() and not big[10, 19] and not big[10, 25]
    assert big.sum() == 5 + 4 * 512 - 4
    for bad in ([3], [-1, 2], [1.5, 2]):
        with pytest.raises(PyinvError):
            pb.decode_mask(bad, shape=(4, 4))


def test_load_cases_reads_both_layouts_strips_prompts_and_filters(data_dir):
    cases = pb.load_cases(str(data_dir))
    assert [c.id for c in cases] == list(ENTRIES)
    first, second, third = cases
    assert first.source_prompt == "a photo of a cat on a table" and first.target_prompt == "a photo of a dog on a table"
    assert first.words == ("cat", "dog") and third.words is None
    assert first.file == str(data_dir / "annotation_images" / first.image_path)
    assert second.file == str(data_dir / second.image_path)
    assert first.mask()[100:300, 150:370].all() and not first.mask()[99, 200] and not first.mask()[100, 370]
    assert [c.id for c in pb.load_cases(str(data_dir), types=["6"])] == ["621000000000"]
    assert len(pb.load_cases(str(data_dir), limit=2)) == 2
    with pytest.raises(PyinvError, match="no entries of editing type"):
        pb.load_cases(str(data_dir), types=["9"])


def _mapping_with(tmp_path, mapping) -> str:
    (tmp_path / "mapping_file.json").write_text(mapping if isinstance(mapping, str) else json.dumps(mapping))
    return str(tmp_path)


def _entry(**changes):
    return {**ENTRIES["111000000000"], **changes}


@pytest.mark.parametrize(
    "mapping, message",
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "must be a non-empty object"),
        ({"1": {k: v for k, v in _entry().items() if k != "mask"}}, "has no 'mask'"),
        ({"1": _entry(editing_type_id="12")}, "editing_type_id must be one of 0-9"),
        ({"1": _entry(mask=[1, 2, 3])}, "pairs"),
        ({"1": _entry(image_path="../escape.png")}, "relative path inside"),
        ({"../1": _entry()}, "usable as a file name"),
        ({"1": _entry()}, "1 of 1 images not found"),
    ],
)
def test_malformed_data_gives_one_clear_error(tmp_path, mapping, message):
    with pytest.raises(PyinvError, match=message):
        pb.load_cases(_mapping_with(tmp_path, mapping))


def test_missing_folder_and_mapping_file(tmp_path):
    with pytest.raises(PyinvError, match="PIE-Bench folder not found"):
        pb.load_cases(str(tmp_path / "nope"))
    with pytest.raises(PyinvError, match="no mapping_file.json"):
        pb.load_cases(str(tmp_path))


def test_controllers_follow_pie_bench_settings(data_dir):
    with_words, _, without = pb.load_cases(str(data_dir))
    p2p = pb.controller_for("p2p", with_words)
    assert (p2p.edit, p2p.cross_replace, p2p.self_replace) == ("refine", 0.4, 0.6)
    assert p2p.reweight == {"dog": 2.0} and p2p.blend.source_words == ("cat",) and p2p.blend.target_words == ("dog",)
    plain = pb.controller_for("p2p", without)
    assert (plain.edit, plain.cross_replace, plain.self_replace) == ("refine", 0.4, 0.6)
    assert plain.reweight == {} and plain.blend is None
    assert pb.controller_for("none", without) is None
    with pytest.raises(PyinvError, match="both"):
        P2P.pie_bench("cat")
    assert [c.label for c in pb.matrix()] == ["direct + p2p"]
    assert [c.label for c in pb.matrix(["ddim"], ["p2p", "none"])] == ["ddim + p2p", "ddim + none"]
    cfg = BenchConfig("direct", "p2p")
    assert pb.output_path("out", cfg, with_words) == os.path.join(
        "out", "direct+p2p", "1_change_object_80", "111000000000.png"
    )


# ---------------------------------------------------------------------- metric models
def test_resize_and_key_self_similarity():
    x = torch.rand(1, 3, 512, 512)
    assert resize_shorter(x).shape[-2:] == (224, 224)
    assert resize_shorter(torch.rand(1, 3, 512, 1024)).shape[-2:] == (224, 448)
    assert resize_shorter(torch.rand(1, 3, 100, 1000)).shape[-2:] == (48, 480)
    keys = torch.randn(2, 7, 5, dtype=torch.float64)
    keys[0, 3] = 0.0  # a zero key: similarity 0, not nan
    sim = key_self_similarity(keys)
    i, j = 1, 4
    want = float(keys[1, i] @ keys[1, j] / (keys[1, i].norm() * keys[1, j].norm()))
    assert sim.shape == (2, 7, 7) and float(sim[1, i, j]) == pytest.approx(want)
    assert torch.allclose(sim[1].diagonal(), torch.ones(7, dtype=torch.float64))
    assert torch.isfinite(sim).all() and float(sim[0, 3].abs().max()) == 0.0


def test_dino_hooks_the_last_layers_keys(dino_dir):
    dino = DinoStructure.load(dino_dir)
    images = torch.rand(1, 3, 64, 64) * 255
    keys = dino.keys(images)
    assert keys.shape == (1, 1 + 28 * 28, 16)
    # the same keys by hand: the input of the last layer, its first layer norm, its key projection
    x = (resize_shorter(images) - dino.mean) / dino.std
    with torch.no_grad():
        hidden = dino.model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        last = dino.model.encoder.layer[-1] if hasattr(dino.model, "encoder") else dino.model.layers[-1]
        # transformers 5: attention.k_proj; 4.x: attention.attention.key
        key = last.attention.k_proj if hasattr(last.attention, "k_proj") else last.attention.attention.key
        want = key(last.layernorm_before(hidden))
    assert torch.allclose(keys, want, atol=1e-5)


def test_metrics_on_identical_and_changed_images(metrics):
    assert metrics.dino is not None and metrics.clip is not None
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)  # any size scores; the CLI uses 512
    mask = pb.decode_mask(_rect_rle(100, 100, 100, 100, side=256), shape=(256, 256))
    same = metrics.score(source, source.copy(), mask, "a red cat")
    assert same["structure"] == 0.0 and same["psnr"] == math.inf and same["mse"] == 0.0
    assert same["ssim"] == pytest.approx(1.0, abs=1e-6)
    changed = source.copy()
    changed[120:180, 120:180] = 255 - changed[120:180, 120:180]  # inside the edit region only
    inside = metrics.score(source, changed, mask, "a red cat")
    assert inside["structure"] > 0 and inside["psnr"] == math.inf and inside["mse"] == 0.0
    changed[5:20, 5:20] = 0  # now the background too
    outside = metrics.score(source, changed, mask, "a red cat")
    assert math.isfinite(outside["psnr"]) and outside["mse"] > 0 and outside["ssim"] < 1
    for key in ("clip_whole", "clip_edited"):
        assert 0.0 <= outside[key] <= 100.0
    assert outside["clip_whole"] != outside["clip_edited"]  # the edited part is the masked image
    everything = metrics.score(source, changed, np.ones((256, 256), bool), "a red cat")
    assert math.isnan(everything["psnr"]) and math.isnan(everything["ssim"])  # no background to compare


def test_lpips_without_torchvision_is_unavailable(metrics):
    if HAS_TORCHVISION:
        pytest.skip("torchvision is installed here")
    assert metrics.lpips is None and "torchvision" in metrics.unavailable["lpips"]
    assert metrics.score(*[np.zeros((64, 64, 3), np.uint8)] * 2, np.zeros((64, 64), bool), "a")["lpips"] is None


def test_unloadable_metric_models_are_unavailable_not_numbers(tmp_path):
    with pytest.raises(MetricUnavailable, match="folder not found"):
        DinoStructure.load(str(tmp_path / "missing"))
    with pytest.raises(MetricUnavailable, match="cannot load CLIP model"):
        ClipSimilarity.load("nobody/no-such-clip")  # offline: the hub cannot be asked
    with pytest.raises(MetricUnavailable, match="turned off"):
        Lpips.load("none")
    m = PieMetrics.load(str(tmp_path / "missing"), "none", "none")
    assert set(m.unavailable) == {"structure", "lpips", "clip_whole", "clip_edited"}
    assert m.unavailable["clip_whole"] == "turned off"
    scores = m.score(*[np.zeros((64, 64, 3), np.uint8)] * 2, pb.decode_mask([], shape=(64, 64)), "a")
    assert {k for k, v in scores.items() if v is None} == set(m.unavailable)
    assert scores["mse"] == 0.0


# ---------------------------------------------------------------------- summary
def test_summary_per_type_and_overall():
    def result(kind, psnr, error="", seconds=1.0, **kw):
        values = dict(structure=0.01, lpips=None, mse=0.002, ssim=0.9, clip_whole=25.0, clip_edited=20.0)
        return pb.PieResult(
            "x", "x.jpg", kind, "direct", "p2p", psnr=psnr, seconds=seconds, error=error, **values, **kw
        )

    results = [
        result("1", 20.0),
        result("1", 30.0, seconds=3.0),
        result("6", math.inf, seconds=math.nan, resumed=True),
        pb.PieResult("y", "y.jpg", "6", "direct", "p2p", error="blend word 'x' is not in the prompt"),
    ]
    rows = pb.summarize(results)
    assert [(r.editing_type, r.images, r.failed) for r in rows] == [("1", 2, 0), ("6", 2, 1), ("all", 4, 1)]
    one, six, total = rows
    assert one.psnr == 25.0 and one.structure == pytest.approx(10.0) and one.mse == pytest.approx(20.0)
    assert one.ssim == pytest.approx(90.0) and one.clip_whole == 25.0 and one.seconds == 2.0
    assert math.isnan(six.psnr)  # an untouched background (inf) and a failed edit leave no finite value
    assert total.lpips is None and total.psnr == 25.0 and total.seconds == 2.0
    text = pb.table_lines(rows)
    assert len(text) == 5 and "6 change colour" in text[3] and "n/a" in text[4] and "–" in text[3]
    notes = pb.notes(results, {"lpips": "torchvision is not installed"})
    assert notes[0] == "n/a: lpips unavailable: torchvision is not installed"
    assert any("1 edit(s) failed" in n for n in notes) and any("read back" in n for n in notes)
    md = pb.markdown_lines(rows, notes)
    assert md[0].startswith("| method | control | editing type |")
    assert all(line.count("|") == len(pb.HEAD) + 1 for line in md[:5]) and md[-1].startswith("- ")


def test_a_failing_edit_is_recorded_and_the_run_goes_on(editor, data_dir, tmp_path):
    good, _, _ = pb.load_cases(str(data_dir))
    from dataclasses import replace

    bad = replace(good, id="bad", words=("horse", "dog"))  # "horse" is not in the source prompt
    results = pb.run_pie_bench(
        [bad, good], [BenchConfig("ddim", "p2p")], PieMetrics(), str(tmp_path), lambda: editor, steps=2, progress=False
    )
    assert [r.id for r in results] == ["bad", good.id]
    assert "horse" in results[0].error and math.isnan(results[0].psnr)
    assert results[1].error == "" and math.isfinite(results[1].mse) and results[1].edit_side == 32
    assert results[1].structure is None  # no DINO model given
    assert sorted(p.name for p in (tmp_path / "ddim+p2p").rglob("*.png")) == [f"{good.id}.png"]

    def no_model():
        raise AssertionError("the diffusion model was loaded although every edit exists")

    resumed = pb.run_pie_bench(
        [good], [BenchConfig("ddim", "p2p")], PieMetrics(), str(tmp_path), no_model, progress=False
    )
    assert resumed[0].resumed and resumed[0].mse == results[1].mse


# ---------------------------------------------------------------------- the command
def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_cli_runs_scores_and_resumes(data_dir, dino_dir, clip_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "edits"
    report = tmp_path / "pie.json"
    base = ["eval", "pie-bench", "--data", str(data_dir), "--model", "tiny", "--steps", "3", "--out", str(out), "-q"]
    code = cli.main(
        base + ["--dino", dino_dir, "--clip", clip_dir, "--json", str(report), "--markdown", str(tmp_path / "pie.md")]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    rows = _read_csv(out / "scores.csv")
    assert list(rows[0]) == list(pb.CSV_COLUMNS)
    assert [r["id"] for r in rows] == list(ENTRIES) and {r["editing_type"] for r in rows} == {"1", "6"}
    assert all(r["method"] == "direct" and r["control"] == "p2p" and r["error"] == "" for r in rows)
    for r in rows:
        for key in ("structure", "psnr", "mse", "ssim", "clip_whole", "clip_edited", "seconds"):
            assert math.isfinite(float(r[key])), (key, r[key])
        assert r["resumed"] == "False" and r["edit_side"] == "32"
        if not HAS_TORCHVISION:
            assert r["lpips"] == "n/a"
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 3 and all(p.is_relative_to(out / "direct+p2p") for p in pngs)
    summary = json.loads(report.read_text())
    assert summary["benchmark"] == "pie-bench" and summary["device"] == "cpu" and "versions" in summary
    assert [(s["editing_type"], s["images"]) for s in summary["summary"]] == [("1", 2), ("6", 1), ("all", 3)]
    assert all(math.isfinite(s["psnr"]) and math.isfinite(s["clip_whole"]) for s in summary["summary"])
    assert len(summary["edits"]) == 3
    if not HAS_TORCHVISION:
        assert "torchvision" in summary["unavailable"]["lpips"]
        assert all(s["lpips"] is None for s in summary["summary"])
        assert "n/a: lpips unavailable: torchvision" in printed.out
    assert "1 change object" in printed.out and "6 change colour" in printed.out and "all" in printed.out
    assert (tmp_path / "pie.md").read_text().startswith("| method |")

    # second run with one edit removed: only that one is inverted and edited again, the others
    # are scored from their files; metric models that cannot be loaded give n/a, not numbers
    from pyinv.api import Editor

    calls = {"invert": 0, "edit": 0}
    for name in calls:
        real = getattr(Editor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(Editor, name, counted)
    pngs[0].unlink()
    mtimes = [p.stat().st_mtime_ns for p in pngs[1:]]
    code = cli.main(
        base + ["--dino", str(tmp_path / "no-dino"), "--clip", "none", "--csv", str(tmp_path / "again.csv")]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert calls == {"invert": 1, "edit": 1} and pngs[0].is_file()
    assert [p.stat().st_mtime_ns for p in pngs[1:]] == mtimes
    again = {r["image"]: r for r in _read_csv(tmp_path / "again.csv")}
    redone = str(pngs[0].relative_to(out / "direct+p2p").with_suffix(""))
    for r in rows:
        r2 = again[r["image"]]
        fresh = os.path.splitext(r["image"])[0] == redone
        assert r2["resumed"] == str(not fresh) and math.isfinite(float(r2["seconds"])) == fresh
        assert all(r2[k] == "n/a" for k in ("structure", "clip_whole", "clip_edited"))
        if not fresh:
            assert (r2["psnr"], r2["mse"], r2["ssim"]) == (r["psnr"], r["mse"], r["ssim"])
    assert "folder not found" in printed.out and "turned off" in printed.out


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: str(d / "missing"), "PIE-Bench folder not found"),
        (lambda d: str(d), "no mapping_file.json"),
        (lambda d: _mapping_with(d, "{oops"), "not valid JSON"),
    ],
)
def test_bad_data_is_one_line_error(tmp_path, capsys, setup, message):
    code = cli.main(["eval", "pie-bench", "--data", setup(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("pyinv: error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
