import os
import subprocess
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n K: K processes share the cores, one thread each (before torch)
    os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

import hmtl
import hmtl_data
import hmtl_runs

REPO = Path(__file__).resolve().parent.parent
# The real AFLW2000 sample lies beside the repository in the project's workspace; tests that need
# it skip where it is absent.
AFLW_SAMPLE = REPO.parent / "shared" / "data" / "aflw2000-sample"


def tiny_args(tmp_path, *extra, out="run"):
    """Command-line flags for a run that trains in seconds on a CPU."""
    return ["--arch", "resnet18", "--img-size", "32", "--batch-size", "32", "--synthetic-train", "64",
            "--synthetic-val", "16", "--epochs", "2", "--milestones", "100", "--workers", "0", "--device", "cpu",
            "--cache", str(tmp_path.parent / "cache"), "--out", str(tmp_path / out), *extra]


def config(*flags):
    """The full config hmtl.py resolves from these flags."""
    return hmtl.config(list(flags))


def expected_amp():
    """What --amp auto picks on this CPU, as the code decides it (the tests may force either way)."""
    return "bf16" if hmtl_runs.cpu_has_bf16() else "off"


def fake_300wlp(root, folders=("AFW", "HELEN_Flip"), per_folder=20, seed=0, beyond=0, landmarks=68):
    """300W-LP's layout: <subset>/<name>.jpg + .mat (Pose_Para in radians, pt2d 2 x 68), plus a
    landmarks/ tree of .mat files with no image (ignored)."""
    rng = np.random.default_rng(seed)
    for folder in folders:
        (root / folder).mkdir(parents=True)
        (root / "landmarks" / folder).mkdir(parents=True)
        for i in range(per_folder):
            yaw, pitch, roll = rng.uniform(-80, 80), rng.uniform(-50, 50), rng.uniform(-40, 40)
            if i < beyond:
                yaw = 120.0
            face, marks, _ = hmtl_data.render_head(yaw, pitch, roll, 80, rng)
            canvas = Image.new("RGB", (160, 140), (40, 90, 20))
            canvas.paste(Image.fromarray(face), (40, 30))
            canvas.save(root / folder / f"{folder}_{i}.jpg", quality=95)
            pts = np.array([m for m in marks.values()]).T + [[40], [30]]
            pts = np.concatenate([pts, [[60, 100], [90, 95]]], 1)
            pts = np.concatenate([pts, np.repeat(pts.mean(1, keepdims=True), landmarks - pts.shape[1], 1)], 1)
            savemat(root / folder / f"{folder}_{i}.mat", {
                "Pose_Para": np.array([[np.radians(pitch), np.radians(yaw), np.radians(roll), 0, 0, 0, 1]]),
                "pt2d": pts})
            savemat(root / "landmarks" / folder / f"{folder}_{i}_pts.mat", {"pts_2d": pts.T})
    return root


def fake_biwi(path, n=24, seed=0, size=64, one_look=False):
    """FSA-Net's BIWI_noTrack.npz: image N x S x S x 3 (BGR), pose N x 3 yaw, pitch, roll degrees. With
    one_look every head has the same skin, hair, light, scale and background: only the pose varies."""
    rng = np.random.default_rng(seed)
    pose = rng.uniform(-60, 60, (n, 3))
    looks = (np.random.default_rng(7) if one_look else rng for _ in range(n))
    images = np.stack([hmtl_data.render_head(*p, size, look)[0][..., ::-1] for p, look in zip(pose, looks)])
    np.savez(path, image=images, pose=pose)
    return path


@pytest.fixture(scope="session")
def learned(tmp_path_factory):
    """{name: (run folder, summary)} of an SL and an HMTL run that learn pose in a few dozen steps: rendered
    heads of one look at 32 px, no augmentation, no warm-up (--no-rectify), in fp32 on any CPU."""
    folder = tmp_path_factory.mktemp("learned")
    train = fake_biwi(folder / "train.npz", n=512, seed=0, size=32, one_look=True)
    val = fake_biwi(folder / "val.npz", n=128, seed=1, size=32, one_look=True)
    common = ["--data", "biwi", "--data-root", str(train), "--val-root", str(val), "--img-size", "32",
              "--arch", "resnet18", "--batch-size", "32", "--no-rectify", "--aug", "0", "--flip", "0", "--amp", "off",
              "--workers", "0", "--device", "cpu"]
    runs = {"sl": ["--epochs", "2", "--milestones", "1"],
            "hmtl": ["--epochs", "5", "--milestones", "4", "--task", "rotation", "--ssl-weight", "1"]}
    return {name: (folder / name, hmtl.main(common + flags + ["--out", str(folder / name)]))
            for name, flags in runs.items()}


@pytest.fixture
def aflw_sample():
    if not AFLW_SAMPLE.is_dir():
        pytest.skip(f"the AFLW2000 sample is not at {AFLW_SAMPLE}")
    return AFLW_SAMPLE


def run_cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, str(REPO / "hmtl.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)
