"""Training, checkpoints, resumption, evaluation and the command line, on tiny synthetic runs."""
import csv
import errno
import json
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
from conftest import REPO, config, run_cli, tiny_args


def rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_a_tiny_hmtl_run_learns_and_writes_its_folder(tmp_path):
    # AdaBelief's rectification is a warm-up over thousands of steps: this 24-step run goes without it
    summary = hmtl.main(tiny_args(tmp_path, "--task", "puzzle", "--flag", "3", "--epochs", "4", "--no-rectify"))
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == set(hmtl.RUN_FILES)
    history = rows(run)
    assert len(history) == 4
    assert float(history[-1]["train_loss"]) < float(history[0]["train_loss"])
    assert float(history[-1]["val_acc_puzzle"]) > 0.4  # the auxiliary task learns (chance: 0.25)
    saved = json.loads((run / "summary.json").read_text())
    assert saved["val_mae_mean"] == pytest.approx(float(history[-1]["val_mae_mean"]))  # the final epoch's
    # the baseline predicts the training mean for every validation image
    cache = tmp_path.parent / "cache"
    train = np.load(next(cache.glob("synthetic-train-192-32px*")) / "angles.npy")
    val = np.load(next(cache.glob("synthetic-val-64-32px*")) / "angles.npy")
    assert saved["baseline_mae_mean"] == pytest.approx(np.abs(val - train.mean(0)).mean(), rel=1e-5)
    assert summary["config"]["task"] == "puzzle" and json.loads((run / "config.json").read_text())["flag"] == 3
    # synthetic validation heads are no test set: best.pt is chosen on them, and summary.json says so
    best = min(history, key=lambda r: float(r["val_mae_mean"]))
    assert saved["best_pt"]["epoch"] == int(best["epoch"]) == torch.load(run / "best.pt", weights_only=True)["epoch"]
    assert "validation set (synthetic" in saved["best_pt"]["chosen_on"]


@pytest.mark.parametrize("bf16", ["0", "1"])
def test_amp_follows_what_the_cpu_can_do_both_ways(tmp_path, monkeypatch, capsys, bf16):
    """--amp auto decides from the CPU's bf16 units; both outcomes are run here, whatever this CPU has."""
    monkeypatch.setenv("HMTL_CPU_BF16", bf16)
    assert hmtl.cpu_has_bf16() == (bf16 == "1")
    history = hmtl.main(tiny_args(tmp_path, "--task", "puzzle", "--epochs", "3"))
    assert f"(1 process, amp {'bf16' if bf16 == '1' else 'off'})" in capsys.readouterr().out
    logged = rows(tmp_path / "run")
    assert all(np.isfinite([float(v) for v in r.values()]).all() for r in logged)
    assert float(logged[-1]["train_loss"]) < float(logged[0]["train_loss"]) and history["val_acc_puzzle"] > 0.25


def test_a_killed_run_resumes_to_the_same_metrics_as_one_that_never_stopped(tmp_path):
    args = tiny_args(tmp_path, "--task", "puzzle_rotation", "--epochs", "3", "--aug", "2", "--flip", "0.5", out="whole")
    hmtl.main(args)
    interrupted = tiny_args(tmp_path, "--task", "puzzle_rotation", "--epochs", "3", "--aug", "2", "--flip", "0.5",
                            out="killed")
    proc = subprocess.Popen([sys.executable, "hmtl.py", *interrupted], cwd=REPO,
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


def test_eval_only_reproduces_the_final_and_the_best_checkpoints_mae(tmp_path):
    hmtl.main(tiny_args(tmp_path, "--task", "rotation", "--epochs", "3"))
    for name in ("last.pt", "best.pt"):
        state = torch.load(tmp_path / "run" / name, weights_only=True)
        recorded = state["history"][state["epoch"] - 1]
        metrics = hmtl.main(["--eval-only", "--checkpoint", str(tmp_path / "run" / name), "--cache",
                             str(tmp_path.parent / "cache")])
        assert metrics["epoch"] == recorded["epoch"]
        for key in ("val_mae_yaw", "val_mae_pitch", "val_mae_roll", "val_mae_mean", "val_acc_rotation"):
            assert metrics[key] == recorded[key]


def test_holdout_chooses_best_pt_on_training_images(tmp_path):
    summary = hmtl.main(tiny_args(tmp_path, "--epochs", "3", "--holdout", "0.25"))
    assert summary["train_images"] == 144 and "48 images held out of the training set" in summary["best_pt"]["chosen_on"]
    history = rows(tmp_path / "run")
    best = min(history, key=lambda r: float(r["holdout_mae_mean"]))
    assert summary["best_pt"]["epoch"] == int(best["epoch"])
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == int(best["epoch"])


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = hmtl.hmtl_loss
    calls = []

    def poisoned(sl, ss, weight):
        calls.append(1)
        return real(sl, ss, weight) * (float("nan") if len(calls) > 8 else 1)  # 6 steps per epoch

    monkeypatch.setattr(hmtl, "hmtl_loss", poisoned)
    with pytest.raises(SystemExit, match="became nan at epoch 2, step 3: training stopped; .*last.pt holds epoch 1"):
        hmtl.main(tiny_args(tmp_path, "--task", "puzzle", "--epochs", "3"))
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    assert len(rows(tmp_path / "run")) == 1


def test_a_training_epoch_reads_back_to_the_host_only_at_its_end(tmp_path, monkeypatch):
    """Each read of a tensor's value on the host (item, tolist, bool, float, int) makes the host wait for a GPU;
    between read-backs (every READ_BACK_STEPS steps) hmtl.py's loop reads nothing, so it never waits."""
    reads, counting = [], []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        method = getattr(torch.Tensor, name)

        def counted(self, *args, _method=method, _name=name):
            caller = sys._getframe(1)  # hmtl.py's, but not the batch sampler's or Draws' (host tensors)
            if counting and caller.f_code.co_filename == hmtl.__file__ and \
                    not isinstance(caller.f_locals.get("self"), (torch.utils.data.Sampler, hmtl.Draws)):
                reads.append(_name)
            return _method(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)
    real = hmtl.train_one_epoch

    def epoch(*args):
        counting.append(1)
        try:
            return real(*args)
        finally:
            counting.clear()
    monkeypatch.setattr(hmtl, "train_one_epoch", epoch)
    monkeypatch.setattr(hmtl, "READ_BACK_STEPS", 100)  # more than the epoch's 6 steps
    hmtl.main(tiny_args(tmp_path, "--epochs", "1", "--task", "puzzle"))
    assert reads == ["tolist", "tolist"]  # the check for a non-finite loss, and the epoch's mean losses
    reads.clear()
    monkeypatch.setattr(hmtl, "READ_BACK_STEPS", 2)
    hmtl.main(tiny_args(tmp_path, "--epochs", "1", "--task", "puzzle", "--overwrite"))
    assert reads == ["tolist", "item"] * 3 + ["tolist", "tolist"]  # and the progress bar's loss at steps 2, 4, 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("aug", ["1", "2", "eth41", "eth52"])
def test_a_training_step_on_the_gpu_queues_its_work_without_waiting(aug):
    """A step as train_one_epoch takes it -- augmentation, flip, tiles and the fused op, forward,
    losses, backward, optimizer -- makes no synchronising call (CUDA's sync debug mode raises at one)."""
    cfg = config("--data", "synthetic", "--arch", "resnet18", "--img-size", "32", "--batch-size", "8",
                 "--aug", aug, "--task", "puzzle_rotation", "--ss-fraction", "0.5", "--device", "cuda", "--amp", "bf16")
    rt = hmtl.runtime(cfg)
    model = hmtl.build_model(cfg).to(rt.device, memory_format=torch.channels_last)
    optimizer = hmtl.AdaBelief(model.parameters())
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8).pin_memory()
    angles = (torch.rand(8, 3) * 180 - 90).pin_memory()

    def step(i):
        x, target, perm, rot, shuffled = hmtl.prepare(images, angles, cfg, hmtl.seeded(0, i), 8, rt,
                                                      task=cfg["task"], train=True)
        with rt.autocast():
            pose, ssl = model(x)
        loss = hmtl.hmtl_loss(hmtl.supervised_loss(pose, target, cfg, rt.centres),
                              hmtl.ssl_loss(ssl, {"puzzle": perm, "rotation": rot}, shuffled), cfg["ssl_weight"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(0)  # first calls (cuDNN's choices, the optimizer's state) may synchronise once
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_downscale_resizes_each_image_by_its_own_drawn_factor():
    """The batch is resized at every factor and each image keeps its own: the same, bit for bit, as
    resizing that image alone."""
    x = torch.rand(12, 3, 24, 24)
    draw = lambda: hmtl.Draws(torch.Generator().manual_seed(3), 12, slice(None), torch.device("cpu"))
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


def test_a_huge_learning_rate_stops_before_writing_a_checkpoint(tmp_path):
    result = run_cli(*tiny_args(tmp_path, "--synthetic-train", "32", "--epochs", "2", "--lr", "1e10"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "became" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best.pt").exists()


def test_predict_and_export_refuse_a_checkpoint_with_broken_weights(tmp_path):
    hmtl.main(tiny_args(tmp_path, "--epochs", "1"))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    state["model"]["stem.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "broken.pt")
    image = tmp_path / "face.png"
    hmtl.Image.new("RGB", (40, 40)).save(image)
    with pytest.raises(SystemExit, match="broken.pt: its weights hold NaN"):
        hmtl.main(["--predict", str(image), "--checkpoint", str(tmp_path / "broken.pt"), "--out", str(tmp_path / "p")])
    with pytest.raises(SystemExit, match="broken.pt: its weights hold NaN"):
        hmtl.main(["--export", str(tmp_path / "e"), "--checkpoint", str(tmp_path / "broken.pt")])


def test_best_pt_is_repaired_when_a_run_stopped_between_the_two_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(hmtl, "selection_score", lambda row, prefix: -row["epoch"])  # every epoch is the best
    real = hmtl.save_checkpoint

    def killed_before_best(path, state):
        if path.name == "best.pt" and state["epoch"] == 2:
            raise KeyboardInterrupt  # as a kill between writing last.pt and best.pt
        real(path, state)

    monkeypatch.setattr(hmtl, "save_checkpoint", killed_before_best)
    with pytest.raises(KeyboardInterrupt):
        hmtl.main(tiny_args(tmp_path, "--epochs", "2"))
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["best_epoch"] == 2
    monkeypatch.setattr(hmtl, "save_checkpoint", real)
    summary = hmtl.main(tiny_args(tmp_path, "--epochs", "3", "--resume"))
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["epoch"] == summary["best_pt"]["epoch"] == 3
    hmtl.repair_best(tmp_path / "run", {**torch.load(tmp_path / "run" / "last.pt", weights_only=True)})
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == 3


class FullDisk:
    """open() for hmtl.py whose files accept `room` bytes, then fail as a full disk does."""

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
    monkeypatch.setattr(hmtl, "open", FullDisk(room=1_000_000), raising=False)
    with pytest.raises(SystemExit, match="cannot write .*last.pt: no space left on device .*MiB free there.*"
                                         "last.pt keeps its previous content"):
        hmtl.main(tiny_args(tmp_path, "--epochs", "2", "--resume"))
    assert not list((tmp_path / "run").glob("*.tmp"))
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()
    assert hmtl.main(tiny_args(tmp_path, "--epochs", "2", "--resume"))["epochs"] == 2


def test_a_new_run_never_replaces_a_finished_one_without_overwrite(tmp_path):
    hmtl.main(tiny_args(tmp_path, "--epochs", "1"))
    (tmp_path / "run" / "last.pt").unlink()
    finished = (tmp_path / "run" / "summary.json").read_text()
    with pytest.raises(SystemExit, match="already holds a run .*summary.json.*--overwrite to replace it"):
        hmtl.main(tiny_args(tmp_path, "--epochs", "1"))
    assert (tmp_path / "run" / "summary.json").read_text() == finished
    hmtl.main(tiny_args(tmp_path, "--epochs", "1", "--seed", "5", "--overwrite"))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["seed"] == 5


def test_resume_refuses_settings_that_differ_from_the_run(tmp_path):
    hmtl.main(tiny_args(tmp_path, "--epochs", "1"))
    with pytest.raises(hmtl.UsageError, match=r"--resume continues .* as it began: --lr 0.01 \(the run has 0.001\), "
                                              r"--task puzzle \(the run has none\); leave them out"):
        hmtl.main(tiny_args(tmp_path, "--epochs", "2", "--resume", "--lr", "0.01", "--task", "puzzle"))
    assert hmtl.main(tiny_args(tmp_path, "--epochs", "2", "--resume", "--lr", "0.001"))["epochs"] == 2


def test_ablation_and_pretraining_modes(tmp_path):
    without = hmtl.main(tiny_args(tmp_path, "--task", "puzzle", "--no-ssh", out="no_ssh"))
    assert "train_ss_loss" in without and without["train_ss_loss"] == 0 and "val_acc_puzzle" not in without
    pre = hmtl.main(tiny_args(tmp_path, "--task", "rotation", "--stage", "pretrain", out="pre"))
    assert "val_mae_mean" not in pre and pre["val_acc_rotation"] > 0
    state = torch.load(tmp_path / "pre" / "last.pt", weights_only=True)["model"]
    model = hmtl.HMTL("resnet18", 3, "catreg", 3)
    hmtl.load_backbone(model, str(tmp_path / "pre" / "last.pt"), "resnet18")
    assert torch.equal(model.state_dict()["stages.3.1.conv2.weight"], state["stages.3.1.conv2.weight"])
    hmtl.main(tiny_args(tmp_path, "--task", "puzzle", "--init", str(tmp_path / "pre" / "last.pt"), out="fine"))
    half = hmtl.main(tiny_args(tmp_path, "--task", "puzzle", "--ss-fraction", "0.5", out="half"))
    assert half["train_ss_loss"] > 0 and "val_acc_puzzle" in half


def test_a_fraction_of_each_batch_is_shuffled_and_the_rest_left_alone():
    images = torch.randint(0, 256, (400, 16, 16, 3), dtype=torch.uint8)
    cfg = {"aug": "0", "grid": 2, "flip": 0.0, "ss_fraction": 0.25, "data": "synthetic"}
    rt = hmtl.argparse.Namespace(device=torch.device("cpu"), rows=slice(None))
    x, _, perm, rot, shuffled = hmtl.prepare(images, torch.zeros(400, 3), cfg, torch.Generator().manual_seed(0), 400,
                                             rt, task="puzzle", train=True)
    assert 0.17 < shuffled.float().mean() < 0.33
    identity = (perm == torch.arange(4)).all(1)
    assert identity[~shuffled].all() and (~identity[shuffled]).float().mean() > 0.9  # 1/24 stay by chance
    plain = hmtl.shuffle_tiles_normalize(images, *hmtl.sample_tiles(400, 2, "none"))
    assert torch.equal(x[~shuffled], plain[~shuffled])


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


def test_help_shows_the_defaults_the_presets_hold(monkeypatch):
    text = " ".join(hmtl.get_args_parser().format_help().split())
    assert "backbone (default: resnet50; quick preset resnet18)" in text
    assert "(default: 300W-LP/AFLW2000/BIWI 20 100, ETH-XGaze 30 40; quick preset 5)" in text
    monkeypatch.setitem(hmtl.QUICK, "epochs", 7)
    assert "(default: 110; quick preset 7)" in " ".join(hmtl.get_args_parser().format_help().split())


def test_imagenet_init_takes_the_2021_weights_unless_v2_is_asked(monkeypatch):
    import torchvision
    weights = torchvision.models.ResNet50_Weights
    assert hmtl.imagenet_weights("imagenet", "resnet50") is weights.IMAGENET1K_V1
    assert hmtl.imagenet_weights("imagenet-v2", "resnet50") is weights.IMAGENET1K_V2
    with pytest.raises(hmtl.UsageError, match="no IMAGENET1K_V2 weights for resnet18"):
        config("--init", "imagenet-v2", "--arch", "resnet18")
    asked = []
    source = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict",
                        lambda self, *a, **k: asked.append(self) or source)
    model = hmtl.HMTL("resnet18", 3)
    hmtl.load_backbone(model, "imagenet", "resnet18")
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
]


@pytest.mark.parametrize("args,message", BAD_FLAGS[:4])
def test_bad_flags_exit_2_with_one_line_from_the_command_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


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
    result = run_cli(*args)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_corrupt_checkpoints_and_existing_runs_are_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="bad.pt: not a readable checkpoint"):
        hmtl.main(["--eval-only", "--checkpoint", str(bad)])
    with pytest.raises(SystemExit, match="checkpoint not found"):
        hmtl.main(tiny_args(tmp_path, "--resume"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="already holds a run"):
        hmtl.main(tiny_args(tmp_path))


def test_eval_only_refuses_training_flags(tmp_path):
    hmtl.main(tiny_args(tmp_path, "--epochs", "1"))
    with pytest.raises(hmtl.UsageError, match="--eval-only evaluates the run as it was trained: --lr 0.5"):
        hmtl.main(["--eval-only", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--lr", "0.5"])


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


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chosen=st.dictionaries(st.sampled_from(sorted(FLAG_VALUES)), st.integers(0, 6), max_size=5))
def test_property_any_flags_train_a_tiny_run_or_exit_2_with_one_line(chosen, tmp_path_factory):
    import contextlib
    import io
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
