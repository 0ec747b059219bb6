"""The data hmtl trains and tests on: readers for the datasets in their published formats, the face
crops, a memory-mapped cache of decoded crops, and the synthetic heads used when no dataset is given.

Every dataset yields (uint8 S x S x 3 RGB crop, float32 angles in degrees), the angles in the order
yaw, pitch, roll (ETH-XGaze has no roll). docs/method.md describes the formats, the angle convention
and the crop protocols; hmtl.py holds the method.
"""
import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

DATASETS = ("synthetic", "300wlp", "aflw2000", "ethxgaze", "biwi")
TEST_SETS = ("aflw2000", "biwi", "ethxgaze")  # never trained on, never used to choose a checkpoint
SOURCES = {
    "300wlp": "300W-LP: http://www.cbsr.ia.ac.cn/users/xiangyuzhu/projects/3DDFA/main.htm (300W-LP.zip)",
    "aflw2000": "AFLW2000-3D: http://www.cbsr.ia.ac.cn/users/xiangyuzhu/projects/3DDFA/main.htm (AFLW2000-3D.zip)",
    "ethxgaze": "ETH-XGaze (224 px face patches): https://ait.ethz.ch/xgaze",
    "biwi": "BIWI_noTrack.npz from FSA-Net's data: https://github.com/shamangary/FSA-Net, "
            "or tools/biwi_to_npz.py",
}
BINNABLE = 99  # catreg's bins span ±99°: faces beyond it are left out, except in AFLW2000's full protocol
CROP_PROTOCOLS = ("hopenet", "visible")


class DataError(Exception):
    """A dataset file that cannot be used; the message names it and says what is wrong. Raised in
    DataLoader worker processes too, where torch wraps it in the worker's traceback: `brief` is
    the one line a user needs."""

    @property
    def brief(self):
        text = str(self).strip()
        if "Original Traceback" in text:  # re-raised from a worker: keep the original message
            text = text.splitlines()[-1].split("DataError: ", 1)[-1]
        return text


# ----------------------------------------------------------------------------- the angle convention
# 300W-LP's, as HopeNet's draw_axis draws it (docs/method.md): the angles, their signs under a
# left-right flip, and the rotation they describe.
ANGLES = ("yaw", "pitch", "roll")
MIRRORED = {"yaw": -1.0, "pitch": 1.0, "roll": -1.0}  # a left-right flip negates yaw and roll


def angle_names(dataset_name):
    return ANGLES[:2] if dataset_name == "ethxgaze" else ANGLES


def pose_matrix(yaw, pitch, roll):
    """Rotation from head axes to camera axes (x right, y down, z towards the viewer), degrees.

    Its first two rows are the image directions of the head's axes drawn by HopeNet's
    draw_axis, the de-facto definition of the 300W-LP angles: positive yaw turns the face
    to the image left, positive pitch tilts it up, positive roll lowers its image-right side.
    """
    y, p, r = np.radians([-yaw, pitch, roll])
    row_x = [np.cos(y) * np.cos(r), -np.cos(y) * np.sin(r), np.sin(y)]
    row_y = [np.cos(p) * np.sin(r) + np.cos(r) * np.sin(p) * np.sin(y),
             np.cos(p) * np.cos(r) - np.sin(p) * np.sin(y) * np.sin(r), -np.cos(y) * np.sin(p)]
    return np.array([row_x, row_y, np.cross(row_x, row_y)])


def checked_angles(path, angles, columns, what):
    """Angles as float32 N x columns, or a DataError naming the file, the array and what is wrong."""
    a = np.asarray(angles)
    if a.ndim != 2 or a.shape[1] != columns:
        raise DataError(f"{path}: {what} must be N x {columns}, got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise DataError(f"{path}: {what} must hold numbers, got {a.dtype}")
    bad = np.flatnonzero(~np.isfinite(a).all(1))
    if len(bad):
        raise DataError(f"{path}: {what} has NaN or infinite angles in {len(bad)} row(s), the first row {bad[0]}")
    return a.astype(np.float32)


def checked_images(path, images, what):
    """uint8 N x S x S x 3 colour images, or a DataError naming the file and what is wrong."""
    shape = getattr(images, "shape", ())
    if len(shape) != 4 or shape[3] != 3:
        raise DataError(f"{path}: {what} must be N x S x S x 3 colour images, got shape {tuple(shape)}")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {what} must be uint8 pixels, got {images.dtype}")
    if shape[1] != shape[2]:
        raise DataError(f"{path}: {what} must be square crops, got {shape[1]} x {shape[2]}")
    return images


class PoseArrays(torch.utils.data.Dataset):
    """Decoded crops: uint8 N x S x S x 3 (in memory or memory-mapped) and float32 N x A angles."""

    def __init__(self, images, angles):
        self.images, self.angles = images, np.asarray(angles, np.float32)

    def __len__(self):
        return len(self.angles)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.images[i])), torch.from_numpy(self.angles[i])


class Subset(torch.utils.data.Subset):
    """Some of a dataset's samples, with their angles."""

    @property
    def angles(self):
        return self.dataset.angles[self.indices]


def seeded(*keys):
    """A CPU generator determined by its keys (seed, purpose, epoch, step...)."""
    words = [int(hashlib.sha1(str(k).encode()).hexdigest()[:8], 16) for k in keys]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1))


class GlobalBatches(torch.utils.data.Sampler):
    """One global batch order per epoch, drawn from (seed, epoch); process `rank` of `world` takes
    samples rank::world of each global batch, so any number of processes sees the same batches.
    With `steps`, an epoch is that many batches cut from an endless stream of shuffled passes over
    the n samples (each pass its own permutation): a set smaller than a batch still fills one."""

    def __init__(self, n, batch, seed, shuffle, drop_last, rank=0, world=1, steps=None):
        self.n, self.batch, self.seed, self.shuffle, self.drop_last = n, batch, seed, shuffle, drop_last
        self.rank, self.world, self.steps, self.epoch = rank, world, steps, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        if self.steps:
            return self.steps
        return self.n // self.batch if self.drop_last else math.ceil(self.n / self.batch)

    def permutation(self, k):
        return torch.randperm(self.n, generator=seeded(self.seed, "order", k))

    def __iter__(self):
        if self.steps:
            first = self.epoch * self.steps * self.batch  # this epoch's place in the stream
            passes = range(first // self.n, (first + self.steps * self.batch - 1) // self.n + 1)
            order = torch.cat([self.permutation(k) for k in passes])[first - passes[0] * self.n:]
        else:
            order = self.permutation(self.epoch) if self.shuffle else torch.arange(self.n)
        for b in range(len(self)):
            rows = order[b * self.batch:(b + 1) * self.batch][self.rank::self.world]
            if len(rows):
                yield rows.tolist()


def data_loader(dataset, batches, cfg, rt):
    """Decoded arrays load fastest in the training process itself; files decode in --workers processes."""
    workers = 0 if is_arrays(dataset) else cfg["workers"]
    # Its own generator: the workers' seeds, drawn once for persistent workers, leave the global RNG
    # (dropout) alone, so a resumed run draws what an uninterrupted one does.
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       pin_memory=rt.device.type == "cuda", persistent_workers=workers > 0,
                                       generator=seeded(cfg["seed"], "loader"))


def every_kth(dataset, k, seed):
    """Every k-th sample from an offset drawn from `seed`: in a set ordered by person and frame (BIWI),
    a share of the frames drawn evenly over all people."""
    offset = int(np.random.default_rng([seed, 11]).integers(k))
    return Subset(dataset, np.arange(offset, len(dataset), k))


def split_holdout(dataset, fraction, seed):
    """(training part, held-out part): `fraction` of the samples, drawn from `seed`, held out."""
    order = np.random.default_rng([seed, 7]).permutation(len(dataset))
    held = max(1, round(fraction * len(dataset)))
    return Subset(dataset, np.sort(order[held:])), Subset(dataset, np.sort(order[:held]))


def is_arrays(dataset):
    """Whether the samples are decoded already (then read in the training process, not by workers)."""
    return isinstance(dataset.dataset if isinstance(dataset, Subset) else dataset, PoseArrays)


# ----------------------------------------------------------------------------- face crops

def face_box(pt2d, rng=None, protocol="hopenet"):
    """HopeNet's loose face box (x_min, y_min, x_max, y_max) around 2D landmarks (row 0: x, row 1: y).

    The margins follow the landmark set, as HopeNet's two dataset classes do: 68 points (300W-LP,
    the jawline included): k ~ U[0.2, 0.4] drawn from `rng`, 0.6k left, 2k top, 0.6k right and
    bottom; any other set (AFLW2000's 21 points, no jawline): k = 0.2, 2k left, top and right, 0.6k
    bottom. Each margin is a fraction of the box as the previous sides left it, and the corners are
    truncated to int, both as in HopeNet's code.

    protocol "hopenet": min and max over every entry, the -1 that marks an invisible AFLW2000
    landmark included -- the published code, whose crops the peers' AFLW2000 figures come from;
    "visible": over the visible landmarks only. None when no landmark is visible.
    """
    pt2d = np.asarray(pt2d, np.float64)
    if protocol not in CROP_PROTOCOLS:
        raise ValueError(f"unknown crop protocol {protocol!r}: choose {' or '.join(CROP_PROTOCOLS)}")
    visible = (pt2d >= 0).all(0)
    if not visible.any():
        return None
    points = pt2d if protocol == "hopenet" else pt2d[:, visible]
    (x_min, y_min), (x_max, y_max) = points.min(1), points.max(1)
    if pt2d.shape[1] == 68:
        k, (left, top, right, bottom) = rng.uniform(0.2, 0.4), (0.6, 2, 0.6, 0.6)
    else:
        k, (left, top, right, bottom) = 0.2, (2, 2, 2, 0.6)
    x_min -= left * k * abs(x_max - x_min)
    y_min -= top * k * abs(y_max - y_min)
    x_max += right * k * abs(x_max - x_min)
    y_max += bottom * k * abs(y_max - y_min)
    return int(x_min), int(y_min), int(x_max), int(y_max)


def square_crop(image, box, size):
    """HopeNet's test transform on a PIL image: cut `box` (black outside the image), resize the shorter
    side to `size` (torchvision's Resize: the longer side truncated), take the centre size x size
    (torchvision's CenterCrop: offsets rounded)."""
    face = image.crop(box)
    w, h = face.size
    if min(w, h) != size:
        face = face.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size), Image.BILINEAR)
    left, top = int(round((face.width - size) / 2.0)), int(round((face.height - size) / 2.0))
    return np.asarray(face.crop((left, top, left + size, top + size)).convert("RGB"))


def resized(image, size):
    """A uint8 H x W x 3 array resized (bilinear) to size x size."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


# ----------------------------------------------------------------------------- 300W-LP and AFLW2000

def read_mat(path):
    """(yaw, pitch, roll) in degrees and pt2d (2 x K) from a 300W-LP / AFLW2000 .mat file."""
    from scipy.io import loadmat
    try:
        mat = loadmat(path)
        pose, pt2d = np.asarray(mat["Pose_Para"], np.float64).ravel(), np.asarray(mat["pt2d"], np.float64)
    except Exception as e:
        raise DataError(f"{path}: not a 300W-LP / AFLW2000 label file with Pose_Para and pt2d ({e})") from None
    if len(pose) < 3 or pt2d.ndim != 2 or pt2d.shape[0] != 2 or pt2d.shape[1] == 0:
        raise DataError(f"{path}: Pose_Para needs pitch, yaw, roll and pt2d must be 2 x K, "
                        f"got {len(pose)} values and shape {pt2d.shape}")
    if not np.isfinite(pose[:3]).all():
        raise DataError(f"{path}: Pose_Para has NaN or infinite angles {pose[:3].tolist()}")
    pitch, yaw, roll = np.degrees(pose[:3])
    return np.array([yaw, pitch, roll], np.float32), pt2d


class PoseFiles(torch.utils.data.Dataset):
    """300W-LP / AFLW2000-3D as published: name.jpg beside name.mat, in any folder tree.

    `keep_beyond_99`: keep faces with an angle beyond ±99° (AFLW2000's full protocol); otherwise
    they are left out and counted in .dropped. A random margin (300W-LP's 68 landmarks) is drawn
    once per image from `seed`, so a cache and direct decoding give the same pixels.
    """

    def __init__(self, root, size, seed, protocol="hopenet", keep_beyond_99=False):
        files = sorted(p for p in Path(root).rglob("*.jpg") if p.with_suffix(".mat").is_file())
        if not files:
            raise DataError(f"{root}: no name.jpg + name.mat pairs there")
        angles = np.stack([read_mat(p.with_suffix(".mat"))[0] for p in tqdm(files, "reading labels", leave=False)])
        keep = np.ones(len(files), bool) if keep_beyond_99 else (np.abs(angles) <= BINNABLE).all(1)
        self.dropped = int((~keep).sum())
        self.files, self.angles = [f for f, k in zip(files, keep) if k], angles[keep]
        self.size, self.seed, self.protocol = size, seed, protocol
        self.sources = self.files + [f.with_suffix(".mat") for f in self.files]  # all that shapes a crop or label

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        try:
            image = Image.open(path).convert("RGB")
        except OSError as e:
            raise DataError(f"{path}: cannot decode image ({e})") from None
        box = face_box(read_mat(path.with_suffix(".mat"))[1], np.random.default_rng([self.seed, i]), self.protocol)
        box = box or (0, 0, image.width, image.height)
        return torch.from_numpy(square_crop(image, box, self.size).copy()), torch.from_numpy(self.angles[i])


# ----------------------------------------------------------------------------- ETH-XGaze and BIWI

class XGazeFiles(torch.utils.data.Dataset):
    """ETH-XGaze subjectXXXX.h5: face_patch N x 224 x 224 x 3 uint8 BGR, face_head_pose N x 2 (pitch, yaw) radians."""

    def __init__(self, root, subjects, size):
        import h5py
        self.paths = self.sources = [Path(root) / f"subject{s:04d}.h5" for s in subjects]
        angles = []
        for path in self.paths:
            try:
                with h5py.File(path, "r") as f:
                    pose, patches = f["face_head_pose"][:], f["face_patch"]
                    checked_images(path, patches, "face_patch")
                    if len(patches) != len(pose):
                        raise DataError(f"{path}: {len(patches)} face patches but {len(pose)} head poses")
            except (OSError, KeyError) as e:
                raise DataError(f"{path}: not an ETH-XGaze subject file with face_patch and face_head_pose ({e})") from None
            pitch, yaw = np.degrees(checked_angles(path, pose, 2, "face_head_pose")).T
            angles.append(np.stack([yaw, pitch], 1))
        self.index = np.concatenate([np.stack([np.full(len(a), f), np.arange(len(a))], 1) for f, a in enumerate(angles)])
        self.angles, self.size, self.handles = np.concatenate(angles).astype(np.float32), size, {}

    def __len__(self):
        return len(self.angles)

    def __getitem__(self, i):
        import h5py
        f, row = self.index[i]
        if self.handles.get("pid") != os.getpid():  # one set of open files per worker process
            self.handles = {"pid": os.getpid()}
        h5 = self.handles.get(f) or self.handles.setdefault(f, h5py.File(self.paths[f], "r"))
        image = np.ascontiguousarray(h5["face_patch"][row][..., ::-1])
        if image.shape[0] != self.size:
            image = resized(image, self.size)
        return torch.from_numpy(image.copy()), torch.from_numpy(self.angles[i])


def biwi_arrays(path, size):
    """FSA-Net's pre-processed BIWI .npz: `image` N x S x S x 3 uint8 (BGR: written by OpenCV), `pose`
    N x 3 (yaw, pitch, roll in degrees). Images are resized to `size`; faces beyond ±99° are left
    out (FSA-Net's protocol) and counted in .dropped."""
    path = Path(path)
    path = path / "BIWI_noTrack.npz" if path.is_dir() else path
    try:
        with np.load(path) as d:
            images, pose = d["image"], d["pose"]
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: not FSA-Net's BIWI .npz with 'image' and 'pose' ({e})") from None
    images = checked_images(path, images, "image")
    angles = checked_angles(path, pose, 3, "pose")
    if len(images) != len(angles):
        raise DataError(f"{path}: {len(images)} images but {len(angles)} poses")
    keep = (np.abs(angles) <= BINNABLE).all(1)
    images = images[keep][..., ::-1]
    if images.shape[1] != size:
        images = np.stack([resized(np.ascontiguousarray(im), size) for im in images])
    dataset = PoseArrays(np.ascontiguousarray(images), angles[keep])
    dataset.dropped = int((~keep).sum())
    return dataset


# ----------------------------------------------------------------------------- cache

def cached(folder, meta, n, size, angles, chunks):
    """A memory-mapped dataset in `folder` (images.npy, angles.npy, meta.json), reused while `meta`
    matches, otherwise (re)built from chunks(): an iterator of (start, uint8 images, angles).

    It appears whole or not at all; a lock file lets one process build it while the others wait,
    a .partial folder left by a crash is removed, never reused, and a damaged one is rebuilt."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = read_cache(folder, meta, (n, size, size, 3), (n, angles))
        if found is not None:
            return found
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (n, size, size, 3))
        labels = np.zeros((n, angles), np.float32)
        try:
            with tqdm(total=n, desc=f"building {folder}", unit="img") as bar:
                for start, x, y in chunks():
                    images[start:start + len(x)], labels[start:start + len(x)] = x, y
                    bar.update(len(x))
        except KeyboardInterrupt:
            raise SystemExit(f"interrupted while building {folder}: nothing was cached; it is built anew next time") \
                from None
        images.flush()
        del images
        np.save(tmp / "angles.npy", labels)
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return read_cache(folder, meta, (n, size, size, 3), (n, angles))


def read_cache(folder, meta, image_shape, angle_shape):
    """The cache in `folder` if it was built for `meta` and is whole, else None."""
    try:
        if json.loads((folder / "meta.json").read_text()) != meta:
            return None
        images, angles = np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "angles.npy")
    except (OSError, ValueError):  # missing, truncated or not what np.save writes
        return None
    return PoseArrays(images, angles) if images.shape == image_shape and angles.shape == angle_shape else None


def cache_dataset(dataset, folder, meta, workers):
    """--cache: a dataset's crops decoded once into a memory-mapped copy, in a folder named after
    everything that shapes a crop, so that changed settings never reuse stale crops."""
    def chunks():
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=workers)
        for b, (x, y) in enumerate(loader):
            yield b * 64, x.numpy(), y.numpy()

    folder = Path(f"{folder}-{hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:8]}")
    return cached(folder, meta, len(dataset), dataset[0][0].shape[0], dataset.angles.shape[1], chunks)


def source_fingerprint(paths):
    """What a cache remembers of its source files: names, sizes and modification times."""
    stats = json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths])
    return [len(paths), hashlib.sha1(stats.encode()).hexdigest()]


# ----------------------------------------------------------------------------- loading a split

def xgaze_subjects(root, spec, exclude=()):
    """--train-subjects: a count k (the first k subjects found in root, minus `exclude`) or a list
    '0,3,5' (one subject: '5,')."""
    if "," in spec:
        return [int(s) for s in spec.split(",") if s]
    found = sorted(int(p.stem[len("subject"):]) for p in Path(root).glob("subject*.h5"))
    return [s for s in found if s not in exclude][:int(spec)]


def load_split(cfg, train):
    """The training or validation set the config names; through --cache when it is given.

    Faces beyond ±99° are left out (and counted) everywhere except in AFLW2000's full protocol
    (validation on AFLW2000 with --no-aflw2000-reduced)."""
    name, root = (cfg["data"], cfg["data_root"]) if train else (cfg["val_data"], cfg["val_root"])
    size, seed, split = cfg["img_size"], cfg["seed"], "train" if train else "val"
    if name == "synthetic":
        n = cfg["synthetic_train"] if train else cfg["synthetic_val"]
        return synthetic_heads(n, size, seed, 0 if train else 1, cfg["cache"] or "data/cache", cfg["workers"])
    if not root or not Path(root).exists() or (Path(root).is_dir() and not any(Path(root).iterdir())):
        flag = "--data-root" if train else "--val-root"
        raise DataError(f"{flag} {root!r} for {name}: missing or empty. Get {SOURCES[name]}")
    if name == "biwi":
        dataset = biwi_arrays(root, size)
    elif name == "ethxgaze":
        val = [int(s) for s in cfg["val_subjects"].split(",")]
        subjects = xgaze_subjects(root, cfg["train_subjects"], val) if train else val
        dataset = XGazeFiles(root, subjects, size)
    else:
        keep = name == "aflw2000" and not train and not cfg["aflw2000_reduced"]
        dataset = PoseFiles(root, size, seed, cfg["crop"], keep_beyond_99=keep)
        split += "-reduced" if not keep and not train else ""
    if getattr(dataset, "dropped", 0):
        print(f"{name} {split}: {dataset.dropped} faces with an angle beyond ±{BINNABLE}° left out, {len(dataset)} kept")
    if len(dataset) == 0:
        raise DataError(f"{root}: no usable {name} faces for {split} (all {dataset.dropped} lie beyond ±{BINNABLE}°)")
    if not cfg["cache"] or is_arrays(dataset):
        return dataset
    meta = {"dataset": name, "split": split, "source": source_fingerprint(dataset.sources), "size": size, "seed": seed,
            "crop": {"protocol": cfg["crop"], "margins": "by landmark count", "resize": "torchvision", "version": 2}}
    return cache_dataset(dataset, Path(cfg["cache"]) / f"{name}-{split}-{size}px", meta, cfg["workers"])


# ----------------------------------------------------------------------------- synthetic heads
# The embedded default dataset: 3D heads built from ellipsoids, ray-cast in numpy at known
# yaw, pitch and roll in the 300W-LP convention (pose_matrix), on cluttered backgrounds.
# Head frame: x to the image right, y down, z towards the camera (the face side).
HEAD_PARTS = [  # centre, semi-axes, material
    ((0, 0, 0), (0.75, 0.95, 0.85), "skin"),
    ((0, -0.08, -0.08), (0.79, 0.98, 0.88), "hair"),  # a shell, kept on the scalp only
    ((0, 0.12, 0.78), (0.11, 0.24, 0.2), "nose"),
    ((-0.3, -0.12, 0.7), (0.14, 0.075, 0.1), "eye"), ((0.3, -0.12, 0.7), (0.14, 0.075, 0.1), "eye"),
    ((-0.3, -0.12, 0.78), (0.06, 0.06, 0.04), "iris"), ((0.3, -0.12, 0.78), (0.06, 0.06, 0.04), "iris"),
    ((-0.3, -0.3, 0.72), (0.17, 0.035, 0.06), "brow"), ((0.3, -0.3, 0.72), (0.17, 0.035, 0.06), "brow"),
    ((0, 0.52, 0.66), (0.22, 0.055, 0.1), "lips"),
    ((-0.76, 0.05, -0.05), (0.07, 0.2, 0.12), "ear"), ((0.76, 0.05, -0.05), (0.07, 0.2, 0.12), "ear"),
    ((0, 1.05, -0.2), (0.42, 0.55, 0.42), "skin"),  # neck
]
MATERIALS = ("skin", "hair", "nose", "eye", "iris", "brow", "lips", "ear")
HEAD_LANDMARKS = {"right_eye": (-0.3, -0.12, 0.82), "left_eye": (0.3, -0.12, 0.82), "nose_tip": (0, 0.12, 0.98)}


def render_head(yaw, pitch, roll, size, rng, supersample=2):
    """One head: (uint8 size x size x 3 image, {landmark: (x, y) pixels}, material index per pixel)."""
    rot = pose_matrix(yaw, pitch, roll).astype(np.float32)
    centres = np.array([p[0] for p in HEAD_PARTS], np.float32)
    axes = np.array([p[1] for p in HEAD_PARTS], np.float32)
    scale, shift = rng.uniform(0.5, 0.6), rng.uniform(-0.06, 0.06, 2) + [0, -0.1]
    s = size * supersample
    coords = (np.arange(s, dtype=np.float32) + 0.5) / s * 2 - 1
    u, v = np.meshgrid((coords - shift[0]) / scale, (coords - shift[1]) / scale)
    rays = np.stack([u.ravel(), v.ravel()], 1)  # orthographic rays along -z, in head units
    depth, part = np.full(s * s, -np.inf, np.float32), np.full(s * s, -1)
    for k, (_, semi, material) in enumerate(HEAD_PARTS):
        near = np.flatnonzero(((rays - centres[k] @ rot[:2].T) ** 2).sum(1) < max(semi) ** 2)
        a = rays[near] @ rot[:2] - centres[k]  # ray origin in the part's frame; direction rot[2]
        inv2 = 1 / axes[k] ** 2
        qa, qb, qc = (inv2 * rot[2] ** 2).sum(), (a * inv2 * rot[2]).sum(1), (a * a * inv2).sum(1) - 1
        hit = qb * qb - qa * qc >= 0
        near, a, z = near[hit], a[hit], (-qb[hit] + np.sqrt(qb[hit] ** 2 - qa * qc[hit])) / qa  # front root
        if material == "hair":
            h = a + z[:, None] * rot[2] + centres[k]
            scalp = (h[:, 1] < -0.42 + 0.5 * np.maximum(-h[:, 2], 0)) | (h[:, 2] < -0.25)
            near, z = near[scalp], z[scalp]
        front = z > depth[near]
        depth[near[front]], part[near[front]] = z[front], k
    seen = np.flatnonzero(part >= 0)
    k = part[seen]
    normal = ((rays[seen] @ rot[:2] + depth[seen, None] * rot[2] - centres[k]) / axes[k] ** 2) @ rot.T
    light = rng.normal([0.3, -0.5, 1.0], 0.3)
    shade = 0.35 + 0.75 * np.clip(normal @ light / np.linalg.norm(normal, axis=1) / np.linalg.norm(light), 0, 1)
    skin = (rng.uniform() * np.array([0.63, 0.6, 0.55]) + [0.33, 0.2, 0.13]) * rng.uniform(0.9, 1.1, 3)
    hair = rng.uniform(0.03, 0.55) * np.array([1, 0.75, 0.5]) * rng.uniform(0.85, 1.15, 3)
    colours = dict(skin=skin, hair=hair, nose=skin * 0.93, eye=[0.92, 0.92, 0.9], iris=rng.uniform(0.05, 0.4, 3),
                   brow=hair * 0.7, lips=skin * [1.05, 0.6, 0.6], ear=skin * 0.97)
    material = np.array([MATERIALS.index(p[2]) for p in HEAD_PARTS])[k]
    image = cluttered_background(s, rng).reshape(-1, 3)
    image[seen] = np.array([colours[m] for m in MATERIALS])[material] * shade[:, None]
    image = image.reshape(size, supersample, size, supersample, 3).mean((1, 3))
    labels = np.full(s * s, -1)
    labels[seen] = material
    marks = {name: ((np.array(p) @ rot[:2].T) * scale + shift + 1) / 2 * size for name, p in HEAD_LANDMARKS.items()}
    return ((np.clip(image, 0, 1) * 255).round().astype(np.uint8), marks,
            labels.reshape(s, s)[supersample // 2::supersample, supersample // 2::supersample])


def cluttered_background(s, rng):
    yy, xx = np.mgrid[0:s, 0:s] / s
    image = rng.uniform(0, 1, 3) + rng.uniform(-0.5, 0.5, 3) * xx[..., None] + rng.uniform(-0.5, 0.5, 3) * yy[..., None]
    for _ in range(rng.integers(3, 9)):
        (x0, y0), (w, h) = rng.uniform(0, 1, 2), rng.uniform(0.05, 0.5, 2)
        box = (abs(xx - x0) < w / 2) & (abs(yy - y0) < h / 2)
        image[box if rng.random() < 0.5 else (xx - x0) ** 2 + (yy - y0) ** 2 < w * w / 4] = rng.uniform(0, 1, 3)
    return np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1)


def synthetic_pose(seed, split, index):
    """Deterministic (rng, yaw, pitch, roll) of synthetic image `index` of a split."""
    rng = np.random.default_rng([seed, split, index])
    return rng, rng.uniform(-90, 90), rng.uniform(-60, 60), rng.uniform(-60, 60)


def ignore_interrupts():  # a renderer process: Ctrl-C is the main process's to report
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _render_chunk(args):
    seed, split, size, indices = args
    images, angles = [], []
    for i in indices:
        rng, yaw, pitch, roll = synthetic_pose(seed, split, i)
        images.append(render_head(yaw, pitch, roll, size, rng)[0])
        angles.append((yaw, pitch, roll))
    return np.stack(images), np.array(angles, np.float32)


def synthetic_heads(n, size, seed, split, folder, workers):
    """n rendered heads of split 0 (train) or 1 (validation), generated once into a cache."""
    def chunks():
        starts = range(0, n, 256)
        jobs = [(seed, split, size, range(s, min(s + 256, n))) for s in starts]
        with torch.multiprocessing.get_context("fork").Pool(max(1, workers), ignore_interrupts) as pool:
            for start, (images, angles) in zip(starts, pool.imap(_render_chunk, jobs)):
                yield start, images, angles

    meta = {"dataset": "synthetic", "n": n, "size": size, "seed": seed, "split": split, "renderer": 3}
    return cached(Path(folder) / f"synthetic-{'train' if split == 0 else 'val'}-{n}-{size}px-seed{seed}",
                  meta, n, size, 3, chunks)
