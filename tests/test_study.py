"""experiments/study.py: the aggregation and the verdicts against hand computations, the charts
on fake numbers (a curve only with two data sizes or more), and a smoke run of the whole pipeline
(2 configs x 1 seed x 3 steps) including a re-run that must re-use the finished runs
(train.py --resume auto) instead of training them again; experiments/compare_runs.py's chart."""
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
    assert s["ci95"] == pytest.approx(4.303 / math.sqrt(3))  # t(0.975, 2 dof) * std / sqrt(n)
    s = study.summarize([0.2, 0.5, 0.5, 0.9])
    mean = (0.2 + 0.5 + 0.5 + 0.9) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in (0.2, 0.5, 0.5, 0.9)) / 3)
    assert s["mean"] == pytest.approx(mean) and s["std"] == pytest.approx(std)
    assert s["ci95"] == pytest.approx(3.182 * std / 2)
    one = study.summarize([0.7])
    assert one["std"] == 0.0 and one["ci95"] == math.inf  # one seed: no interval, not NaN


def _configs(values):
    """{run id: [top1 per seed]} -> the aggregate structure study.main builds."""
    runs = {run_id: [{"seed": s, "top1": v, "top5": v, "colour": 1.0, "shape": v}
                     for s, v in enumerate(vals)] for run_id, vals in values.items()}
    return study.aggregate(runs)


def test_claims_use_the_interval_of_paired_differences():
    # differences +0.10, +0.12, +0.11: interval well above 0
    configs = _configs({"clip-all": [0.25, 0.5, 0.375], "mvs-all": [0.35, 0.62, 0.485],
                        "flip-all": [0.5, 0.25, 0.375]})
    c = study.check_claim(configs, "top1", "mvs-all", "clip-all", +1, "MVS > CLIP")
    assert c["diff"]["mean"] == pytest.approx(0.11)
    assert c["verdict"].startswith("holds") and c["seeds_agreeing"] == 3
    c = study.check_claim(configs, "top1", "clip-all", "mvs-all", +1, "the other way")
    assert c["verdict"].startswith("reversed")
    # +0.25, -0.25, 0: every seed says something different, the mean says nothing
    c = study.check_claim(configs, "top1", "flip-all", "clip-all", -1, "FLIP < CLIP")
    assert c["verdict"].startswith("inside the noise")
    # all three seeds agree but the spread is large: 3 agreeing seeds are not enough
    configs = _configs({"a-all": [0.30, 0.50, 0.21], "b-all": [0.29, 0.20, 0.20]})
    c = study.check_claim(configs, "top1", "a-all", "b-all", +1, "a > b")
    assert c["seeds_agreeing"] == 3 and c["verdict"].startswith("inside the noise")
    # runs are matched by their seed, not by their position in the list
    runs = configs["a-all"]["runs"]
    assert study.paired(runs, runs[::-1], "top1") == [0, 0, 0]


def test_plan_shares_runs_and_names_claims():
    args = study.get_args(["--configs", "clip,declip,flip,clip_vit", "--sizes", "500,all",
                           "--table4-size", "500"])
    groups = study.plan(args)
    assert groups["table4"] == ["clip-500", "declip-500"]
    assert groups["curve"] == ["clip-500", "clip-all", "declip-500", "declip-all"]
    assert groups["fig3"] == ["clip_vit-all", "flip-all"]
    claims = study.claims_of(args, groups)
    assert ("top1", "declip-500", "clip-500", 1, "Table 4: DeCLIP +6.6 pts over CLIP") in claims
    assert ("top1", "flip-all", "clip_vit-all", -1, "Fig. 3: FLIP below CLIP") in claims
    assert [c[0] for c in claims if c[1] == "declip-all"] == ["top1", "colour"]
    assert "views" not in groups and "textpass" not in groups  # only when --configs asks


def test_views_group_splits_declip_into_its_views_and_its_losses():
    args = study.get_args(["--configs", "clip,clip_dview,declip", "--sizes", "2000"])
    groups = study.plan(args)
    assert groups["views"] == ["clip-2000", "clip_dview-2000", "declip-2000"]
    assert "clip_dview" not in study.DEFAULT_CONFIGS
    assert study.CONFIGS["clip_dview"][1][-2:] == ["--image-aug", "declip"]
    claims = study.claims_of(args, groups)
    assert ("top1", "clip_dview-2000", "clip-2000", 1,
            "(ours) DeCLIP's views alone beat CLIP's crop") in claims
    assert ("top1", "declip-2000", "clip_dview-2000", 1,
            "(ours) DeCLIP's losses beat CLIP on the same views") in claims


def test_tome_r_merges_about_half():
    r = study.tome_r_for_half(65, 3)
    import tome
    left = tome.remaining_tokens(65, [r] * 3)[-1]
    assert left <= 33 < tome.remaining_tokens(65, [r - 1] * 3)[-1]  # smallest such r


def test_chart_bars_follow_the_numbers(tmp_path):
    configs = _configs({"clip-all": [0.20, 0.20], "mvs-all": [0.35, 0.45]})
    groups = [("fake group", [configs["clip-all"], configs["mvs-all"]])]
    path = tmp_path / "chart.png"
    rects = study.draw_chart(groups, path, note="fake")
    img = Image.open(path).convert("RGB")
    assert img.size[0] == 1300
    (a0, a1, a2, a3), (b0, b1, b2, b3) = rects[(0, "top1", "CLIP")], rects[(0, "top1", "+MVS")]
    assert a3 == b3  # same baseline
    assert (b3 - b1) / (a3 - a1) == pytest.approx(0.40 / 0.20, rel=0.03)  # height ~ mean
    assert img.getpixel((a0 + 4, (a1 + a3) // 2)) == study.BAR
    x0, y0, x1, y1 = rects[(0, "shape", "+MVS")]
    assert img.getpixel((x0 + 4, (y0 + y1) // 2)) == study.BAR_SHAPE


def test_curve_points_follow_the_numbers(tmp_path):
    configs = _configs({"clip-500": [0.2, 0.2], "clip-all": [0.6, 0.6],
                        "declip-500": [0.4, 0.4], "declip-all": [0.6, 0.6]})
    points = study.draw_curve(configs, list(configs), tmp_path / "curve.png")
    assert points[("clip", 500)][0] < points[("clip", None)][0]  # unlimited on the right
    assert points[("declip", 500)][1] < points[("clip", 500)][1]  # higher top-1 = higher up
    assert points[("declip", None)][1] == pytest.approx(points[("clip", None)][1])
    assert Image.open(tmp_path / "curve.png").size == (760, 460)


def test_a_curve_needs_two_data_sizes(tmp_path):
    configs = _configs({"clip-2000": [0.2, 0.3], "clip_dview-2000": [0.3, 0.4],
                        "declip-2000": [0.4, 0.5], "clip-all": [0.6, 0.6],
                        "declip-all": [0.5, 0.7]})
    # one size, its runs already bars of another row: no curve, no extra row
    groups = {"views": ["clip-2000", "clip_dview-2000", "declip-2000"],
              "curve": ["clip-2000", "declip-2000"]}
    assert study.draw_figures(groups, configs, str(tmp_path), "") == ["study.png"]
    assert not (tmp_path / "curve.png").exists()
    assert Image.open(tmp_path / "study.png").height == 40 + 340 + 24  # one row
    # one size that no other row shows: a bar row instead of a one-point curve
    groups = {"views": groups["views"], "curve": ["clip-all", "declip-all"]}
    assert study.draw_figures(groups, configs, str(tmp_path), "") == ["study.png"]
    assert Image.open(tmp_path / "study.png").height == 40 + 2 * 340 + 24
    # two sizes: the curve
    groups = {"curve": ["clip-2000", "clip-all", "declip-2000", "declip-all"]}
    assert study.draw_figures(groups, configs, str(tmp_path), "") == ["curve.png"]


def test_smoke_study_and_rerun_reuses_runs(tmp_path):
    common = ["--quick", "--out", str(tmp_path), "--configs", "clip,declip", "--workers", "0"]
    report = study.main(common)
    for name in ("study.md", "study.json", "study.png", "curve.png", "nn_pairs.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "study.json").read_text())
    assert {"command", "settings", "groups", "configs", "claims", "nn_pairs",
            "wall_seconds"} <= set(saved)
    assert set(saved["configs"]) == {"clip-64", "declip-64", "clip-all", "declip-all"}
    assert len(os.listdir(tmp_path / "runs")) == 4  # Table 4's two runs are the curve's too
    for c in saved["configs"].values():
        assert {"label", "runs", "top1", "top5", "colour", "shape"} <= set(c)
        assert c["top1"]["n"] == 1
    assert saved["groups"]["table4"] == ["clip-64", "declip-64"]
    assert [(c["metric"], c["a"]) for c in saved["claims"]] == [
        ("top1", "declip-64"), ("top1", "declip-64"), ("top1", "declip-all"),
        ("colour", "declip-64"), ("colour", "declip-all")]
    md = (tmp_path / "study.md").read_text()
    assert "| CLIP |" in md and "DeCLIP" in md and "95% confidence interval" in md
    # a re-run re-evaluates the finished checkpoints: same accuracy, no training
    again = study.main(common)
    for run_id in ("clip-64", "declip-all"):
        first, second = report["configs"][run_id]["runs"][0], again["configs"][run_id]["runs"][0]
        assert second["resumed"] and not first["resumed"]
        assert second["top1"] == first["top1"]
        assert second["train_seconds"] == pytest.approx(first["train_seconds"])
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


def test_regime_map_reads_finished_studies_and_gives_each_regime_its_verdict(tmp_path):
    """Two fake studies at 2,000 pairs: at batch 64 DeCLIP is behind CLIP on every seed
    (reversed), at batch 256 ahead (holds); the map has one row each, with those verdicts."""
    def write(folder, batch, steps, clip, dview, declip):
        configs = _configs({"clip-2000": clip, "clip_dview-2000": dview, "declip-2000": declip})
        folder.mkdir()
        settings = {"batch_size": batch, "steps": steps, "table4_size": 2000, "seeds": [0, 1, 2]}
        (folder / "study.json").write_text(json.dumps({"settings": settings, "configs": configs}))
    write(tmp_path / "b64", 64, 2000, [0.90, 0.92, 0.91], [0.20, 0.22, 0.18], [0.27, 0.30, 0.25])
    write(tmp_path / "b256", 256, 500, [0.55, 0.50, 0.54], [0.84, 0.58, 0.78], [0.91, 0.68, 0.92])
    rows = study.main(["--regimes", f"{tmp_path / 'b64'},{tmp_path / 'b256'}",
                       "--out", str(tmp_path)])
    assert [(r["batch"], r["samples"]) for r in rows] == [(64, 128000), (256, 128000)]
    low, high = (r["claims"]["DeCLIP - CLIP"] for r in rows)
    assert low["verdict"].startswith("reversed")
    assert low["diff"]["mean"] == pytest.approx((-0.63 - 0.62 - 0.66) / 3)
    assert high["verdict"].startswith("holds")
    assert high["diff"]["mean"] == pytest.approx((0.36 + 0.18 + 0.38) / 3)
    text = (tmp_path / "regimes.md").read_text()
    assert "| 64 x 2,000 (128,000), 2,000 |" in text and "reversed (0/3 seeds agree)" in text


def test_compare_runs_draws_one_line_per_run(tmp_path):
    """experiments/compare_runs.py: a line per run folder, named by its args.json, drawn from the
    evaluations in its log.jsonl (training records are skipped)."""
    import compare_runs
    for name, method, top1 in (("a", "declip", (0.3, 0.9)), ("b", "clip", (0.6, 0.5))):
        run = tmp_path / name
        run.mkdir()
        (run / "args.json").write_text(json.dumps({"method": method, "seed": 0}))
        records = [{"step": 10, "total": 1.0}] + [{"step": 150 * (k + 1), "zeroshot": {"top1": v}}
                                                  for k, v in enumerate(top1)]
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert compare_runs.evaluations(tmp_path / "a") == [(150, 0.3), (300, 0.9)]
    assert compare_runs.label(tmp_path / "b") == "CLIP, seed 0"
    out = tmp_path / "c.png"
    compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert Image.open(out).size == (760, 440)
