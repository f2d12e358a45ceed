"""train.py end to end: exact resume, torchrun with a killed worker, non-finite steps, errors.

Runs are tiny (tiny model, batch 8, a handful of steps) so the file takes well under a minute.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "8", "--eval-size", "20", "--workers", "0", "--warmup", "2",
        "--log-every", "1", "--queue-size", "64"]


def run_script(args, launcher=(sys.executable,), check=True, script="train.py", **env):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
    # a process group of its own, so that on a time-out torchrun's workers are killed with it
    proc = subprocess.Popen([*launcher, os.path.join(REPO, script), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_at_step(step, tmp_path):
    """run_script's arguments that SIGKILL the last rank once, as it starts step `step` (from 0;
    tests/kill_at_step.py: train.py has no crash flag)."""
    return dict(script=os.path.join("tests", "kill_at_step.py"), KILL_AT_STEP=str(step),
                KILL_MARKER=str(tmp_path / "killed"))


def weights(out_dir):
    """A checkpoint, loaded as --resume loads it: plain types and tensors only."""
    return torch.load(os.path.join(out_dir, "checkpoint.pt"), map_location="cpu",
                      weights_only=True)


def assert_identical(ckpt_a, ckpt_b):
    assert ckpt_a["step"] == ckpt_b["step"]
    sd_a, sd_b = ckpt_a["model"], ckpt_b["model"]
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), f"{k} differs"
    state_a, state_b = ckpt_a["optimizer"]["state"], ckpt_b["optimizer"]["state"]
    for i in state_a:
        assert torch.equal(state_a[i]["exp_avg"], state_b[i]["exp_avg"])


def test_resume_is_bit_exact(tmp_path):
    """Killed (SIGKILL) in step 4, after the step-2 checkpoint, then resumed == uninterrupted, bit
    for bit (CPU). 24 pairs make 3 steps an epoch, so the run crosses an epoch boundary inside one data
    loader whose worker lives for the whole run."""
    common = TINY + ["--steps", "5", "--save-every", "2", "--train-size", "24", "--workers", "1"]
    run_script(common + ["--output", str(tmp_path / "a")])
    crashed = run_script(common + ["--output", str(tmp_path / "b")], check=False,
                         **kill_at_step(3, tmp_path))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert weights(tmp_path / "b")["step"] == 2
    resumed = run_script(common + ["--output", str(tmp_path / "b"), "--resume", "auto"])
    assert "resumed at step 2" in resumed.stdout
    assert_identical(weights(tmp_path / "a"), weights(tmp_path / "b"))
    # the queue travelled with the checkpoint
    assert int(weights(tmp_path / "b")["model"]["queue.filled"]) == 5 * 8


def test_torchrun_two_workers_survive_a_killed_worker(tmp_path):
    """torchrun --max-restarts=1: rank 1 is killed in step 4, the group restarts from the step-2
    checkpoint with --resume auto, and ends exactly where an uninterrupted 2-process run ends."""
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--max-restarts=1", "--standalone")
    common = TINY + ["--steps", "4", "--save-every", "2", "--resume", "auto"]
    run_script(common + ["--output", str(tmp_path / "a")], launcher)
    faulty = run_script(common + ["--output", str(tmp_path / "b")], launcher,
                        **kill_at_step(3, tmp_path))
    assert os.path.exists(tmp_path / "killed")
    assert "resumed at step 2" in faulty.stdout
    assert "zero-shot top-1" in faulty.stdout
    assert_identical(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_non_finite_steps_are_skipped_then_abort(tmp_path, monkeypatch):
    """NaN images: the loss, the gradients, SimSiam's BatchNorm statistics and the text features
    of the step would all be corrupt; none of it may reach the weights, the NN queue or the
    checkpoint."""
    import declip
    forward = declip.DeCLIP.forward

    def nan_forward(self, img_view1, *a, **k):
        return forward(self, img_view1 * float("nan"), *a, **k)

    monkeypatch.setattr(declip.DeCLIP, "forward", nan_forward)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="non-finite steps in a row"):
        train.main(TINY + ["--steps", "10", "--save-every", "2", "--max-bad-steps", "3",
                           "--output", str(out)])
    ckpt = weights(out)  # written before the abort: skipped steps leave the weights untouched
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert int(ckpt["model"]["queue.filled"]) == 0  # nothing pushed from a skipped step
    assert torch.equal(ckpt["model"]["projector.1.running_var"], torch.ones(1024))


def test_clip_method_trains_and_evaluates_and_logs_plain_lines(tmp_path, capsys):
    """Under pytest stdout is not a terminal (as under SLURM): a plain line every --log-every
    step on rank 0, with the loss terms, lr, samples/s and ETA."""
    result = train.main(TINY + ["--method", "clip", "--steps", "3", "--output", str(tmp_path)])
    assert set(result) >= {"top1", "top5"} and 0.0 <= result["top1"] <= result["top5"] <= 1.0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]
    fields = lines[0].split(" | ")
    assert fields[1].startswith("total ") and " clip " in fields[1] and "mvs" not in fields[1]
    assert fields[2].startswith("lr ") and fields[3].endswith(" samples/s")
    assert fields[4].startswith("ETA 0:") and lines[-1].endswith("ETA 0:00:00")
    ckpt = weights(tmp_path)
    assert ckpt["step"] == 3 and ckpt["merges"] is not None
    assert not any(k.startswith(("projector", "queue", "mlm_head")) for k in ckpt["model"])


@pytest.mark.parametrize("argv, message", [
    (["--data", "cc3m", "--data-root", "/nonexistent"], "img2dataset"),
    (["--resume", "/nonexistent/ckpt.pt"], "no such file"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
    (["--patch-dropout", "1.5"], None),
    (["--batch-size", "0"], None),
])
def test_bad_input_gives_one_line_errors(tmp_path, argv, message):
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--steps", "1", "--output", str(tmp_path)] + argv)
    if message is not None:
        assert message in str(e.value) and "\n" not in str(e.value)


def test_resume_refuses_broken_or_foreign_checkpoints(tmp_path):
    train.main(TINY + ["--method", "clip", "--steps", "1", "--output", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="exists: pass --resume auto"):  # never overwritten
        train.main(TINY + ["--steps", "1", "--output", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="another architecture"):
        train.main(TINY + ["--method", "clip", "--steps", "2", "--image-size", "32",
                           "--output", str(tmp_path / "a"), "--resume", "auto"])
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="unreadable checkpoint"):
        train.main(TINY + ["--steps", "1", "--output", str(tmp_path / "c"),
                           "--resume", str(broken)])


def test_train_size_and_data_seed_pick_the_builtin_pairs(tmp_path):
    args = train.get_args(["--train-size", "100", "--data-seed", "3"])
    base = train.build_base(args)
    assert len(base) == 100 and base.seed == 3
    assert train.get_args(["--seed", "5"]).data_seed == 5  # --seed reaches the data by default
    assert len(train.build_base(train.get_args([]))) == 2000  # the demo's data-limited set
    assert len(train.build_base(train.get_args(["--train-size", "0"]))) == 1_000_000  # all
    # epochs over 32 unique pairs at batch 8: 4 steps an epoch
    result = train.main(TINY + ["--method", "clip", "--train-size", "32", "--epochs", "2",
                                "--output", str(tmp_path)])
    assert weights(tmp_path)["step"] == 8
    assert {"colour", "shape"} <= set(result)  # the built-in eval reports both factors
    with pytest.raises(SystemExit):
        train.get_args(["--data", "my.tsv", "--train-size", "10"])


def test_default_queue_holds_the_last_tenth_of_the_run(tmp_path):
    assert train.default_queue_size(1000, 64) == 100 * 64
    assert train.default_queue_size(5, 8) == 8  # at least one batch
    assert train.default_queue_size(10 ** 6, 1024) == 65536  # the paper's length at scale
    # and at most a quarter of the training pairs, so a caption rarely meets its own last feature
    assert train.default_queue_size(1000, 64, n_train=2000) == 500
    assert train.default_queue_size(1000, 64, n_train=10 ** 6) == 100 * 64
    no_size = TINY[:TINY.index("--queue-size")] + TINY[TINY.index("--queue-size") + 2:]
    train.main(no_size + ["--method", "declip", "--train-size", "16", "--steps", "1",
                          "--output", str(tmp_path)])
    assert weights(tmp_path)["model"]["queue.feats"].shape[0] == 4  # 16 pairs // 4, not a batch


def test_siglip_initial_scale_and_bias(tmp_path):
    """SigLIP's bias starts at -log(global batch) unless given; both flags reach the model."""
    import math
    train.main(TINY + ["--method", "clip", "--loss", "siglip", "--steps", "1", "--lr", "1e-9",
                       "--output", str(tmp_path / "a")])
    sd = weights(tmp_path / "a")["model"]
    assert float(sd["logit_bias"]) == pytest.approx(-math.log(8), abs=1e-4)
    assert float(sd["clip.logit_scale"]) == pytest.approx(math.log(10), abs=1e-4)
    train.main(TINY + ["--method", "clip", "--loss", "siglip", "--steps", "1", "--lr", "1e-9",
                       "--logit-bias-init", "-10", "--logit-scale-init", "5",
                       "--output", str(tmp_path / "b")])
    sd = weights(tmp_path / "b")["model"]
    assert float(sd["logit_bias"]) == pytest.approx(-10, abs=1e-4)
    assert float(sd["clip.logit_scale"]) == pytest.approx(math.log(5), abs=1e-4)


def test_siglip_learns_colour_at_batch_64(tmp_path):
    """The SigLIP paper's b = -10 suits its 32k batch; at batch 64 it collapsed (colour ~25%).
    With the default b = -log(64), 300 steps learn colour. 32 px keeps this test short."""
    result = train.main(["--method", "clip", "--loss", "siglip", "--steps", "300",
                         "--batch-size", "64", "--image-size", "32", "--workers", "1",
                         "--eval-size", "210", "--log-every", "100", "--output", str(tmp_path)])
    assert result["colour"] >= 0.9, result


def test_declip_flags_reach_the_model_and_the_views(tmp_path, monkeypatch):
    import declip
    import views
    seen = {}
    init = declip.DeCLIP.__init__

    def spy(self, *a, **k):
        seen.update(k)
        init(self, *a, **k)

    monkeypatch.setattr(declip.DeCLIP, "__init__", spy)
    train.main(TINY + ["--steps", "1", "--mlm-pass", "bidirectional", "--loss-weights", "official",
                       "--output", str(tmp_path)])
    assert seen["mlm_pass"] == "bidirectional" and seen["queue_size"] == 64
    assert seen["weights"] == "official"
    args = train.get_args([])  # DeCLIP: the Appendix B view
    args.context_length = 32
    view = train.build_loader(args, train.build_base(args), None, 64, 0, 1, 1)[0].transform
    assert isinstance(view, views.DeclipView) and view.scale == (0.2, 1.0)
    assert (view.p_jitter, view.p_gray, view.p_blur, view.jitter) == (0.8, 0.2, 0.5,
                                                                      (0.4, 0.4, 0.4, 0.1))
    args = train.get_args(["--method", "clip"])  # CLIP's own mild view unless asked
    args.context_length = 32
    assert not isinstance(train.build_loader(args, train.build_base(args), None, 64, 0, 1, 1)[0]
                          .transform, views.DeclipView)
    args = train.get_args(["--method", "clip", "--image-aug", "declip"])
    args.context_length = 32
    assert isinstance(train.build_loader(args, train.build_base(args), None, 64, 0, 1, 1)[0]
                      .transform, views.DeclipView)


def test_data_ablation_changes_only_the_views_it_names():
    """experiments/data_ablation.py: the view knobs reach DeclipView; unset ones keep Appendix B."""
    import data_ablation
    import views
    env = {"CROP_SCALE": "0.5", "AUG_GRAY": "0", "AUG_HUE": "0.05"}.get
    view = views.DeclipView(64, **data_ablation.declip_view_overrides(env))
    assert view.scale == (0.5, 1.0) and view.p_gray == 0 and view.jitter[3] == 0.05
    assert view.p_jitter == 0.8 and view.p_blur == 0.5 and view.ratio == (3 / 4, 4 / 3)


def test_grad_checkpointing_flag_trains_the_same_weights(tmp_path, monkeypatch):
    """--grad-checkpointing reaches both towers (the clip.py test checks gradients to 1e-6)
    and a DeCLIP run with it ends with the same weights as without (up to float rounding)."""
    import clip
    calls = []
    real = clip.checkpoint
    monkeypatch.setattr(clip, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    runs = {}
    for flag in ([], ["--grad-checkpointing"]):
        out = tmp_path / ("ckpt" if flag else "plain")
        train.main(TINY + ["--steps", "2", "--image-size", "32", "--output", str(out)] + flag)
        runs[bool(flag)] = weights(out)["model"]
        assert bool(calls) == bool(flag)  # nothing is checkpointed without the flag
    assert {type(fn).__name__ for fn in calls} == {"Sequential", "ResidualAttentionBlock"}
    for k, v in runs[False].items():
        assert torch.allclose(v.float(), runs[True][k].float(), atol=1e-5), k


def test_gpu_check_skips_cleanly_without_cuda(capsys, monkeypatch):
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    import gpu_check
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0 and "skipped" in capsys.readouterr().out
    assert gpu_check.peak_tflops("NVIDIA H200") == 989
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756  # the longest matching name wins
    assert gpu_check.peak_tflops("Tesla V100-SXM2-16GB") == 125
    assert gpu_check.peak_tflops("Some Future GPU") is None


def test_compile_flag_compiles_the_training_model(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    train.main(TINY + ["--steps", "1", "--image-size", "32", "--output", str(tmp_path / "a")])
    assert compiled == []
    train.main(TINY + ["--steps", "1", "--image-size", "32", "--output", str(tmp_path / "b"),
                       "--compile"])
    assert len(compiled) == 1 and hasattr(compiled[0], "push_queue")  # the DeCLIP module


def test_precision_follows_the_cpu_and_the_flag(tmp_path, monkeypatch):
    """bf16 by default only where the CPU multiplies bf16 in hardware; --precision overrides."""
    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in ((False, False, "fp32"), (True, False, "bf16"),
                                       (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert train.default_precision(cpu) == expected
    # the step runs under the autocast the precision asks for (the CPU above has AMX)
    seen = []
    autocast = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda device, dtype, enabled: seen.append(
        (dtype, enabled)) or autocast(device, dtype=dtype, enabled=enabled))
    args = TINY + ["--method", "clip", "--steps", "1", "--image-size", "32"]
    train.main(args + ["--output", str(tmp_path / "a")])
    assert seen[-1] == (torch.bfloat16, True)
    train.main(args + ["--precision", "fp32", "--output", str(tmp_path / "b")])
    assert seen[-1][1] is False


def test_channels_last_by_default_for_resnet_towers_and_by_flag(tmp_path):
    """NHWC weights for the conv tower unless --no-channels-last; ViTs stay as they are."""
    def conv1(out):
        return weights(out)["model"]["clip.visual.conv1.weight"]
    train.main(TINY + ["--steps", "1", "--image-size", "32", "--output", str(tmp_path / "a")])
    assert conv1(tmp_path / "a").is_contiguous(memory_format=torch.channels_last)
    assert not conv1(tmp_path / "a").is_contiguous()
    train.main(TINY + ["--steps", "1", "--image-size", "32", "--no-channels-last",
                       "--output", str(tmp_path / "b")])
    assert conv1(tmp_path / "b").is_contiguous()
    assert train.get_args(["--model", "tiny"]).channels_last is None  # decided in main


def test_demo_preset_is_the_default_on_builtin_data_and_flags_override_it():
    for argv in ([], ["--method", "clip"]):  # the demo and its contrast: the same settings
        args = train.get_args(argv)
        assert args.preset == "demo" and args.output == os.path.join("runs", "demo")
        assert (args.train_size, args.batch_size, args.epochs, args.warmup, args.eval_every) == \
            (2000, 256, 150, 50, 150)
    args = train.get_args(["--batch-size", "8", "--steps", "3", "--eval-every", "0"])
    assert (args.batch_size, args.steps, args.eval_every) == (8, 3, 0)
    assert train.get_args(["--data", "pairs.csv"]).preset is None  # other data: no preset
    assert train.get_args(["--data", "pairs.csv"]).batch_size == 64


def test_run_folder_holds_args_and_an_accuracy_chart(tmp_path, capsys):
    """stdout gets one header line (every argument goes to args.json), and the final lines say
    where the checkpoint, the log and the accuracy chart are."""
    train.main(TINY + ["--method", "clip", "--steps", "4", "--eval-every", "2", "--image-size",
                       "32", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert "{" not in out.splitlines()[0] and str(tmp_path / "args.json") in out
    with open(tmp_path / "args.json") as f:
        assert json.load(f)["eval_every"] == 2
    from PIL import Image
    with Image.open(tmp_path / "accuracy.png") as img:
        assert img.size == (760, 440)
    assert f"accuracy over the run: {tmp_path / 'accuracy.png'}" in out
    assert f"checkpoint: {tmp_path / 'checkpoint.pt'}" in out
    # evaluated at steps 2 and 4 only: two points, so a chart
    with open(tmp_path / "log.jsonl") as f:
        assert [r["step"] for r in map(json.loads, f) if r.get("zeroshot")] == [2, 4]
