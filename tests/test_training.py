"""Training, checkpoints, resumption, evaluation and the command line, on tiny runs."""
import contextlib
import csv
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hmtl
import hmtl_data
import hmtl_runs
from conftest import REPO, config, fake_300wlp, run_cli, tiny_args
from hmtl_data import GlobalBatches


def rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.xdist_group("learned")
@pytest.mark.parametrize("name", ["sl", "hmtl"])
def test_training_learns_pose(learned, name):
    """SL, and HMTL (rotation, the pose read off turned tiles), end far below predicting the mean."""
    folder, summary = learned[name]
    assert summary["val_mae_mean"] <= 0.6 * summary["baseline_mae_mean"], summary
    with np.load(folder.parent / "train.npz") as train, np.load(folder.parent / "val.npz") as val:
        mean_error = np.abs(val["pose"] - train["pose"].mean(0)).mean()
    assert summary["baseline_mae_mean"] == pytest.approx(mean_error, rel=1e-5)  # predicting the training mean
    assert {p.name for p in folder.iterdir()} == set(hmtl_runs.RUN_FILES) - {"best.pt"}  # BIWI is a test set
    history = rows(folder)
    assert summary["val_mae_mean"] == pytest.approx(float(history[-1]["val_mae_mean"]))  # the final epoch's
    assert summary["best_pt"]["epoch"] is None and "is a test set" in summary["best_pt"]["chosen_on"]
    if name == "hmtl":
        assert float(history[-1]["val_acc_rotation"]) > 0.5  # the SS heads learn too (chance: 0.25)


@pytest.mark.xdist_group("learned")
def test_eval_only_reproduces_the_final_checkpoints_mae(learned):
    folder, summary = learned["hmtl"]
    metrics = hmtl.main(["--eval-only", "--checkpoint", str(folder / "last.pt")])
    for key in ("val_mae_yaw", "val_mae_pitch", "val_mae_roll", "val_mae_mean", "val_acc_rotation"):
        assert metrics[key] == summary[key]
    assert metrics["epoch"] == 5 and metrics["val_images"] == 128


@pytest.mark.parametrize("bf16", ["0", "1"])
def test_amp_follows_what_the_cpu_can_do_both_ways(tmp_path, monkeypatch, capsys, bf16):
    """--amp auto decides from the CPU's bf16 units; both outcomes are run here, whatever this CPU has."""
    monkeypatch.setenv("HMTL_CPU_BF16", bf16)
    assert hmtl_runs.cpu_has_bf16() == (bf16 == "1")
    cfg = config("--device", "cpu")
    rt = hmtl_runs.runtime(cfg)
    assert rt.amp == ("bf16" if bf16 == "1" else "off")
    with rt.autocast():
        pose, _ = hmtl.HMTL("resnet18", 3)(torch.randn(2, 3, 32, 32))
    assert pose.dtype == (torch.bfloat16 if bf16 == "1" else torch.float32)
    summary = hmtl.main(tiny_args(tmp_path, "--task", "puzzle", "--epochs", "1"))
    assert f"(1 process, amp {rt.amp})" in capsys.readouterr().out and np.isfinite(summary["train_loss"])
    assert summary["amp"] == rt.amp  # what ran, beside the config's "auto"


@pytest.mark.parametrize("capability,amp", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_amp_auto_takes_bf16_only_on_gpus_that_compute_it_natively(monkeypatch, capability, amp):
    """A T4 (7.5) emulates bf16: auto takes fp16 there, with the loss scaled; an A100 (8.0) or H100 (9.0)
    computes bf16. The GPU is faked: its answers as torch gives them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability >= (8, 0))
    rt = hmtl_runs.runtime(config("--device", "auto"))
    assert rt.device.type == "cuda" and rt.amp == amp and rt.scaler.is_enabled() == (amp == "fp16")


def test_a_killed_run_resumes_to_the_same_metrics_as_one_that_never_stopped(tmp_path):
    """Files decoded by 2 loader workers, the heaviest augmentation, the learning rate dropped after epoch 1:
    a run killed in epoch 2 and resumed ends with every metric and learning rate of one that never stopped."""
    root = fake_300wlp(tmp_path / "300W_LP", folders=("AFW",), per_folder=32)
    args = lambda out: tiny_args(tmp_path, "--data", "300wlp", "--data-root", str(root), "--val-data", "300wlp",
                                 "--batch-size", "16", "--workers", "2", "--epochs", "3", "--milestones", "1",
                                 "--cache", "", "--task", "puzzle_rotation", "--aug", "2", out=out)  # workers decode
    hmtl.main(args("whole"))
    proc = subprocess.Popen([sys.executable, "hmtl.py", *args("killed")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "last.pt"
    while proc.poll() is None and not checkpoint.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(checkpoint, weights_only=True)["epoch"] < 2, "the run ended before it could be killed"
    hmtl.main(args("killed") + ["--resume"])
    timeless = lambda run: [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in rows(run)]
    assert [float(r["lr"]) for r in rows(tmp_path / "whole")] == pytest.approx([1e-3, 1e-4, 1e-4])
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


def test_best_pt_is_chosen_on_a_set_that_may_choose_and_eval_only_reproduces_it(tmp_path):
    summary = hmtl.main(tiny_args(tmp_path, "--synthetic-train", "96", "--holdout", "0.25"))
    assert summary["train_images"] == 72 and "24 images held out of the training set" in summary["best_pt"]["chosen_on"]
    history = rows(tmp_path / "run")
    best = min(history, key=lambda r: float(r["holdout_mae_mean"]))
    assert summary["best_pt"]["epoch"] == int(best["epoch"])
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert state["epoch"] == int(best["epoch"])
    metrics = hmtl.main(["--eval-only", "--checkpoint", str(tmp_path / "run" / "best.pt")])
    assert metrics["val_mae_mean"] == state["history"][state["epoch"] - 1]["val_mae_mean"]
    synthetic = hmtl.main(tiny_args(tmp_path, out="synthetic"))  # synthetic heads are no test set
    assert "validation set (synthetic, not a test set)" in synthetic["best_pt"]["chosen_on"]
    best = min(rows(tmp_path / "synthetic"), key=lambda r: float(r["val_mae_mean"]))
    assert synthetic["best_pt"]["epoch"] == int(best["epoch"])


def test_a_loss_that_is_not_finite_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = hmtl.hmtl_loss, []

    def poisoned(sl, ss, weight):
        calls.append(1)
        return real(sl, ss, weight) * (float("nan") if len(calls) == 3 else 1)  # step 1 of epoch 2, once

    monkeypatch.setattr(hmtl, "hmtl_loss", poisoned)
    with pytest.raises(SystemExit, match="the loss became nan in epoch 2 .read at step 2.: training stopped; "
                                         ".*last.pt holds epoch 1"):
        hmtl.main(tiny_args(tmp_path, "--task", "puzzle", "--epochs", "3"))
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    assert len(rows(tmp_path / "run")) == 1
    monkeypatch.setattr(hmtl, "CHECK_EVERY", 1)  # read every step: caught at step 1, before the epoch ends
    calls.clear()
    with pytest.raises(SystemExit, match="the loss became nan in epoch 2 .read at step 1."):
        hmtl.main(tiny_args(tmp_path, "--task", "puzzle", "--epochs", "3", "--overwrite"))


def test_downscale_resizes_each_image_by_its_own_drawn_factor():
    """Each image is resized by the factor drawn for it: the same, bit for bit, as resizing it alone."""
    x = torch.rand(12, 3, 24, 24)
    draw = lambda: hmtl.Draws(torch.Generator().manual_seed(0), 12, slice(None), torch.device("cpu"))
    factors = draw().integers(1, 5).tolist()
    assert set(factors) == {1, 2, 3, 4}  # every factor is met
    got = hmtl.downscale(x, draw())
    for image, f, resized in zip(x, factors, got):
        small = torch.nn.functional.interpolate(image[None], scale_factor=1 / f, mode="bilinear", antialias=True)
        want = image[None] if f == 1 else torch.nn.functional.interpolate(small, size=(24, 24), mode="bilinear")
        assert torch.equal(resized[None], want), f


def test_weights_that_blow_up_are_never_saved_or_chosen(tmp_path, monkeypatch):
    """A diverged update (finite loss, then weights and validation MAE NaN) is not written anywhere."""
    real = hmtl.train_one_epoch

    def diverging(model, *args):
        stats = real(model, *args)
        if args[3] == 1:  # the second epoch
            next(model.parameters()).data.fill_(float("nan"))
        return stats

    monkeypatch.setattr(hmtl, "train_one_epoch", diverging)
    with pytest.raises(SystemExit, match="epoch 2: val_mae_yaw.*the weights became NaN or infinite.*nothing of this "
                                         "epoch was written; .*last.pt holds epoch 1"):
        hmtl.main(tiny_args(tmp_path, "--epochs", "3"))
    for name in ("last.pt", "best.pt"):
        assert torch.load(tmp_path / "run" / name, weights_only=True)["epoch"] == 1
    assert len(rows(tmp_path / "run")) == 1 and not (tmp_path / "run" / "summary.json").exists()


def test_ctrl_c_says_what_last_pt_holds_and_the_run_resumes(tmp_path, monkeypatch):
    real = hmtl.train_one_epoch

    def interrupted(model, *args):
        if args[3] == 1:  # the second epoch
            raise KeyboardInterrupt
        return real(model, *args)

    monkeypatch.setattr(hmtl, "train_one_epoch", interrupted)
    with pytest.raises(SystemExit, match="^interrupted in epoch 2: .*last.pt holds epoch 1; continue with --resume$"):
        hmtl.main(tiny_args(tmp_path))
    monkeypatch.undo()
    assert hmtl.main(tiny_args(tmp_path, "--resume"))["epochs"] == 2
    with pytest.raises(hmtl.UsageError, match="--resume --epochs 1: .* has trained 2 epochs already"):
        hmtl.main(tiny_args(tmp_path, "--resume", "--epochs", "1"))
    monkeypatch.setattr(hmtl, "train_one_epoch", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit, match="^interrupted in epoch 1: no checkpoint was written yet; start it again "
                                         "with --overwrite$"):
        hmtl.main(tiny_args(tmp_path, out="first"))


def test_ctrl_c_while_a_cache_is_built_stops_with_one_line(tmp_path):
    cache = tmp_path / "cache"  # its own: only this build makes a .partial folder there
    args = tiny_args(tmp_path, "--synthetic-train", "20000", "--cache", str(cache))
    proc = subprocess.Popen([sys.executable, "hmtl.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    while proc.poll() is None and not list(cache.glob("*.partial")):
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: to every process of the group, renderers included
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.rstrip().splitlines()[-1].startswith(f"interrupted while building {cache}")


def test_a_huge_learning_rate_stops_before_writing_a_checkpoint(tmp_path):
    with pytest.raises(SystemExit) as stop:
        hmtl.main(tiny_args(tmp_path, "--synthetic-train", "32", "--lr", "1e10"))
    assert "became" in str(stop.value) and "\n" not in str(stop.value)  # one line, as the command line prints it
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best.pt").exists()


def test_best_pt_is_repaired_when_a_run_stopped_between_the_two_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(hmtl, "selection_score", lambda row, prefix: -row["epoch"])  # every epoch is the best
    real, saved = hmtl_runs.save_best, []

    def killed_before_best(out):
        saved.append(out)
        if len(saved) == 2:
            raise KeyboardInterrupt  # as a kill between writing last.pt and best.pt
        real(out)

    monkeypatch.setattr(hmtl_runs, "save_best", killed_before_best)
    args = lambda *more: tiny_args(tmp_path, "--synthetic-train", "32", *more)  # one step per epoch
    with pytest.raises(KeyboardInterrupt):
        hmtl.main(args("--epochs", "2"))
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["best_epoch"] == 2
    monkeypatch.setattr(hmtl_runs, "save_best", real)
    summary = hmtl.main(args("--epochs", "2", "--resume"))  # nothing left to train: repaired only
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == summary["best_pt"]["epoch"] == 2
    hmtl.main(args("--epochs", "3", "--resume"))
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == 3
    monkeypatch.setattr(hmtl, "selection_score", lambda row, prefix: row["epoch"])  # the first stays the best
    hmtl.main(args("--epochs", "4", "--resume"))  # last.pt replaced: best.pt keeps its own epoch
    assert [torch.load(tmp_path / "run" / f, weights_only=True)["epoch"] for f in ("best.pt", "last.pt")] == [3, 4]


class FullDisk:
    """open() for hmtl_runs.py whose files accept `room` bytes, then fail as a full disk does."""

    def __init__(self, room, only=".pt.tmp"):
        self.room, self.only = room, only

    def __call__(self, path, mode="r", *args, **kw):
        f = open(path, mode, *args, **kw)
        if "w" not in mode or not str(path).endswith(self.only):
            return f
        room = [self.room]
        write = f.write

        def limited(data):
            if len(data) > room[0]:
                write(bytes(data)[:room[0]])
                room[0] = 0
                raise OSError(errno.ENOSPC, "No space left on device")
            room[0] -= len(data)
            return write(data)
        f.write = limited
        return f


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    hmtl.main(tiny_args(tmp_path, "--epochs", "1"))
    monkeypatch.setattr(hmtl_runs, "open", FullDisk(room=1_000_000), raising=False)
    with pytest.raises(SystemExit, match="cannot write .*last.pt: no space left on device .*MiB free there.*"
                                         "last.pt keeps its previous content"):
        hmtl.main(tiny_args(tmp_path, "--epochs", "2", "--resume"))
    assert not list((tmp_path / "run").glob("*.tmp"))
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()
    assert hmtl.main(tiny_args(tmp_path, "--epochs", "2", "--resume"))["epochs"] == 2


def test_overwrite_keeps_the_old_run_until_the_new_one_can_start(tmp_path):
    hmtl.main(tiny_args(tmp_path, "--epochs", "1"))
    kept = {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()}
    with pytest.raises(SystemExit, match="--data-root '/nonexistent' for 300wlp: missing"):
        hmtl.main(tiny_args(tmp_path, "--overwrite", "--data", "300wlp", "--data-root", "/nonexistent"))
    with pytest.raises(hmtl.UsageError, match="--amp fp16 needs a CUDA device"):
        hmtl.main(tiny_args(tmp_path, "--overwrite", "--amp", "fp16"))
    assert {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()} == kept
    hmtl.main(tiny_args(tmp_path, "--epochs", "1", "--overwrite", "--holdout", "0.25"))  # best.pt: the new run's
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["config"]["holdout"] == 0.25


def test_a_run_folder_takes_one_process_at_a_time(tmp_path):
    import fcntl
    (tmp_path / "run").mkdir()
    other = os.open(tmp_path / "run", os.O_RDONLY)  # as another process writing there would hold it
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        with pytest.raises(SystemExit, match=f"^{tmp_path / 'run'} is in use by another hmtl process"):
            hmtl.main(tiny_args(tmp_path))
        assert not list((tmp_path / "run").iterdir())
    finally:
        os.close(other)
    assert hmtl.main(tiny_args(tmp_path, "--epochs", "1"))["epochs"] == 1
    assert hmtl.main(tiny_args(tmp_path, "--epochs", "2", "--resume"))["epochs"] == 2  # released after each run


def test_output_paths_that_cannot_be_written_get_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=f"^--out {tmp_path / 'file' / 'run'}: cannot write a folder there"):
        hmtl.main(tiny_args(tmp_path, out="file/run"))


def test_a_file_that_is_no_hmtl_checkpoint_is_refused_in_one_line(tmp_path):
    import torchvision
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pt")
    for args in (["--eval-only"], ["--predict", str(tmp_path)], ["--export", str(tmp_path / "e")]):
        with pytest.raises(SystemExit, match="^.*resnet18.pt: not an hmtl checkpoint .* go to --init PATH$"):
            hmtl.main([*args, "--checkpoint", str(tmp_path / "resnet18.pt")])
    (tmp_path / "run").mkdir()
    (tmp_path / "resnet18.pt").rename(tmp_path / "run" / "last.pt")
    with pytest.raises(SystemExit, match="last.pt: not an hmtl checkpoint"):
        hmtl.main(tiny_args(tmp_path, "--resume"))


def test_a_new_run_never_replaces_another_and_resume_refuses_other_settings(tmp_path):
    hmtl.main(tiny_args(tmp_path, "--epochs", "1"))
    with pytest.raises(hmtl.UsageError, match=r"--resume continues .* as it began: --lr 0.01 \(the run has 0.001\), "
                                              r"--task puzzle \(the run has none\); leave them out"):
        hmtl.main(tiny_args(tmp_path, "--epochs", "2", "--resume", "--lr", "0.01", "--task", "puzzle"))
    with pytest.raises(hmtl.UsageError, match="--eval-only evaluates the run as it was trained: --lr 0.5"):
        hmtl.main(["--eval-only", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--lr", "0.5"])
    (tmp_path / "run" / "last.pt").unlink()
    finished = (tmp_path / "run" / "summary.json").read_text()
    with pytest.raises(SystemExit, match="already holds a run .*summary.json.*--overwrite to replace it"):
        hmtl.main(tiny_args(tmp_path, "--epochs", "1"))
    assert (tmp_path / "run" / "summary.json").read_text() == finished
    hmtl.main(tiny_args(tmp_path, "--epochs", "1", "--seed", "5", "--overwrite"))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["seed"] == 5


def test_ablation_and_pretraining_modes(tmp_path):
    without = hmtl.main(tiny_args(tmp_path, "--task", "puzzle", "--no-ssh", "--epochs", "1", out="no_ssh"))
    state = torch.load(tmp_path / "no_ssh" / "last.pt", weights_only=True)["model"]
    assert without["train_ss_loss"] == 0 and "val_acc_puzzle" not in without and not any("ssl" in k for k in state)
    pre = hmtl.main(tiny_args(tmp_path, "--task", "rotation", "--stage", "pretrain", out="pre"))
    history = rows(tmp_path / "pre")
    assert "val_mae_mean" not in pre and "val_acc_rotation" in pre
    assert pre["best_pt"]["epoch"] == 1 + int(np.argmax([float(r["val_acc_rotation"]) for r in history]))
    pretrained = torch.load(tmp_path / "pre" / "last.pt", weights_only=True)["model"]
    assert not any(k.startswith("pose_heads") for k in pretrained)
    # fine-tuning starts from the pre-trained backbone: at a learning rate of 1e-12 it stays there
    hmtl.main(tiny_args(tmp_path, "--init", str(tmp_path / "pre" / "last.pt"), "--epochs", "1", "--lr", "1e-12",
                        out="fine"))
    fine = torch.load(tmp_path / "fine" / "last.pt", weights_only=True)["model"]
    for key in ("stem.0.weight", "stages.3.1.conv2.weight"):
        torch.testing.assert_close(fine[key], pretrained[key], rtol=0, atol=1e-6)


def test_epochs_of_a_fixed_number_of_steps_take_every_image_equally_often_even_from_a_tiny_set():
    n, batch, steps = 10, 4, 5  # 20 images an epoch: every image twice, batches across the passes
    whole = GlobalBatches(n, batch, seed=1, shuffle=True, drop_last=True, steps=steps)
    halves = [GlobalBatches(n, batch, seed=1, shuffle=True, drop_last=True, rank=r, world=2, steps=steps)
              for r in (0, 1)]
    seen = []
    for epoch in range(3):
        for sampler in (whole, *halves):
            sampler.set_epoch(epoch)
        batches = list(whole)
        assert len(batches) == steps and all(len(b) == batch for b in batches)
        assert sorted(i for b in batches for i in b) == sorted(list(range(n)) * 2)
        for b, (a, c) in zip(batches, zip(*halves)):
            assert a == b[0::2] and c == b[1::2]  # two processes split each global batch
        seen.append(batches)
    assert seen[0] != seen[1] != seen[2]  # a new order every epoch
    tiny = [i for b in GlobalBatches(3, 8, seed=0, shuffle=True, drop_last=True, steps=2) for i in b]
    assert len(tiny) == 16 and sorted(np.bincount(tiny)) == [5, 5, 6]  # 3 images fill 2 batches of 8: 5 passes and 1


def test_every_kth_image_from_a_seeded_offset_and_the_other_optimizer(tmp_path):
    data = hmtl_data.PoseArrays(np.zeros((100, 4, 4, 3), np.uint8), np.arange(300, dtype=np.float32).reshape(100, 3))
    picked = {seed: hmtl_data.every_kth(data, 32, seed).indices for seed in range(8)}
    assert all(len(i) in (3, 4) and np.all(np.diff(i) == 32) for i in picked.values())
    assert len({int(i[0]) for i in picked.values()}) > 1  # the offset follows the seed
    summary = hmtl.main(tiny_args(tmp_path, "--synthetic-train", "96", "--train-every", "3", "--epoch-steps", "2",
                                  "--optimizer", "adamw", "--batch-size", "16"))
    assert summary["train_images"] == 32 and summary["epochs"] == 2
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["amsgrad"] is False  # torch's AdamW, not AdaBelief
    assert state["optimizer"]["state"][0]["step"] == 4  # 2 epochs of 2 steps


def test_translation_moves_each_image_by_its_own_drawn_shift():
    x = torch.rand(3, 3, 16, 16)

    class Shifts:  # 1/16 of the side is 1 px here: shifts of +2, -2 and 0 px, as (x, y)
        def uniform(self, low, high, *shape):
            return torch.tensor([[0.25, 0.0], [-0.25, 0.25], [0.0, 0.0]])

    got = hmtl.translate(x, Shifts())
    torch.testing.assert_close(got[0, :, :, :-2], x[0, :, :, 2:])  # content moved 2 px left
    torch.testing.assert_close(got[0, :, :, -2:], x[0, :, :, -1:].expand(3, 16, 2))  # the edge repeated
    torch.testing.assert_close(got[1, :, :-2, 2:], x[1, :, 2:, :-2])
    torch.testing.assert_close(got[2], x[2])


def test_a_fraction_of_each_batch_is_shuffled_and_the_rest_left_alone():
    images = torch.randint(0, 256, (400, 16, 16, 3), dtype=torch.uint8)
    cfg = {"aug": "0", "grid": 2, "flip": 0.0, "ss_fraction": 0.25, "data": "synthetic", "task": "puzzle"}
    draw = hmtl.Draws(torch.Generator().manual_seed(0), 400, slice(None), torch.device("cpu"))
    _, _, perm, rot, shuffled = hmtl.training_batch(images, torch.zeros(400, 3), cfg, draw)
    assert 0.17 < shuffled.float().mean() < 0.33
    identity = (perm == torch.arange(4)).all(1)
    assert identity[~shuffled].all() and (~identity[shuffled]).float().mean() > 0.9  # 1/24 stay by chance


def test_defaults_are_the_papers():
    cfg = config("--data", "300wlp")
    assert (cfg["arch"], cfg["head"], cfg["bin_width"], cfg["alpha"], cfg["dropout"], cfg["ssl_weight"]) == \
        ("resnet50", "catreg", 3, 2.0, 0.5, 50.0)
    assert (cfg["epochs"], cfg["milestones"], cfg["batch_size"], cfg["lr"], cfg["img_size"]) == (110, [20, 100], 64, 1e-3, 224)
    assert cfg["val_data"] == "aflw2000" and cfg["ssl_dropout"] == 0.2 and cfg["rectify"] and cfg["crop"] == "hopenet"
    cfg = config("--data", "ethxgaze")
    assert (cfg["head"], cfg["dropout"], cfg["ssl_weight"], cfg["milestones"], cfg["aug"]) == ("reg", 0.4, 1.0, [30, 40], "eth41")
    assert cfg["val_subjects"] == "108,109,111"
    quick = config()
    assert quick["data"] == "synthetic" and quick["img_size"] < 224 and quick["epochs"] < 110
    paper, strong = config("--data", "biwi"), config("--data", "biwi", "--recipe", "strong")
    assert {k for k in paper if strong[k] != paper[k]} == set(hmtl.STRONG) and not strong["rectify"]
    assert config("--data", "biwi", "--recipe", "strong", "--rectify")["rectify"]  # a flag given wins


def test_help_shows_the_defaults_the_presets_hold(monkeypatch):
    text = " ".join(hmtl.get_args_parser().format_help().split())
    assert "backbone (default: resnet50; quick preset resnet18)" in text
    assert "(default: 300W-LP/AFLW2000/BIWI 20 100, ETH-XGaze 30 40; quick preset 3)" in text
    assert "(default: on; quick preset off; --recipe strong off)" in text
    monkeypatch.setitem(hmtl.QUICK, "epochs", 7)
    assert "(default: 110; quick preset 7)" in " ".join(hmtl.get_args_parser().format_help().split())


def test_imagenet_init_takes_the_2021_weights_unless_v2_is_asked(monkeypatch):
    import torchvision
    weights = torchvision.models.ResNet50_Weights
    assert hmtl_runs.imagenet_weights("imagenet", "resnet50") is weights.IMAGENET1K_V1
    assert hmtl_runs.imagenet_weights("imagenet-v2", "resnet50") is weights.IMAGENET1K_V2
    with pytest.raises(hmtl.UsageError, match="no IMAGENET1K_V2 weights for resnet18"):
        config("--init", "imagenet-v2", "--arch", "resnet18")
    asked = []
    source = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict",
                        lambda self, *a, **k: asked.append(self) or source)
    model = hmtl.HMTL("resnet18", 3)
    hmtl_runs.load_backbone(model, "imagenet", "resnet18")
    assert asked == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1]
    assert torch.equal(model.state_dict()["stages.2.0.conv1.weight"], source["layer3.0.conv1.weight"])


BAD_FLAGS = [
    (["--task", "jigsaw"], "argument --task: invalid choice: 'jigsaw'"),
    (["--flag", "5"], "argument --flag: invalid choice: 5"),
    (["--grid", "20", "--img-size", "64"], "--grid 20 cannot tile a 64 px image"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer ≥ 2, got 0"),
    (["--batch-size", "1"], "argument --batch-size: must be an integer ≥ 2, got 1"),
    (["--batch-size", "-4"], "argument --batch-size: must be an integer ≥ 2, got -4"),
    (["--epochs", "0"], "argument --epochs: must be an integer ≥ 1, got 0"),
    (["--bin-width", "0"], "argument --bin-width: must be a number > 0, got 0"),
    (["--bin-width", "7"], "--bin-width 7 does not divide the 198° span"),
    (["--dropout", "2"], "argument --dropout: must be a number ≥ 0 and < 1, got 2"),
    (["--seed", "-1"], "argument --seed: must be an integer ≥ 0"),
    (["--lr", "-0.1"], "argument --lr: must be a number > 0, got -0.1"),
    (["--lr", "nan"], "argument --lr: must be a number > 0, got nan"),
    (["--ssl-weight", "-1"], "argument --ssl-weight: must be a number ≥ 0, got -1"),
    (["--grid", "1", "--task", "puzzle"], "--task puzzle needs --grid 2 or more"),
    (["--holdout", "1"], "argument --holdout: must be a number > 0 and < 1, got 1"),
    (["--flip", "1.5"], "argument --flip: must be a number ≥ 0 and ≤ 1, got 1.5"),
    (["--train-subjects", "two"], "argument --train-subjects: must be a count"),
    (["--epochs", "x"], "argument --epochs: must be an integer ≥ 1, got 'x'"),
    (["--eval-only"], "--eval-only needs --checkpoint"),
    (["--no-ssh"], "--no-ssh needs a --task"),
    (["--resume", "--overwrite"], "--resume continues a run and --overwrite replaces it"),
    (["--synthetic-train", "10", "--batch-size", "16"], "--synthetic-train 10 (less --holdout) makes no batch of 16"),
    (["--predict", "face.png", "--checkpoint", "best.pt", "--lr", "0.1", "--img-size", "64"],
     "--predict uses only --boxes, --checkpoint, --device, --out; it would ignore --lr, --img-size"),
    (["--export", "exported", "--checkpoint", "best.pt", "--out", "elsewhere"],
     "--export uses only --checkpoint; it would ignore --out"),
    (["--boxes", "boxes.csv"], "--boxes crops the images given to --predict"),
    (["--preview", "a.png", "--eval-only"], "--eval-only and --preview do not go together"),
    (["--checkpoint", "other.pt"], "--checkpoint is read by --eval-only, --predict and --export"),
    (["--resume", "--checkpoint", "other.pt"], "--resume continues --out's last.pt"),
    (["--eval-only", "--checkpoint", "a.pt", "--out", "x", "--overwrite"],
     "--eval-only prints its metrics and writes nothing; it would ignore --out, --overwrite"),
]


def test_bad_flags_exit_2_with_one_line_from_the_command_line():
    result = run_cli("--batch-size", "0")
    assert result.returncode == 2 and result.stderr == f"hmtl.py: error: {BAD_FLAGS[3][1]}\n", result.stderr


@pytest.mark.parametrize("args,message", BAD_FLAGS)
def test_bad_flags_are_refused_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        hmtl.main(args)
    assert stop.value.code == 2
    printed = capsys.readouterr().err
    assert printed.startswith("hmtl.py: error: ") and printed.count("\n") == 1 and message in printed, printed


@pytest.mark.parametrize("args,message", [
    (["--eval-only", "--checkpoint", "/nonexistent/best.pt"], "checkpoint not found: /nonexistent/best.pt"),
    (["--data", "300wlp", "--data-root", "/nonexistent"], "--data-root '/nonexistent' for 300wlp: missing or empty. Get 300W-LP"),
])
def test_missing_files_get_one_line_naming_them(args, message):
    with pytest.raises(SystemExit) as stop:  # a SystemExit's message is what the command line prints, exit status 1
        hmtl.main(args)
    assert message in str(stop.value) and "\n" not in str(stop.value)


def test_refusals_that_depend_on_the_machine_exit_2(tmp_path, capsys):
    refused = [["--amp", "fp16"]] + ([["--device", "cuda"]] if not torch.cuda.is_available() else [])
    for flags in refused:
        with pytest.raises(SystemExit) as stop:
            hmtl.main(tiny_args(tmp_path, "--device", "cpu", *flags) if flags[0] == "--amp" else
                      tiny_args(tmp_path, *flags))
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("hmtl.py: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_corrupt_checkpoints_and_existing_runs_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="bad.pt: not a readable checkpoint"):
        hmtl.main(["--eval-only", "--checkpoint", str(bad)])
    torch.save({"model": {}, "config": {"data": "synthetic"}, "code": FullDisk(0)}, bad)  # any class of code
    with pytest.raises(SystemExit) as stop:  # a pickle of more than tensors: refused, never loaded
        hmtl.main(["--eval-only", "--checkpoint", str(bad)])
    assert "not a readable checkpoint" in str(stop.value) and "weights_only" not in str(stop.value)
    assert "\n" not in str(stop.value)
    with pytest.raises(SystemExit, match="checkpoint not found"):
        hmtl.main(tiny_args(tmp_path, "--resume"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="already holds a run"):
        hmtl.main(tiny_args(tmp_path))


# Values each flag may take in the property test below: valid ones and every kind of invalid one.
FLAG_VALUES = {
    "--batch-size": ["-4", "0", "1", "2", "16", "x", "1e3"],
    "--epochs": ["-1", "0", "1", "2.5"],
    "--lr": ["-0.1", "0", "0.001", "0.01", "nan", "inf", "abc"],
    "--grid": ["0", "1", "2", "3", "9"],
    "--task": ["none", "puzzle", "rotation", "puzzle_rotation", "jigsaw"],
    "--flag": ["0", "1", "4", "5"],
    "--dropout": ["-0.1", "0", "0.5", "1", "2"],
    "--ssl-weight": ["-1", "0", "50"],
    "--bin-width": ["-3", "0", "1", "3", "7"],
    "--seed": ["-1", "0", "3"],
    "--img-size": ["8", "16", "24"],
    "--flip": ["-0.5", "0", "0.5", "1", "2"],
    "--holdout": ["0", "0.25", "1"],
    "--ss-fraction": ["0", "0.5", "1", "1.5"],
    "--milestones": ["0", "1", "100"],
}


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(chosen=st.dictionaries(st.sampled_from(sorted(FLAG_VALUES)), st.integers(0, 6), max_size=5))
def test_property_any_flags_train_a_tiny_run_or_exit_2_with_one_line(chosen, tmp_path_factory):
    flags = [x for flag, i in chosen.items() for x in (flag, FLAG_VALUES[flag][i % len(FLAG_VALUES[flag])])]
    folder = tmp_path_factory.mktemp("flags")
    argv = ["--arch", "resnet18", "--img-size", "24", "--batch-size", "8", "--synthetic-train", "32",
            "--synthetic-val", "8", "--epochs", "1", "--workers", "0", "--device", "cpu", "--cache",
            str(tmp_path_factory.getbasetemp() / "cache"), "--out", str(folder / "run"), *flags]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            summary = hmtl.main(argv)
        except SystemExit as e:
            assert e.code == 2, (flags, e)
            assert stderr.getvalue().startswith("hmtl.py: error: ") and stderr.getvalue().count("\n") == 1, flags
            return
    assert summary["epochs"] == int(dict(zip(flags[::2], flags[1::2])).get("--epochs", 1))
    assert np.isfinite(summary["val_mae_mean"]) and (folder / "run" / "summary.json").is_file()
