"""study.py: the aggregation and the verdicts against hand computations, the chart on fake
numbers, and a smoke run of the whole pipeline (2 configs x 1 seed x 3 steps) including a re-run
that must re-use the finished runs (train.py --resume auto) instead of training them again."""
import json
import os
import math

import pytest
from PIL import Image

import study


def test_summarize_matches_hand_computation():
    s = study.summarize([1, 2, 3])
    assert s["mean"] == 2 and s["min"] == 1 and s["max"] == 3 and s["n"] == 3
    assert s["std"] == pytest.approx(1.0)  # sample std: sqrt(((1-2)^2 + 0 + (3-2)^2) / 2)
    s = study.summarize([0.2, 0.5, 0.5, 0.9])
    mean = (0.2 + 0.5 + 0.5 + 0.9) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in (0.2, 0.5, 0.5, 0.9)) / 3)
    assert s["mean"] == pytest.approx(mean) and s["std"] == pytest.approx(std)
    assert study.summarize([0.7])["std"] == 0.0  # one seed: no spread, not NaN


def _configs(values):
    """{name: [top1 per seed]} -> the aggregate structure study.main builds."""
    runs = {name: [{"seed": s, "top1": v, "top5": v, "samples_per_s": 100 * (1 + v)}
                   for s, v in enumerate(vals)] for name, vals in values.items()}
    return study.aggregate(runs)


def test_claims_are_paired_by_seed():
    # binary fractions, so differences are exact and a zero mean is exactly zero
    configs = _configs({"clip": [0.25, 0.5, 0.375], "mvs": [0.3125, 0.5, 0.5],
                        "flip": [0.5, 0.25, 0.375]})
    c = study.check_claim(configs, "top1", "mvs", "clip", +1, "MVS > CLIP")
    assert c["diff"]["mean"] == pytest.approx((0.0625 + 0 + 0.125) / 3)
    assert c["seeds_agreeing"] == 2 and c["verdict"].startswith("holds on average only")
    configs["mvs"]["runs"][1]["top1"] = 0.5625
    c = study.check_claim(configs, "top1", "mvs", "clip", +1, "MVS > CLIP")
    assert c["seeds_agreeing"] == 3 and c["verdict"].startswith("holds (every seed)")
    # paper: FLIP < CLIP; here +0.25, -0.25, 0: mean 0, one seed each way
    c = study.check_claim(configs, "top1", "flip", "clip", -1, "FLIP < CLIP")
    assert c["seeds_agreeing"] == 1 and c["verdict"].startswith("no difference")
    c = study.check_claim(configs, "top1", "clip", "mvs", +1, "reversed")
    assert c["verdict"].startswith("does NOT hold")
    # runs are matched by their seed, not by their position in the list
    assert study.paired(configs["mvs"]["runs"], configs["clip"]["runs"][::-1], "top1")[0] == \
        pytest.approx([0.0625, 0.0625, 0.125])


def test_tome_r_merges_about_half():
    r = study.tome_r_for_half(65, 3)
    import tome
    left = tome.remaining_tokens(65, [r] * 3)[-1]
    assert left <= 33 < tome.remaining_tokens(65, [r - 1] * 3)[-1]  # smallest such r


def test_chart_bars_follow_the_numbers(tmp_path):
    configs = _configs({"clip": [0.20, 0.20], "mvs": [0.35, 0.45]})
    groups = [("fake group", [configs["clip"], configs["mvs"]])]
    path = tmp_path / "chart.png"
    rects = study.draw_chart(groups, path, note="fake")
    img = Image.open(path).convert("RGB")
    assert img.size[0] == 1300
    (a0, a1, a2, a3), (b0, b1, b2, b3) = rects[(0, "top1", "CLIP")], rects[(0, "top1", "+MVS")]
    assert a3 == b3  # same baseline
    assert (b3 - b1) / (a3 - a1) == pytest.approx(0.40 / 0.20, rel=0.03)  # height ~ mean
    for x0, y0, x1, y1 in (rects[(0, "top1", "CLIP")], rects[(0, "samples_per_s", "+MVS")]):
        colour = img.getpixel(((x0 + 4), (y0 + y1) // 2))
        assert colour in (study.BAR, study.BAR_SPS)
    assert img.getpixel((a0 + 4, (a1 + a3) // 2)) == study.BAR
    # samples/s: 120 and 140 -> heights in that ratio
    (_, s1, _, s3), (_, t1, _, t3) = (rects[(0, "samples_per_s", "CLIP")],
                                      rects[(0, "samples_per_s", "+MVS")])
    assert (t3 - t1) / (s3 - s1) == pytest.approx(140 / 120, rel=0.03)


def test_smoke_study_and_rerun_reuses_runs(tmp_path):
    common = ["--out", str(tmp_path), "--configs", "clip,declip", "--seeds", "1", "--batch-size",
              "8", "--eval-size", "20", "--workers", "0", "--nn-captions", "64"]
    argv = common + ["--steps", "3"]
    report = study.main(argv)
    for name in ("study.md", "study.json", "study.png", "nn_pairs.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "study.json").read_text())
    assert {"command", "settings", "groups", "configs", "claims", "nn_pairs",
            "wall_seconds"} <= set(saved)
    assert set(saved["configs"]) == {"clip", "declip"}
    for c in saved["configs"].values():
        assert {"label", "runs", "top1", "top5", "samples_per_s"} <= set(c)
        assert {"mean", "std", "min", "max", "n"} <= set(c["top1"]) and c["top1"]["n"] == 1
        assert c["samples_per_s"]["mean"] > 0
    assert saved["groups"]["fig3"] == ["clip"] and saved["groups"]["table4"] == ["clip", "declip"]
    assert [c["a"] for c in saved["claims"]] == ["declip"]  # the one pair both configs allow
    md = (tmp_path / "study.md").read_text()
    assert "| CLIP |" in md and "DeCLIP" in md and "std over seeds" in md
    # a re-run re-evaluates the finished checkpoints: same accuracy, no training, speed kept
    again = study.main(argv)
    for name in ("clip", "declip"):
        first, second = report["configs"][name]["runs"][0], again["configs"][name]["runs"][0]
        assert second["resumed"] and not first["resumed"]
        assert second["top1"] == first["top1"]
        for key in ("samples_per_s", "samples_per_s_whole_run", "train_seconds"):
            assert second[key] == pytest.approx(first[key]) and first[key] > 0
    # another budget in the same folder is refused instead of silently continuing the run
    with pytest.raises(SystemExit, match="delete the folder"):
        study.main(common + ["--steps", "4"])


def test_lock_refuses_a_second_study_and_clears_a_dead_ones(tmp_path):
    path = study.lock(str(tmp_path))
    with pytest.raises(SystemExit, match="already writing"):
        study.lock(str(tmp_path))  # this very process holds it
    with open(path, "w") as f:
        f.write("999999999")  # no such process: a study that was killed
    assert study.lock(str(tmp_path)) == path
    with open(path) as f:
        assert int(f.read()) == os.getpid()
