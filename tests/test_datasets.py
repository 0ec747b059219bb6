"""The readers, in the datasets' published formats: the real AFLW2000 sample, and fabricated
300W-LP, AFLW2000, ETH-XGaze and BIWI sets that go through training and evaluation."""
import json
import os

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat, savemat

import hmtl
from conftest import tiny_args


# ----------------------------------------------------------------------------- the real AFLW2000 sample

def test_reader_returns_the_labels_of_every_mat_file(aflw_sample):
    dataset = hmtl.PoseFiles(aflw_sample, 64, train=False, seed=0, drop_out_of_range=False)
    assert len(dataset) == 100 and dataset.dropped == 0
    for path, angles in zip(dataset.files, dataset.angles):
        pitch, yaw, roll = loadmat(path.with_suffix(".mat"))["Pose_Para"][0, :3] * 180 / np.pi
        assert angles.tolist() == pytest.approx([yaw, pitch, roll], abs=1e-4)


def test_reduced_protocol_leaves_out_exactly_the_five_beyond_99_degrees(aflw_sample):
    reduced = hmtl.PoseFiles(aflw_sample, 64, train=False, seed=0, drop_out_of_range=True)
    assert (len(reduced), reduced.dropped) == (95, 5)
    assert np.abs(reduced.angles).max() <= 99
    every = hmtl.PoseFiles(aflw_sample, 64, train=False, seed=0, drop_out_of_range=False)
    assert sorted(set(every.files) - set(reduced.files)) == \
        sorted(f for f, a in zip(every.files, every.angles) if np.abs(a).max() > 99)


def test_crops_hold_the_face(aflw_sample):
    """The test crop (HopeNet's margins, shorter side to 64, centre crop) contains the face: the
    visible landmarks centre in it and almost all fall inside (the centre crop can clip the chin
    or forehead of a tall, profile box, as HopeNet's transform does)."""
    dataset = hmtl.PoseFiles(aflw_sample, 64, train=False, seed=0, drop_out_of_range=False)
    inside = []
    for i, path in enumerate(dataset.files):
        image, _ = dataset[i]
        assert image.shape == (64, 64, 3) and image.dtype == torch.uint8
        pt2d = loadmat(path.with_suffix(".mat"))["pt2d"]
        x0, y0, x1, y1 = hmtl.face_box(pt2d, False, None)
        ratio = 64 / min(x1 - x0, y1 - y0)
        left, top = ((x1 - x0) * ratio - 64) // 2, ((y1 - y0) * ratio - 64) // 2
        visible = pt2d[:, (pt2d >= 0).all(0)]
        u, v = (visible[0] - x0) * ratio - left, (visible[1] - y0) * ratio - top
        inside.append(((u >= 0) & (u < 64) & (v >= 0) & (v < 64)).mean())
        assert 16 < u.mean() < 48 and 16 < v.mean() < 48, path.name
    assert np.mean(inside) > 0.98 and min(inside) > 0.6


def test_a_face_without_visible_landmarks_gets_no_box():
    assert hmtl.face_box(-np.ones((2, 21)), False, None) is None
    box = hmtl.face_box(np.array([[10.0, 30, -1], [20, 60, -1]]), False, None)
    # k = 0.2 on the 20 x 40 box: x_min -= 0.4·20, y_min -= 0.4·40, then, as HopeNet does, the
    # right and bottom margins use the moved sides: x_max += 0.4·(30 - 2), y_max += 0.12·(60 - 4)
    assert box == (2, 4, 41, 66)


# ----------------------------------------------------------------------------- fabricated datasets

def fake_300wlp(root, folders=("AFW", "HELEN_Flip"), per_folder=20, seed=0, beyond=0):
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
            face, marks, _ = hmtl.render_head(yaw, pitch, roll, 80, rng)
            canvas = Image.new("RGB", (160, 140), (40, 90, 20))
            canvas.paste(Image.fromarray(face), (40, 30))
            canvas.save(root / folder / f"{folder}_{i}.jpg", quality=95)
            pts = np.array([m for m in marks.values()]).T + [[40], [30]]
            pts = np.concatenate([pts, [[60, 100], [90, 95]]], 1)
            savemat(root / folder / f"{folder}_{i}.mat", {
                "Pose_Para": np.array([[np.radians(pitch), np.radians(yaw), np.radians(roll), 0, 0, 0, 1]]),
                "pt2d": pts})
            savemat(root / "landmarks" / folder / f"{folder}_{i}_pts.mat", {"pts_2d": pts.T})
    return root


def fake_xgaze(root, subjects, per_subject=12, seed=0):
    """ETH-XGaze's subjectXXXX.h5: face_patch N x 224 x 224 x 3 BGR, face_head_pose N x 2 (pitch, yaw)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s in subjects:
        poses = np.radians(rng.uniform(-40, 40, (per_subject, 2)))
        faces = np.stack([hmtl.render_head(np.degrees(y), np.degrees(p), 0, 224, rng, supersample=1)[0][..., ::-1]
                          for p, y in poses])
        with h5py.File(root / f"subject{s:04d}.h5", "w") as f:
            f["face_patch"], f["face_head_pose"] = faces, poses
            f["face_gaze"] = np.zeros((per_subject, 2))
    return root


def fake_biwi(path, n=24, seed=0):
    """FSA-Net's BIWI_noTrack.npz: image N x 64 x 64 x 3 (BGR), pose N x 3 yaw, pitch, roll degrees."""
    rng = np.random.default_rng(seed)
    pose = rng.uniform(-60, 60, (n, 3))
    images = np.stack([hmtl.render_head(*p, 64, rng)[0][..., ::-1] for p in pose])
    np.savez(path, image=images, pose=pose)
    return path


def test_300wlp_trains_and_aflw2000_evaluates_end_to_end(tmp_path):
    train = fake_300wlp(tmp_path / "300W_LP", beyond=2)
    test = fake_300wlp(tmp_path / "AFLW2000", folders=("",), per_folder=30, seed=1, beyond=3)
    args = tiny_args(tmp_path, "--data", "300wlp", "--data-root", str(train), "--val-root", str(test),
                     "--task", "puzzle", "--epochs", "2", "--batch-size", "16")
    summary = hmtl.main(args)
    assert summary["train_images"] == 36  # 2 x 20 files, the 2 x 2 beyond ±99° left out
    assert summary["val_images"] == 30 and summary["config"]["val_data"] == "aflw2000"
    assert {"val_mae_yaw", "val_mae_pitch", "val_mae_roll", "val_acc_puzzle"} <= set(summary)
    reduced = hmtl.main(["--eval-only", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--aflw2000-reduced"])
    assert reduced["val_images"] == 27 and np.isfinite(reduced["val_mae_mean"])


def test_cache_equals_direct_decoding_pixel_for_pixel_and_follows_its_source(tmp_path):
    root = fake_300wlp(tmp_path / "300W_LP", per_folder=10)
    cfg = hmtl.resolve_config(hmtl.get_args_parser().parse_args(
        ["--data", "300wlp", "--data-root", str(root), "--img-size", "48", "--workers", "2", "--seed", "3"]))
    direct = hmtl.load_split(cfg, True)
    cached = hmtl.load_split({**cfg, "cache": str(tmp_path / "cache")}, True)
    assert isinstance(direct, hmtl.PoseFiles) and isinstance(cached, hmtl.PoseArrays)
    assert len(direct) == len(cached) == 20
    for i in range(20):
        assert torch.equal(direct[i][0], cached[i][0]) and torch.equal(direct[i][1], cached[i][1])
    folder = tmp_path / "cache" / "300wlp-train-48px"
    built = (folder / "images.npy").stat().st_mtime_ns
    hmtl.load_split({**cfg, "cache": str(tmp_path / "cache")}, True)
    assert (folder / "images.npy").stat().st_mtime_ns == built  # reused
    other_seed = hmtl.load_split({**cfg, "cache": str(tmp_path / "cache"), "seed": 4}, True)  # other random margins
    assert json.loads((folder / "meta.json").read_text())["seed"] == 4
    assert not all(torch.equal(other_seed[i][0], cached[i][0]) for i in range(20))
    jpg = root / "AFW" / "AFW_3.jpg"
    Image.open(jpg).transpose(Image.FLIP_LEFT_RIGHT).save(jpg)  # the source changes
    os.utime(jpg, (1, 1))
    rebuilt = hmtl.load_split({**cfg, "cache": str(tmp_path / "cache")}, True)
    changed = hmtl.load_split(cfg, True)
    assert all(torch.equal(rebuilt[i][0], changed[i][0]) for i in range(20))


def test_ethxgaze_subjects_train_and_validate_on_yaw_and_pitch(tmp_path):
    root = fake_xgaze(tmp_path / "xgaze", subjects=[0, 1, 2, 3, 108, 109, 111])
    summary = hmtl.main(tiny_args(tmp_path, "--data", "ethxgaze", "--data-root", str(root), "--train-subjects", "2",
                                  "--task", "puzzle", "--batch-size", "8", "--cache", str(tmp_path / "cache")))
    assert summary["train_images"] == 24 and summary["val_images"] == 36  # subjects 0, 1; 108, 109, 111
    assert summary["config"]["head"] == "reg" and summary["config"]["dropout"] == 0.4
    assert "val_mae_roll" not in summary and {"val_mae_yaw", "val_mae_pitch", "baseline_mae_mean"} <= set(summary)
    assert hmtl.xgaze_subjects(root, "3,", ()) == [3] and hmtl.xgaze_subjects(root, "3", (1,)) == [0, 2, 3]
    # BGR in the file, RGB out of the reader
    with h5py.File(root / "subject0108.h5") as f:
        bgr = f["face_patch"][0]
    rgb, angles = hmtl.XGazeFiles(root, [108], 224)[0]
    assert np.array_equal(rgb.numpy(), bgr[..., ::-1])


def test_biwi_npz_evaluates_a_trained_model(tmp_path):
    npz = fake_biwi(tmp_path / "BIWI_noTrack.npz")
    hmtl.main(tiny_args(tmp_path, "--epochs", "1"))
    metrics = hmtl.main(["--eval-only", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--val-data", "biwi",
                         "--val-root", str(tmp_path)])
    assert metrics["val_images"] == 24 and metrics["val_data"] == "biwi"
    data = hmtl.biwi_arrays(npz, 32)
    with np.load(npz) as d:
        assert np.allclose(data.angles, d["pose"]) and data.images.shape == (24, 32, 32, 3)


def test_missing_or_malformed_data_names_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="missing or empty. Get ETH-XGaze"):
        hmtl.main(tiny_args(tmp_path, "--data", "ethxgaze", "--data-root", str(tmp_path / "empty")))
    with pytest.raises(SystemExit, match="subject0001.h5: not an ETH-XGaze subject file"):
        hmtl.XGazeFiles(tmp_path, [1], 64)
    (tmp_path / "bad.npz").write_bytes(b"zip?")
    with pytest.raises(SystemExit, match="bad.npz: not FSA-Net's BIWI"):
        hmtl.biwi_arrays(tmp_path / "bad.npz", 64)
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.jpg")
    savemat(tmp_path / "a" / "x.mat", {"something": 1})
    with pytest.raises(SystemExit, match="x.mat: not a 300W-LP / AFLW2000 label file"):
        hmtl.PoseFiles(tmp_path / "a", 32, False, 0, False)
