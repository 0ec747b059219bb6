"""What makes a run trustworthy, each behind one call named for what it guarantees: the device, the
processes and mixed precision (runtime); the weights a backbone starts from (load_backbone); a run
folder whose files appear whole or not at all, whose checkpoints resume a run exactly, and where
nothing that is not finite is ever saved (Run)."""
import contextlib
import csv
import errno
import fcntl
import io
import json
import math
import os
import shutil
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torchvision

from hmtl_flags import UsageError

RUN_FILES = ("config.json", "metrics.csv", "curves.png", "last.pt", "best.pt", "summary.json")
SPLIT_NAMES = {"train": "training", "val": "validation", "holdout": "held-out"}


# ----------------------------------------------------------------------------- device, processes, precision

def cpu_has_bf16():
    """Whether this CPU computes bf16 natively (AVX-512 BF16 / AMX on x86, BF16 on Arm): where it does
    not, bf16 is emulated and measured ~10x slower than fp32. HMTL_CPU_BF16=0 or 1 overrides it."""
    forced = os.environ.get("HMTL_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def runtime(cfg):
    """The device, this process's rank among `world` (torchrun sets RANK / WORLD_SIZE; rows: its share
    of every global batch) and the mixed precision (autocast, scaler) of a run."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    if cfg["sync_bn"] and world > 1 and not use_cuda:
        raise SystemExit("--sync-bn needs CUDA: SyncBatchNorm synchronises GPU processes only")
    if cfg["batch_size"] % world or cfg["batch_size"] // world < 2:
        raise SystemExit(f"--batch-size {cfg['batch_size']} (the global batch) must split evenly over the {world} "
                         f"processes, at least 2 images each (BatchNorm)")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    amp = cfg["amp"]
    if amp == "auto":  # bf16 where it is computed natively (GPUs of compute capability 8.0 and later, CPUs
        # with bf16 units); on older GPUs (T4, V100, RTX 20xx) fp16 with the GradScaler; else fp32
        amp = ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16") if use_cuda \
            else "bf16" if cpu_has_bf16() else "off"
    if amp == "fp16" and not use_cuda:
        raise UsageError("--amp fp16 needs a CUDA device; use bf16 or off on the CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return Namespace(device=device, rank=rank, world=world, rows=slice(rank, None, world), amp=amp,
                     autocast=lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
                     scaler=torch.amp.GradScaler(device.type, enabled=amp == "fp16"))


def rank0_first(rt, load):
    """load() in process 0 first -- it may build a cache the others then read -- then in the others."""
    if rt.world > 1 and rt.rank > 0:
        dist.barrier()
    result = load()
    if rt.world > 1 and rt.rank == 0:
        dist.barrier()
    return result


def sum_over_processes(t, rt):
    if rt.world > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def summed_over_processes(sums, rt):
    """{name: tensor} summed over the processes in one all-reduce: {name: float, or list for a vector}."""
    flat = sum_over_processes(torch.cat([t.reshape(-1) for t in sums.values()]), rt).tolist()
    starts = np.cumsum([0] + [t.numel() for t in sums.values()])
    return {name: flat[a:b] if t.dim() else flat[a] for (name, t), a, b in zip(sums.items(), starts, starts[1:])}


# ----------------------------------------------------------------------------- a network's first weights

IMAGENET_WEIGHTS = {"imagenet": "IMAGENET1K_V1", "imagenet-v2": "IMAGENET1K_V2"}


def imagenet_weights(init, arch):
    """The torchvision weights that --init names for `arch`: IMAGENET1K_V1, the recipe a 2021 ResNet50
    came from, or IMAGENET1K_V2, torchvision's newer one."""
    enum = torchvision.models.get_model_weights(arch)
    if not hasattr(enum, IMAGENET_WEIGHTS[init]):
        raise UsageError(f"--init {init}: torchvision has no {IMAGENET_WEIGHTS[init]} weights for {arch}")
    return getattr(enum, IMAGENET_WEIGHTS[init])


def load_backbone(model, init, arch):
    """--init: the backbone of torchvision's ImageNet weights, or of a file (a torchvision state dict or
    an hmtl checkpoint, e.g. from --stage pretrain). The heads stay as initialised."""
    if init in IMAGENET_WEIGHTS:
        try:
            state = imagenet_weights(init, arch).get_state_dict(progress=True)
        except Exception as e:
            raise SystemExit(f"--init {init}: cannot download torchvision's weights ({type(e).__name__}); "
                             f"fetch them once elsewhere and pass the file: --init PATH") from e
    else:
        state = load_checkpoint(init)
        state = state.get("model", state)
    rename = {"conv1.": "stem.0.", "bn1.": "stem.1.",
              **{f"layer{k}.": f"stages.{k - 1}." for k in range(1, 5)}}
    for old, new in rename.items():
        state = {new + k[len(old):] if k.startswith(old) else k: v for k, v in state.items()}
    wanted = {k: v.shape for k, v in model.state_dict().items() if k.startswith(("stem.", "stages."))}
    if {k: v.shape for k, v in state.items() if k.startswith(("stem.", "stages."))} != wanted:
        raise SystemExit(f"--init {init}: does not hold a {arch} backbone")
    model.load_state_dict({k: state[k] for k in wanted}, strict=False)


# ----------------------------------------------------------------------------- files written whole

def write_atomically(path, write):
    """write(file) into path.tmp, then rename it to path. On failure (a full disk...) the partial file
    is removed, `path` keeps its previous content, and the error names the path and the cause."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError after it
        tmp.unlink(missing_ok=True)
        os_error = e
        while os_error is not None and not isinstance(os_error, OSError):
            os_error = os_error.__context__
        if os_error is None:
            raise
        cause = "no space left on device" if os_error.errno in (errno.ENOSPC, errno.EDQUOT) \
            else os_error.strerror or str(os_error)
        free = shutil.disk_usage(path.parent).free / 2 ** 20
        kept = f"{path} keeps its previous content" if path.exists() else f"{path} was not written"
        raise SystemExit(f"cannot write {path}: {cause} ({free:.0f} MiB free there); {kept}") from None


def save_checkpoint(path, state):
    write_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path):
    if not Path(path).is_file():
        raise SystemExit(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message advises loading code from the file: hmtl never does
        raise SystemExit(f"{path}: not a readable checkpoint ({type(e).__name__}): damaged, or it holds more "
                         f"than tensors and plain values, which hmtl never loads") from None


def run_files(out):
    return [f for f in RUN_FILES if (Path(out) / f).exists()]


def check_new_folder(out, overwrite):
    """A new run may start in `out` unless it holds another run's files and --overwrite is not given;
    those files are removed only once the new run is about to write (Run.start)."""
    found = run_files(out)
    if found and not overwrite:
        raise SystemExit(f"{out} already holds a run ({', '.join(found)}): add --resume to continue it, "
                         f"--overwrite to replace it, or pick another --out")


def make_folder(path, flag):
    """mkdir -p, checked writable by writing a file there: or one line naming the flag, the path and why not."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise SystemExit(f"{flag} {path}: cannot write a folder there ({e.strerror or e})") from None


LOCKED = set()  # the descriptors of the run folders this process holds locked


def forget_locks():
    """In a forked child (a loader worker, a renderer): its copies of the locks go, so that a run killed
    with -9 frees its folder when it dies, not when its children notice."""
    while LOCKED:
        os.close(LOCKED.pop())


os.register_at_fork(after_in_child=forget_locks)


def lock_folder(out):
    """The run folder, created and locked for this process: a second process writing into it is
    refused instead of mixing two runs' files. release_folder(descriptor) lets it go."""
    make_folder(out, "--out")
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SystemExit(f"{out} is in use by another hmtl process: wait for it to end, or pick another --out") \
            from None
    LOCKED.add(fd)
    return fd


def release_folder(fd):
    LOCKED.discard(fd)
    os.close(fd)


def save_best(out):
    """best.pt: what last.pt holds now, as a second name of that file where the filesystem allows (no
    second write), else a copy; the previous best.pt stays whole until the new one replaces it."""
    last, best, tmp = Path(out) / "last.pt", Path(out) / "best.pt", Path(out) / "best.pt.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(last, tmp)
    except OSError:
        write_atomically(tmp, lambda f: f.write(last.read_bytes()))
    os.replace(tmp, best)


def repair_best(out, state):
    """last.pt is written before best.pt: if a run was stopped between the two, best.pt still holds an
    older epoch while last.pt names itself the best. Then last.pt is what best.pt must hold."""
    best = Path(out) / "best.pt"
    if state.get("best_epoch") == state["epoch"] and \
            (not best.is_file() or load_checkpoint(best)["epoch"] != state["epoch"]):
        save_best(out)


# ----------------------------------------------------------------------------- a run's folder

class Run:
    """The folder cfg["out"] of a run: config.json, metrics.csv, curves.png, last.pt, best.pt and
    summary.json, locked while the run is open (`with Run(...)`). Only process 0 writes. Reported
    figures come from the final epoch; best.pt is written only where a checkpoint may be chosen: on a
    held-out part of the training set (--holdout), or on a validation set that is no test set
    (synthetic heads); summary.json names the set that chose it."""

    def __init__(self, cfg, rt, state, val_is_test_set, score):
        """score(row, prefix): what best.pt minimises over the epochs' rows, on the set `prefix` names."""
        self.cfg, self.rt, self.state, self.out, self.score = cfg, rt, state, Path(cfg["out"]), score
        self.last, self.writes = self.out / "last.pt", rt.rank == 0
        self.chooser = "holdout" if cfg["holdout"] else None if val_is_test_set else "val"
        self.history, self.best_epoch = [], None
        if state and rt.world > 1:  # each process read last.pt itself; a run still writing it splits them
            epochs = torch.tensor([state["epoch"], -state["epoch"]], device=rt.device)
            dist.all_reduce(epochs, dist.ReduceOp.MAX)
            newest, oldest = epochs[0].item(), -epochs[1].item()
            if newest != oldest:
                raise SystemExit(f"the processes read {self.last} at different epochs ({oldest} to {newest}): "
                                 f"another run is still writing to {self.out}; stop it, then --resume again")
        self.made = self.writes and not self.out.exists()
        self.lock = lock_folder(self.out) if self.writes else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.lock is not None:
            release_folder(self.lock)
        if self.made and not any(self.out.iterdir()):  # a start refused before writing leaves no trace
            self.out.rmdir()

    def start(self, model, optimizer, scheduler, train_set, evaluated, names):
        """Restores a resumed run exactly where it stopped, writes config.json and says what runs;
        returns the first epoch to train. `evaluated`: {prefix: dataset}, "val" first."""
        if self.state:
            model.load_state_dict(self.state["model"])
            optimizer.load_state_dict(self.state["optimizer"])
            scheduler.load_state_dict(self.state["scheduler"])
            self.rt.scaler.load_state_dict(self.state["scaler"])
            torch.set_rng_state(self.state["rng"]["cpu"])
            if self.rt.device.type == "cuda" and self.state["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(self.state["rng"]["cuda"], self.rt.device)
            self.history, self.best_epoch = self.state["history"], self.state.get("best_epoch")
            if self.writes and self.chooser:
                repair_best(self.out, self.state)
        self.names = names
        self.sizes = {"train": len(train_set), **{prefix: len(data) for prefix, data in evaluated.items()}}
        if self.writes:
            if not self.state:  # a new run: what an older one left (--overwrite) goes now, not before
                for f in run_files(self.out):
                    (self.out / f).unlink()
            write_atomically(self.out / "config.json", lambda f: f.write(json.dumps(self.cfg, indent=1).encode()))
            processes = f"{self.rt.world} process{'es' if self.rt.world > 1 else ''}"
            sizes = ", ".join(f"{n} {SPLIT_NAMES[p]}" for p, n in self.sizes.items())
            print(f"{'resuming' if self.state else 'starting'} {self.out} at epoch {len(self.history) + 1} on "
                  f"{self.rt.device} ({processes}, amp {self.rt.amp})\n{json.dumps(self.cfg)}\n{sizes} images")
        return len(self.history)

    def kept(self, epoch):
        return f"{self.last} holds epoch {epoch}" if epoch else "no checkpoint was written yet"

    @contextlib.contextmanager
    def epoch(self, epoch):
        """Yields the epoch's row to fill. Ctrl-C and a loss that is not finite stop the run with one line
        saying what last.pt holds: the last finished epoch."""
        row, began = {"epoch": epoch + 1}, time.perf_counter()
        try:
            yield row
        except FloatingPointError as e:
            raise SystemExit(f"{e}: training stopped; {self.kept(epoch)}") from None
        except KeyboardInterrupt:
            then = "continue with --resume" if epoch else "start it again with --overwrite"
            raise SystemExit(f"interrupted in epoch {epoch + 1}: {self.kept(epoch)}; {then}") from None
        row["seconds"] = time.perf_counter() - began

    def save(self, row, model, optimizer, scheduler):
        """The finished epoch: last.pt, best.pt where this epoch is the best so far, and metrics.csv. A
        metric or weight that is not finite stops the run and nothing of the epoch is written."""
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            bad.append("the weights")
        if bad:
            raise SystemExit(f"epoch {row['epoch']}: {', '.join(bad)} became NaN or infinite (is the learning rate "
                             f"too high?): training stopped, nothing of this epoch was written; "
                             f"{self.kept(row['epoch'] - 1)}")
        self.history.append(row)
        if self.chooser and (self.best_epoch is None or self.score(row, self.chooser) <
                             self.score(self.history[self.best_epoch - 1], self.chooser)):
            self.best_epoch = row["epoch"]
        if not self.writes:
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": self.rt.scaler.state_dict(),
                 "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.rt.device)
                         if self.rt.device.type == "cuda" else None},
                 "epoch": row["epoch"], "config": self.cfg, "history": self.history, "best_epoch": self.best_epoch}
        save_checkpoint(self.last, state)
        if self.best_epoch == row["epoch"]:
            save_best(self.out)
        text = io.StringIO()
        writer = csv.DictWriter(text, list(dict.fromkeys(k for r in self.history for k in r)))
        writer.writeheader()
        writer.writerows(self.history)
        write_atomically(self.out / "metrics.csv", lambda f: f.write(text.getvalue().encode()))
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))

    def chosen_on(self):
        """What summary.json says of best.pt: the set that chose it, or why there is none."""
        if self.chooser == "holdout":
            return f"{self.sizes['holdout']} images held out of the training set (--holdout {self.cfg['holdout']})"
        if self.chooser == "val":
            return f"the validation set ({self.cfg['val_data']}, not a test set)"
        return (f"not written: the validation set ({self.cfg['val_data']}) is a test set; --holdout F chooses on a "
                f"part of the training set")

    def finish(self, baseline):
        """summary.json: the final epoch's figures beside `baseline`'s (those of predicting the training
        mean); curves.png."""
        final = self.history[-1]
        summary = {k: v for k, v in final.items() if k.startswith(("val_", "holdout_", "train_"))} | baseline
        summary |= {"best_pt": {"epoch": self.best_epoch, "chosen_on": self.chosen_on()}, "epochs": len(self.history),
                    "train_images": self.sizes["train"], "val_images": self.sizes["val"], "amp": self.rt.amp,
                    "seconds": sum(r["seconds"] for r in self.history), "config": self.cfg}
        if self.writes:
            plot_curves(self.out, self.history, self.names, summary.get("baseline_mae_mean"))
            write_atomically(self.out / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
            if "val_mae_mean" in summary:
                print(f"final val MAE {summary['val_mae_mean']:.2f}° (" +
                      ", ".join(f"{a} {summary['val_mae_' + a]:.2f}" for a in self.names) +
                      f"); predicting the training mean: {summary['baseline_mae_mean']:.2f}°. Run folder: {self.out}")
        if self.rt.world > 1:
            dist.destroy_process_group()
        return summary


def plot_curves(out, history, names, baseline):
    """curves.png: training loss and validation MAE per epoch, beside the MAE of predicting the training mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [row["train_loss"] for row in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss (eq. 1)", title="training loss")
    if "val_mae_mean" in history[-1]:
        for name in [f"val_mae_{a}" for a in names] + ["val_mae_mean"]:
            right.plot(epochs, [row[name] for row in history], marker="o", label=name[8:])
        if "holdout_mae_mean" in history[-1]:
            right.plot(epochs, [row["holdout_mae_mean"] for row in history], ls=":", marker=".", label="held out")
        right.axhline(baseline, color="grey", ls="--", label="training mean")
        right.set(ylabel="validation MAE (degrees)")
    else:  # SS pre-training: no pose heads
        for name in [k for k in history[-1] if k.startswith("val_acc_")]:
            right.plot(epochs, [row[name] for row in history], marker="o", label=name)
        right.set(ylabel="SS accuracy")
    right.set(xlabel="epoch", title=out.name)
    right.legend()
    for axes in (left, right):
        axes.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    write_atomically(out / "curves.png", lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
