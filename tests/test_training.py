"""Training, checkpoints, resumption, evaluation and the command line's errors, on tiny synthetic runs."""
import csv
import json
import signal
import time

import numpy as np
import pytest
import torch

import hmtl
from conftest import run_cli, tiny_args


def rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_a_tiny_hmtl_run_learns_and_writes_its_folder(tmp_path):
    summary = hmtl.main(tiny_args(tmp_path, "--task", "puzzle", "--flag", "3", "--epochs", "4"))
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.csv", "curves.png", "last.pt", "best.pt",
                                                "summary.json"}
    history = rows(run)
    assert len(history) == 4
    assert float(history[-1]["train_loss"]) < float(history[0]["train_loss"])
    assert float(history[-1]["val_acc_puzzle"]) > 0.4  # the auxiliary task learns (chance: 0.25)
    saved = json.loads((run / "summary.json").read_text())
    assert saved["val_mae_mean"] == pytest.approx(float(history[-1]["val_mae_mean"]))
    # the baseline predicts the training mean for every validation image
    cache = tmp_path.parent / "cache"
    train = np.load(next(cache.glob("synthetic-train-192-32px*")) / "angles.npy")
    val = np.load(next(cache.glob("synthetic-val-64-32px*")) / "angles.npy")
    assert saved["baseline_mae_mean"] == pytest.approx(np.abs(val - train.mean(0)).mean(), rel=1e-5)
    assert summary["config"]["task"] == "puzzle" and json.loads((run / "config.json").read_text())["flag"] == 3


def test_a_killed_run_resumes_to_the_same_metrics_as_one_that_never_stopped(tmp_path):
    args = tiny_args(tmp_path, "--task", "puzzle_rotation", "--epochs", "3", "--aug", "2", out="whole")
    hmtl.main(args)
    interrupted = tiny_args(tmp_path, "--task", "puzzle_rotation", "--epochs", "3", "--aug", "2", out="killed")
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "hmtl.py", *interrupted], cwd=hmtl.__file__.rsplit("/", 1)[0],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "last.pt"
    while proc.poll() is None and not checkpoint.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(checkpoint, weights_only=True)["epoch"] < 3, "the run ended before it could be killed"
    resumed = run_cli(*interrupted, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    timeless = lambda run: [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in rows(run)]
    assert len(rows(tmp_path / "whole")) == 3
    assert timeless(tmp_path / "killed") == timeless(tmp_path / "whole")  # every digit of every metric


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["bf16", "fp16", "off"])
def test_a_tiny_run_learns_on_the_gpu_and_resumes_there(tmp_path, amp, capsys):
    args = tiny_args(tmp_path, "--task", "puzzle_rotation", "--device", "cuda", "--amp", amp)
    hmtl.main(args)
    hmtl.main(args + ["--resume", "--epochs", "4"])
    assert f"resuming {tmp_path / 'run'} at epoch 3 on cuda:0 (1 process, amp {amp})" in capsys.readouterr().out
    history = [{k: float(v) for k, v in row.items()} for row in rows(tmp_path / "run")]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert all(np.isfinite(list(r.values())).all() for r in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["rng"]["cuda"] is not None
    assert bool(state["scaler"]) == (amp == "fp16")  # fp16 alone scales the loss


def test_eval_only_reproduces_the_best_checkpoints_mae(tmp_path):
    hmtl.main(tiny_args(tmp_path, "--task", "rotation", "--epochs", "3"))
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    recorded = min(best["history"], key=lambda r: r["val_mae_mean"])
    metrics = hmtl.main(["--eval-only", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--cache",
                         str(tmp_path.parent / "cache")])
    assert metrics["epoch"] == recorded["epoch"]
    for key in ("val_mae_yaw", "val_mae_pitch", "val_mae_roll", "val_mae_mean", "val_acc_rotation"):
        assert metrics[key] == recorded[key]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = hmtl.hmtl_loss
    calls = []

    def poisoned(sl, ss, weight):
        calls.append(1)
        return real(sl, ss, weight) * (float("nan") if len(calls) > 8 else 1)  # 6 steps per epoch

    monkeypatch.setattr(hmtl, "hmtl_loss", poisoned)
    with pytest.raises(SystemExit, match="became nan at epoch 2, step 3.*last good checkpoint: .*last.pt holds epoch 1"):
        hmtl.main(tiny_args(tmp_path, "--task", "puzzle", "--epochs", "3"))
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    assert len(rows(tmp_path / "run")) == 1


def test_ablation_and_pretraining_modes(tmp_path):
    without = hmtl.main(tiny_args(tmp_path, "--task", "puzzle", "--no-ssh", out="no_ssh"))
    assert "train_ss_loss" in without and without["train_ss_loss"] == 0 and "val_acc_puzzle" not in without
    pre = hmtl.main(tiny_args(tmp_path, "--task", "rotation", "--stage", "pretrain", out="pre"))
    assert "val_mae_mean" not in pre and pre["val_acc_rotation"] > 0
    state = torch.load(tmp_path / "pre" / "best.pt", weights_only=True)["model"]
    model = hmtl.HMTL("resnet18", 3, "catreg", 3)
    hmtl.load_backbone(model, str(tmp_path / "pre" / "best.pt"), "resnet18")
    assert torch.equal(model.state_dict()["stages.3.1.conv2.weight"], state["stages.3.1.conv2.weight"])
    hmtl.main(tiny_args(tmp_path, "--task", "puzzle", "--init", str(tmp_path / "pre" / "best.pt"), out="fine"))


def test_defaults_are_the_papers():
    cfg = hmtl.resolve_config(hmtl.get_args_parser().parse_args(["--data", "300wlp"]))
    assert (cfg["arch"], cfg["head"], cfg["bin_width"], cfg["alpha"], cfg["dropout"], cfg["ssl_weight"]) == \
        ("resnet50", "catreg", 3, 2.0, 0.5, 50.0)
    assert (cfg["epochs"], cfg["milestones"], cfg["batch_size"], cfg["lr"], cfg["img_size"]) == (110, [20, 100], 64, 1e-3, 224)
    assert cfg["val_data"] == "aflw2000" and cfg["ssl_dropout"] == 0.2
    cfg = hmtl.resolve_config(hmtl.get_args_parser().parse_args(["--data", "ethxgaze"]))
    assert (cfg["head"], cfg["dropout"], cfg["ssl_weight"], cfg["milestones"], cfg["aug"]) == ("reg", 0.4, 1.0, [30, 40], "eth41")
    assert cfg["val_subjects"] == "108,109,111"
    quick = hmtl.resolve_config(hmtl.get_args_parser().parse_args([]))
    assert quick["data"] == "synthetic" and quick["img_size"] < 224 and quick["epochs"] < 110


@pytest.mark.parametrize("args,message", [
    (["--task", "jigsaw"], "invalid choice: 'jigsaw'"),
    (["--flag", "5"], "invalid choice: 5"),
    (["--grid", "20", "--img-size", "64"], "cannot tile a 64 px image"),
    (["--eval-only", "--checkpoint", "/nonexistent/best.pt"], "checkpoint not found: /nonexistent/best.pt"),
    (["--eval-only"], "--eval-only needs --checkpoint"),
    (["--no-ssh"], "--no-ssh needs a --task"),
    (["--data", "300wlp", "--data-root", "/nonexistent"], "--data-root '/nonexistent' for 300wlp: missing or empty. Get 300W-LP"),
])
def test_bad_command_lines_get_a_clear_error(args, message):
    result = run_cli(*args)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_corrupt_checkpoints_and_existing_runs_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="bad.pt: not a readable checkpoint"):
        hmtl.main(["--eval-only", "--checkpoint", str(bad)])
    with pytest.raises(SystemExit, match="no checkpoint|checkpoint not found"):
        hmtl.main(tiny_args(tmp_path, "--resume"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="already holds a run"):
        hmtl.main(tiny_args(tmp_path))
