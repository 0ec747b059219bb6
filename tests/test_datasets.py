"""The readers, in the datasets' published formats: the real AFLW2000 sample, and fabricated
300W-LP, AFLW2000, ETH-XGaze and BIWI sets that go through training and evaluation."""
import json
import multiprocessing
import os
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat, savemat

import hmtl
import hmtl_data
from conftest import REPO, config, fake_300wlp, fake_biwi, tiny_args


# ----------------------------------------------------------------------------- the real AFLW2000 sample

def test_reader_returns_the_labels_of_every_mat_file(aflw_sample):
    dataset = hmtl_data.PoseFiles(aflw_sample, 64, seed=0, keep_beyond_99=True)
    assert len(dataset) == 100 and dataset.dropped == 0
    for path, angles in zip(dataset.files, dataset.angles):
        pitch, yaw, roll = loadmat(path.with_suffix(".mat"))["Pose_Para"][0, :3] * 180 / np.pi
        assert angles.tolist() == pytest.approx([yaw, pitch, roll], abs=1e-4)


def test_reduced_protocol_leaves_out_exactly_the_five_beyond_99_degrees(aflw_sample):
    reduced = hmtl_data.PoseFiles(aflw_sample, 64, seed=0)
    assert (len(reduced), reduced.dropped) == (95, 5)
    assert np.abs(reduced.angles).max() <= 99
    every = hmtl_data.PoseFiles(aflw_sample, 64, seed=0, keep_beyond_99=True)
    assert sorted(set(every.files) - set(reduced.files)) == \
        sorted(f for f, a in zip(every.files, every.angles) if np.abs(a).max() > 99)


def hopenet_aflw2000_box(pt2d):
    """HopeNet's code/datasets.py, class AFLW2000, __getitem__, transcribed: the box it crops."""
    x_min, y_min = min(pt2d[0, :]), min(pt2d[1, :])
    x_max, y_max = max(pt2d[0, :]), max(pt2d[1, :])
    k = 0.20
    x_min -= 2 * k * abs(x_max - x_min)
    y_min -= 2 * k * abs(y_max - y_min)
    x_max += 2 * k * abs(x_max - x_min)
    y_max += 0.6 * k * abs(y_max - y_min)
    return int(x_min), int(y_min), int(x_max), int(y_max)


def test_hopenet_protocol_gives_the_published_codes_boxes_to_the_pixel(aflw_sample):
    differ = 0
    for mat in sorted(aflw_sample.glob("*.mat")):
        pt2d = loadmat(mat)["pt2d"]
        assert hmtl_data.face_box(pt2d, protocol="hopenet") == hopenet_aflw2000_box(pt2d), mat.name
        visible = pt2d[:, (pt2d >= 0).all(0)]
        assert hmtl_data.face_box(pt2d, protocol="visible") == hopenet_aflw2000_box(visible)
        differ += hmtl_data.face_box(pt2d, protocol="visible") != hmtl_data.face_box(pt2d, protocol="hopenet")
    assert differ == 86  # the files with an invisible (-1) landmark


def hopenet_300wlp_box(pt2d, k):
    """HopeNet's code/datasets.py, class Pose_300W_LP, __getitem__, transcribed, for a given k."""
    x_min, y_min = min(pt2d[0, :]), min(pt2d[1, :])
    x_max, y_max = max(pt2d[0, :]), max(pt2d[1, :])
    x_min -= 0.6 * k * abs(x_max - x_min)
    y_min -= 2 * k * abs(y_max - y_min)
    x_max += 0.6 * k * abs(x_max - x_min)
    y_max += 0.6 * k * abs(y_max - y_min)
    return int(x_min), int(y_min), int(x_max), int(y_max)


def test_margins_follow_the_landmark_set_not_the_split():
    points = np.random.default_rng(0).uniform(100, 200, (2, 68))
    ks = [np.random.default_rng(seed).uniform(0.2, 0.4) for seed in range(20)]  # HopeNet: k ~ U[0.2, 0.4]
    for seed, k in enumerate(ks):
        assert hmtl_data.face_box(points, np.random.default_rng(seed)) == hopenet_300wlp_box(points, k)
    assert len(set(hmtl_data.face_box(points, np.random.default_rng(seed)) for seed in range(20))) > 10
    aflw = points[:, :21]
    assert hmtl_data.face_box(aflw, np.random.default_rng(1)) == hmtl_data.face_box(aflw, None) == \
        hopenet_aflw2000_box(aflw)  # 21 points: HopeNet's AFLW2000 margins, k = 0.2, for training too


def test_crops_hold_the_face(aflw_sample):
    """The crop (HopeNet's box and test transform) holds the face: its visible landmarks centre in it
    and almost all fall inside (the centre crop can clip the chin or forehead of a tall, profile box,
    as HopeNet's transform does)."""
    for protocol in ("visible", "hopenet"):
        dataset = hmtl_data.PoseFiles(aflw_sample, 64, seed=0, protocol=protocol, keep_beyond_99=True)
        inside = []
        for i, path in enumerate(dataset.files):
            image, _ = dataset[i]
            assert image.shape == (64, 64, 3) and image.dtype == torch.uint8
            pt2d = loadmat(path.with_suffix(".mat"))["pt2d"]
            x0, y0, x1, y1 = hmtl_data.face_box(pt2d, protocol=protocol)
            w, h = x1 - x0, y1 - y0
            size = (64, int(64 * h / w)) if w <= h else (int(64 * w / h), 64)
            left, top = int(round((size[0] - 64) / 2)), int(round((size[1] - 64) / 2))
            visible = pt2d[:, (pt2d >= 0).all(0)]
            u, v = (visible[0] - x0) * size[0] / w - left, (visible[1] - y0) * size[1] / h - top
            inside.append(((u >= 0) & (u < 64) & (v >= 0) & (v < 64)).mean())
            if protocol == "visible":
                assert 16 < u.mean() < 48 and 16 < v.mean() < 48, path.name
        assert np.mean(inside) > (0.98 if protocol == "visible" else 0.9) and min(inside) > 0.3


def test_square_crop_is_torchvisions_resize_then_center_crop():
    torchvision_transforms = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8))
    transform = torchvision_transforms.Compose([torchvision_transforms.Resize(32),
                                                torchvision_transforms.CenterCrop(32)])
    for box in [(10, 5, 60, 80), (0, 0, 130, 90), (-20, -10, 50, 45), (3, 7, 40, 44)]:
        want = np.asarray(transform(image.crop(box)))
        assert np.array_equal(hmtl_data.square_crop(image, box, 32), want), box


def test_aflw2000_flags_choose_its_protocol_at_evaluation(trained_on_300wlp, aflw_sample):
    """A checkpoint trained with the reduced protocol is evaluated on all 100 sample faces with
    --no-aflw2000-reduced, on the 95 within ±99° with --aflw2000-reduced, and cropped either way."""
    last, _ = trained_on_300wlp
    flags = ["--eval-only", "--checkpoint", str(last), "--val-data", "aflw2000", "--val-root", str(aflw_sample)]
    assert torch.load(last, weights_only=True)["config"]["aflw2000_reduced"] is True
    full = hmtl.main(flags + ["--no-aflw2000-reduced"])
    kept = hmtl.main(flags)
    assert (full["val_images"], kept["val_images"]) == (100, 95)
    visible = hmtl.main(flags + ["--crop", "visible"])
    assert visible["val_images"] == 95 and visible["val_mae_mean"] != kept["val_mae_mean"]


def mirrored_geometry(points, width):
    """Eye midpoint -> nose offset and eye-line slope of 68 landmarks after a left-right flip."""
    x, y = width - 1 - points[0], points[1]
    right_eye = np.array([x[42:48].mean(), y[42:48].mean()])  # the subject's eyes swap sides in the mirror
    left_eye = np.array([x[36:42].mean(), y[36:42].mean()])
    mid = (right_eye + left_eye) / 2
    return x[30] - mid[0], (left_eye[1] - right_eye[1]) / (left_eye[0] - right_eye[0])


def test_flip_mirrors_the_image_and_negates_yaw_and_roll_as_real_faces_require(aflw_sample):
    """Real AFLW2000 faces: in the 300W-LP convention yaw > 0 puts the nose left of the eyes and
    roll > 0 slopes the eye line down to the right. Mirrored, the faces must obey the same rules
    with the labels hmtl.flip gives them."""
    mats = [loadmat(m) for m in sorted(aflw_sample.glob("*.mat"))]
    images = torch.from_numpy(np.stack([np.asarray(Image.open(m.with_suffix(".jpg")).convert("RGB"))
                                        for m in sorted(aflw_sample.glob("*.mat"))]))
    pitch, yaw, roll = np.degrees(np.stack([m["Pose_Para"][0, :3] for m in mats])).T
    angles = torch.tensor(np.stack([yaw, pitch, roll], 1), dtype=torch.float32)
    draw = hmtl.Draws(torch.Generator().manual_seed(0), len(mats), slice(None), torch.device("cpu"))
    flipped, labels = hmtl.flip(images, angles, hmtl_data.ANGLES, draw, probability=1.0)
    assert torch.equal(flipped, images.flip(2))
    assert torch.equal(labels, angles * torch.tensor([-1.0, 1.0, -1.0]))
    turned, tilted = [], []
    for m, (new_yaw, new_pitch, new_roll) in zip(mats, labels.tolist()):
        if max(abs(new_yaw), abs(new_pitch), abs(new_roll)) > 99:
            continue
        nose, slope = mirrored_geometry(m["pt3d_68"][:2], images.shape[2])
        if abs(new_yaw) > 30:
            turned.append(np.sign(nose) == -np.sign(new_yaw))
        if abs(new_roll) > 20 and abs(new_yaw) < 45:
            tilted.append(np.sign(slope) == np.sign(new_roll))
    assert len(turned) > 25 and np.mean(turned) > 0.9
    assert len(tilted) > 5 and np.mean(tilted) > 0.9
    half = hmtl.flip(images, angles, hmtl_data.ANGLES, draw, probability=0.5)
    mirrored = (half[1][:, 0] != angles[:, 0]) & (angles[:, 0] != 0)
    assert 25 < mirrored.sum() < 75 and torch.equal(half[0][mirrored], images[mirrored].flip(2))


def test_a_face_without_visible_landmarks_gets_no_box():
    assert hmtl_data.face_box(-np.ones((2, 21)), None, "visible") is None
    assert hmtl_data.face_box(-np.ones((2, 21)), None, "hopenet") is None
    box = hmtl_data.face_box(np.array([[10.0, 30, -1], [20, 60, -1]]), None, "visible")
    # k = 0.2 on the 20 x 40 box: x_min -= 0.4·20, y_min -= 0.4·40, then, as HopeNet does, the
    # right and bottom margins use the moved sides: x_max += 0.4·(30 - 2), y_max += 0.12·(60 - 4)
    assert box == (2, 4, 41, 66)


# ----------------------------------------------------------------------------- fabricated datasets

def fake_xgaze(root, subjects, per_subject=12, seed=0):
    """ETH-XGaze's subjectXXXX.h5: face_patch N x 224 x 224 x 3 BGR, face_head_pose N x 2 (pitch, yaw)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s in subjects:
        poses = np.radians(rng.uniform(-40, 40, (per_subject, 2)))
        faces = np.stack([hmtl_data.render_head(np.degrees(y), np.degrees(p), 0, 32, rng)[0][..., ::-1]
                          for p, y in poses]).repeat(7, 1).repeat(7, 2)  # 224 px, as the files hold them
        with h5py.File(root / f"subject{s:04d}.h5", "w") as f:
            f["face_patch"], f["face_head_pose"] = faces, poses
            f["face_gaze"] = np.zeros((per_subject, 2))
    return root


@pytest.fixture(scope="module")
def trained_on_300wlp(tmp_path_factory):
    """(last.pt, summary) of a run trained on a fabricated 300W-LP and tested on a fabricated AFLW2000."""
    tmp = tmp_path_factory.mktemp("300wlp")
    train = fake_300wlp(tmp / "300W_LP", beyond=2)
    test = fake_300wlp(tmp / "AFLW2000", folders=("",), per_folder=30, seed=1, beyond=3, landmarks=21)
    summary = hmtl.main(tiny_args(tmp, "--data", "300wlp", "--data-root", str(train), "--val-root", str(test),
                                  "--task", "puzzle", "--batch-size", "16", "--aflw2000-reduced"))
    return tmp / "run" / "last.pt", summary


def test_300wlp_trains_and_aflw2000_evaluates_end_to_end(trained_on_300wlp):
    last, summary = trained_on_300wlp
    assert summary["train_images"] == 36  # 2 x 20 files, the 2 x 2 beyond ±99° left out
    assert summary["val_images"] == 27 and summary["config"]["val_data"] == "aflw2000"  # 30 less 3 beyond ±99°
    assert {"val_mae_yaw", "val_mae_pitch", "val_mae_roll", "val_acc_puzzle"} <= set(summary)
    # AFLW2000 is a test set: no checkpoint is chosen on it
    assert not (last.parent / "best.pt").exists() and summary["best_pt"]["epoch"] is None
    assert "the validation set (aflw2000) is a test set" in summary["best_pt"]["chosen_on"]
    every = hmtl.main(["--eval-only", "--checkpoint", str(last), "--no-aflw2000-reduced"])
    assert every["val_images"] == 30 and np.isfinite(every["val_mae_mean"])


def test_cache_equals_direct_decoding_pixel_for_pixel_and_follows_its_source(tmp_path):
    root = fake_300wlp(tmp_path / "300W_LP", per_folder=10)
    cfg = config("--data", "300wlp", "--data-root", str(root), "--img-size", "48", "--workers", "2", "--seed", "3")
    direct = hmtl_data.load_split(cfg, True)
    cached = hmtl_data.load_split({**cfg, "cache": str(tmp_path / "cache")}, True)
    assert isinstance(direct, hmtl_data.PoseFiles) and isinstance(cached, hmtl_data.PoseArrays)
    assert len(direct) == len(cached) == 20
    for i in range(20):
        assert torch.equal(direct[i][0], cached[i][0]) and torch.equal(direct[i][1], cached[i][1])
    folders = lambda: sorted(p for p in (tmp_path / "cache").glob("300wlp-train-48px-*") if p.is_dir())
    [folder] = folders()
    built = (folder / "images.npy").stat().st_mtime_ns
    hmtl_data.load_split({**cfg, "cache": str(tmp_path / "cache")}, True)
    assert (folder / "images.npy").stat().st_mtime_ns == built  # reused
    other_seed = hmtl_data.load_split({**cfg, "cache": str(tmp_path / "cache"), "seed": 4}, True)  # other margins
    assert not all(torch.equal(other_seed[i][0], cached[i][0]) for i in range(20))
    other_crop = hmtl_data.load_split({**cfg, "cache": str(tmp_path / "cache"), "crop": "visible"}, True)
    assert len(folders()) == 3 and (folder / "images.npy").stat().st_mtime_ns == built  # side by side
    protocols = sorted(json.loads((f / "meta.json").read_text())["crop"]["protocol"] for f in folders())
    assert protocols == ["hopenet", "hopenet", "visible"] and len(other_crop) == 20
    jpg = root / "AFW" / "AFW_3.jpg"
    Image.open(jpg).transpose(Image.FLIP_LEFT_RIGHT).save(jpg)  # the source changes
    os.utime(jpg, (1, 1))
    rebuilt = hmtl_data.load_split({**cfg, "cache": str(tmp_path / "cache")}, True)
    changed = hmtl_data.load_split(cfg, True)
    assert all(torch.equal(rebuilt[i][0], changed[i][0]) for i in range(20))
    mat = loadmat(jpg.with_suffix(".mat"))  # the labels change, the image does not
    mat["Pose_Para"][0, :3] = np.radians([5.0, -7.0, 9.0])
    savemat(jpg.with_suffix(".mat"), {"Pose_Para": mat["Pose_Para"], "pt2d": mat["pt2d"]})
    relabelled = hmtl_data.load_split({**cfg, "cache": str(tmp_path / "cache")}, True)
    i = changed.files.index(jpg)
    assert relabelled.angles[i].tolist() == pytest.approx([-7.0, 5.0, 9.0])  # yaw, pitch, roll
    assert np.array_equal(relabelled.angles, hmtl_data.load_split(cfg, True).angles)


@pytest.mark.parametrize("damage", ["truncated images.npy", "bad meta.json", "no angles.npy"])
def test_a_damaged_cache_is_rebuilt(tmp_path, damage):
    root = fake_300wlp(tmp_path / "300W_LP", folders=("AFW",), per_folder=4)
    cfg = config("--data", "300wlp", "--data-root", str(root), "--img-size", "32", "--workers", "0",
                 "--cache", str(tmp_path / "cache"))
    want = np.array(hmtl_data.load_split(cfg, True).images)
    [folder] = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    if damage == "truncated images.npy":
        (folder / "images.npy").write_bytes((folder / "images.npy").read_bytes()[:1000])
    elif damage == "bad meta.json":
        (folder / "meta.json").write_text("{half")
    else:
        (folder / "angles.npy").unlink()
    again = hmtl_data.load_split(cfg, True)
    assert np.array_equal(np.asarray(again.images), want) and again.angles.shape == (4, 3)


def test_faces_at_99_degrees_are_kept_and_beyond_left_out_in_every_format_that_filters(tmp_path):
    yaws = [99.0, -99.0, 99.01, 10.0]
    biwi = tmp_path / "biwi.npz"
    np.savez(biwi, image=np.zeros((4, 8, 8, 3), np.uint8), pose=np.array([[y, 0, 0] for y in yaws]))
    assert hmtl_data.biwi_arrays(biwi, 8).angles[:, 0].tolist() == [99.0, -99.0, 10.0]
    (tmp_path / "mats").mkdir()
    for i, yaw in enumerate(yaws):
        Image.new("RGB", (40, 40)).save(tmp_path / "mats" / f"image{i:05d}.jpg")
        savemat(tmp_path / "mats" / f"image{i:05d}.mat", {"Pose_Para": np.array([[0.2, np.radians(yaw), 0, 0, 0, 0, 1]]),
                                                          "pt2d": np.full((2, 21), 20.0)})
    reduced = hmtl_data.PoseFiles(tmp_path / "mats", 32, 0)
    assert reduced.angles[:, 0].tolist() == pytest.approx([99.0, -99.0, 10.0]) and reduced.dropped == 1
    assert len(hmtl_data.PoseFiles(tmp_path / "mats", 32, 0, keep_beyond_99=True)) == 4  # AFLW2000's full protocol


def test_a_crashed_cache_build_is_not_a_trap_and_two_builders_agree(tmp_path):
    root = fake_300wlp(tmp_path / "300W_LP", per_folder=6)
    flags = ["--data", "300wlp", "--data-root", str(root), "--img-size", "32", "--workers", "0",
             "--cache", str(tmp_path / "cache")]
    cfg = config(*flags)
    first = hmtl_data.load_split(cfg, True)
    want = np.array(first.images)
    del first
    [built] = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    partial = built.with_name(built.name + ".partial")
    built.rename(partial)  # as if a build had crashed before its last step
    (partial / "images.npy").write_bytes(b"garbage")
    again = hmtl_data.load_split(cfg, True)
    assert not partial.exists() and np.array_equal(np.asarray(again.images), want)
    for p in (tmp_path / "cache").iterdir():
        if p.is_dir():
            for f in p.iterdir():
                f.unlink()
            p.rmdir()
    results = multiprocessing.get_context("fork").Queue()

    def build():
        d = hmtl_data.load_split(cfg, True)
        results.put((d.images.shape[0], int(np.asarray(d.images, np.int64).sum())))

    builders = [multiprocessing.get_context("fork").Process(target=build) for _ in range(2)]
    for p in builders:
        p.start()
    for p in builders:
        p.join(60)
    assert [p.exitcode for p in builders] == [0, 0]
    assert results.get() == results.get() == (12, int(want.astype(np.int64).sum()))


def test_no_usable_training_face_is_a_clear_error(tmp_path):
    root = fake_300wlp(tmp_path / "300W_LP", folders=("AFW",), per_folder=3, beyond=3)
    for cache in ([], ["--cache", str(tmp_path / "cache")]):
        with pytest.raises(SystemExit, match="no usable 300wlp faces for train .all 3 lie beyond ±99°"):
            hmtl.main(tiny_args(tmp_path, "--data", "300wlp", "--data-root", str(root), *cache))


def test_an_undecodable_image_in_a_worker_gives_one_line_naming_it(tmp_path):
    root = fake_300wlp(tmp_path / "300W_LP", folders=("AFW",), per_folder=12)
    (root / "AFW" / "AFW_5.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    with pytest.raises(SystemExit) as stop:  # its message is the line the command line prints, exit status 1
        hmtl.main(tiny_args(tmp_path, "--data", "300wlp", "--data-root", str(root), "--val-root", str(root),
                            "--workers", "2", "--batch-size", "4", "--epochs", "1"))
    assert str(stop.value) == (f"{root / 'AFW' / 'AFW_5.jpg'}: cannot decode image (cannot identify image file "
                               f"'{root / 'AFW' / 'AFW_5.jpg'}')")


def test_ethxgaze_subjects_train_and_validate_on_yaw_and_pitch(tmp_path):
    root = fake_xgaze(tmp_path / "xgaze", subjects=[0, 1, 2, 3, 108, 109, 111], per_subject=4)
    summary = hmtl.main(tiny_args(tmp_path, "--data", "ethxgaze", "--data-root", str(root), "--train-subjects", "2",
                                  "--task", "puzzle", "--batch-size", "4", "--cache", str(tmp_path / "cache"),
                                  "--flip", "0.5", "--epochs", "1"))
    assert summary["train_images"] == 8 and summary["val_images"] == 12  # subjects 0, 1; 108, 109, 111
    assert summary["config"]["head"] == "reg" and summary["config"]["dropout"] == 0.4
    assert "val_mae_roll" not in summary and {"val_mae_yaw", "val_mae_pitch", "baseline_mae_mean"} <= set(summary)
    assert hmtl_data.xgaze_subjects(root, "3,", ()) == [3] and hmtl_data.xgaze_subjects(root, "3", (1,)) == [0, 2, 3]
    # BGR in the file, RGB out of the reader
    with h5py.File(root / "subject0108.h5") as f:
        bgr = f["face_patch"][0]
    rgb, angles = hmtl_data.XGazeFiles(root, [108], 224)[0]
    assert np.array_equal(rgb.numpy(), bgr[..., ::-1])


@pytest.mark.xdist_group("learned")
def test_biwi_npz_evaluates_a_trained_model(learned, tmp_path):
    npz = fake_biwi(tmp_path / "BIWI_noTrack.npz")
    metrics = hmtl.main(["--eval-only", "--checkpoint", str(learned["sl"][0] / "last.pt"), "--val-data", "biwi",
                         "--val-root", str(tmp_path)])
    assert metrics["val_images"] == 24 and metrics["val_data"] == "biwi"
    data = hmtl_data.biwi_arrays(npz, 32)
    with np.load(npz) as d:
        assert np.allclose(data.angles, d["pose"]) and data.images.shape == (24, 32, 32, 3)
        assert np.array_equal(hmtl_data.biwi_arrays(npz, 64).images, d["image"][..., ::-1])  # BGR -> RGB


def bad_biwi(tmp_path, name, **arrays):
    good = {"image": np.zeros((4, 16, 16, 3), np.uint8), "pose": np.zeros((4, 3), np.float32)}
    np.savez(tmp_path / name, **{**good, **arrays})
    return tmp_path / name


@pytest.mark.parametrize("arrays,message", [
    ({"image": np.zeros((4, 16, 16), np.uint8)}, "image must be N x S x S x 3 colour images, got shape \\(4, 16, 16\\)"),
    ({"image": np.zeros((4, 16, 16, 4), np.uint8)}, "image must be N x S x S x 3 colour images, got shape \\(4, 16, 16, 4\\)"),
    ({"image": np.zeros((4, 16, 16, 3), np.float32)}, "image must be uint8 pixels, got float32"),
    ({"image": np.zeros((4, 16, 12, 3), np.uint8)}, "image must be square crops, got 16 x 12"),
    ({"pose": np.zeros((4, 2))}, "pose must be N x 3, got shape \\(4, 2\\)"),
    ({"pose": np.zeros(4)}, "pose must be N x 3, got shape \\(4,\\)"),
    ({"pose": np.zeros((5, 3))}, "4 images but 5 poses"),
    ({"pose": np.zeros((3, 3))}, "4 images but 3 poses"),
    ({"pose": np.array([[0, 0, 0], [0, np.nan, 0], [0, 0, 0], [0, 0, 0]])},
     "pose has NaN or infinite angles in 1 row\\(s\\), the first row 1"),
])
def test_malformed_biwi_files_are_refused_naming_the_file(tmp_path, arrays, message):
    path = bad_biwi(tmp_path, "bad.npz", **arrays)
    with pytest.raises(hmtl_data.DataError, match=f"bad.npz: {message}"):
        hmtl_data.biwi_arrays(path, 16)


def test_biwi_faces_beyond_99_degrees_are_left_out_and_counted(tmp_path, capsys):
    path = bad_biwi(tmp_path, "far.npz", pose=np.array([[0, 0, 0], [500, 0, 0], [0, -120, 0], [10, 20, 30]]))
    data = hmtl_data.biwi_arrays(path, 16)
    assert len(data) == 2 and data.dropped == 2 and data.angles.tolist() == [[0, 0, 0], [10, 20, 30]]
    nan = bad_biwi(tmp_path, "nan.npz", pose=np.array([[0, 0, 0], [0, 0, np.nan], [0, 0, 0], [0, 0, 0]]))
    with pytest.raises(SystemExit, match="nan.npz: pose has NaN"):  # a NaN test label stops, never a NaN MAE
        hmtl.main(tiny_args(tmp_path, "--epochs", "1", "--val-data", "biwi", "--val-root", str(nan)))


def test_missing_or_malformed_data_names_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="missing or empty. Get ETH-XGaze"):
        hmtl.main(tiny_args(tmp_path, "--data", "ethxgaze", "--data-root", str(tmp_path / "empty")))
    with pytest.raises(hmtl_data.DataError, match="subject0001.h5: not an ETH-XGaze subject file"):
        hmtl_data.XGazeFiles(tmp_path, [1], 64)
    with h5py.File(tmp_path / "subject0002.h5", "w") as f:
        f["face_patch"], f["face_head_pose"] = np.zeros((3, 8, 8, 3), np.uint8), np.zeros((2, 2))
    with pytest.raises(hmtl_data.DataError, match="subject0002.h5: 3 face patches but 2 head poses"):
        hmtl_data.XGazeFiles(tmp_path, [2], 64)
    (tmp_path / "bad.npz").write_bytes(b"zip?")
    with pytest.raises(hmtl_data.DataError, match="bad.npz: not FSA-Net's BIWI"):
        hmtl_data.biwi_arrays(tmp_path / "bad.npz", 64)
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.jpg")
    savemat(tmp_path / "a" / "x.mat", {"something": 1})
    with pytest.raises(hmtl_data.DataError, match="x.mat: not a 300W-LP / AFLW2000 label file"):
        hmtl_data.PoseFiles(tmp_path / "a", 32, 0)
    savemat(tmp_path / "a" / "x.mat", {"Pose_Para": np.array([[np.nan, 0, 0, 0, 0, 0, 1]]), "pt2d": np.ones((2, 21))})
    with pytest.raises(hmtl_data.DataError, match="x.mat: Pose_Para has NaN or infinite angles"):
        hmtl_data.PoseFiles(tmp_path / "a", 32, 0)


# ----------------------------------------------------------------------------- tools/biwi_to_npz.py

def test_biwi_converter_splits_by_sequence_and_reports_what_it_left_out(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import biwi_to_npz
    rng = np.random.default_rng(0)
    names, ypr, faces = [], [], {}
    for seq in (1, 16, 17, 24):
        (tmp_path / "crops" / f"{seq:02d}").mkdir(parents=True)
        for frame in range(3):
            name = f"{seq:02d}/frame_{frame:05d}_rgb.png"
            faces[name] = rng.integers(0, 255, (30, 31, 3), dtype=np.uint8)
            Image.fromarray(faces[name]).save(tmp_path / "crops" / name)
            names.append(name)
            ypr.append([float(seq), -frame, 3.0] if frame != 2 or seq != 24 else [120.0, 0, 0])
    (tmp_path / "crops" / "17" / "frame_00000_rgb.png").write_bytes(b"")  # an empty crop
    Image.fromarray(faces[names[0]]).save(tmp_path / "crops" / "01" / "frame_00009_rgb.png")  # no label
    names.append("02/frame_00001_rgb.png")  # a label without a crop
    ypr.append([0, 0, 0])
    np.savez(tmp_path / "labels.npz", images=np.array(names), ypr=np.array(ypr))
    counts = biwi_to_npz.convert(tmp_path / "crops", tmp_path / "labels.npz", tmp_path / "out", size=24)
    assert counts == {"crops found": 13, "kept: train": 6, "kept: test": 4, "left out: crop without a label": 1,
                      "left out: empty or unreadable crop": 1, "left out: an angle beyond ±99°": 1,
                      "labels without a crop": 1}
    with np.load(tmp_path / "out" / "BIWI_train.npz") as d:
        assert d["image"].shape == (6, 24, 24, 3) and {n[:2] for n in d["names"]} == {"01", "16"}
        k = list(d["names"]).index(names[0])
        want = np.asarray(Image.fromarray(faces[names[0]]).resize((24, 24), Image.BILINEAR))
        assert np.array_equal(d["image"][k][..., ::-1], want)  # stored BGR, as FSA-Net's
        assert d["pose"][k].tolist() == ypr[0]
    test = hmtl_data.biwi_arrays(tmp_path / "out" / "BIWI_test.npz", 24)
    assert len(test) == 4 and np.array_equal(test.images[0], np.asarray(
        Image.fromarray(faces["17/frame_00001_rgb.png"]).resize((24, 24), Image.BILINEAR)))
    # overlapping splits each get every face of their sequences
    counts = biwi_to_npz.convert(tmp_path / "crops", tmp_path / "labels.npz", tmp_path / "overlap", size=24,
                                 splits={"s1": range(1, 2), "s2": range(1, 17), "all": range(1, 25)})
    assert (counts["kept: s1"], counts["kept: s2"], counts["kept: all"]) == (3, 6, 10)
    with np.load(tmp_path / "overlap" / "BIWI_s2.npz") as d:
        assert sorted(n[:2] for n in d["names"]) == ["01"] * 3 + ["16"] * 3
