"""Hybrid Multi-Task Learning (HMTL) for fine-grained head pose estimation.

Reference implementation of Pourmirzaei et al., "How Self-Supervised Learning Can be
Used for Fine-Grained Head Pose Estimation?" (2021). A ResNet regresses yaw, pitch and
roll from a face crop; during training, self-supervised (SS) branches at one of four
"flag points" of the backbone solve a jigsaw puzzle and/or per-tile rotations of the
*same* shuffled image. At test time the SS branches are dropped.

    python hmtl.py --task puzzle --flag 3          # HMTL on synthetic heads (no download)

Read top to bottom: tile op, data, augmentation, model, losses, optimizer, training,
evaluation, command line. Conventions (angles, tiles, datasets) are in DESIGN.md.
"""
import argparse
import copy
import csv
import functools
import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from tqdm import tqdm

# ----------------------------------------------------------------------------- tile op
# Batched jigsaw shuffle + per-tile rotation (DESIGN.md section 4). The C++/CUDA
# extension (csrc/) does it in one pass; the PyTorch reference below is what the tests
# hold it to and what runs when the extension is not built.
try:
    import hmtl_tiles as tiles_ext  # built by `pip install --no-build-isolation -e .`
except ImportError:
    tiles_ext = None

TASKS = ("none", "puzzle", "rotation", "puzzle_rotation")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_tiles(n, grid, task, generator=None, device=None):
    """Random SS parameters (perm, rot), each n x grid² int64: the labels of the tile heads.

    puzzle: a random permutation, no rotation; rotation: tiles in place, each rotated by
    k·90°; puzzle_rotation: a permutation and at most two tiles rotated (two distinct
    positions, each a random k in 0..3); none: the identity. Drawn on the CPU from
    `generator`, then moved to `device`.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    g2 = grid * grid
    perm = torch.arange(g2).repeat(n, 1)
    rot = torch.zeros(n, g2, dtype=torch.long)
    if task in ("puzzle", "puzzle_rotation"):
        perm = torch.rand(n, g2, generator=generator).argsort(1)
    if task == "rotation":
        rot = torch.randint(0, 4, (n, g2), generator=generator)
    if task == "puzzle_rotation":
        where = torch.rand(n, g2, generator=generator).argsort(1)[:, :2]
        rot.scatter_(1, where, torch.randint(0, 4, where.shape, generator=generator))
    return perm.to(device), rot.to(device)


def invert_tiles(perm, rot):
    """The parameters that undo shuffle_tiles(·, perm, rot) exactly."""
    inverse = perm.argsort(1)
    return inverse, ((4 - rot) % 4).gather(1, inverse)


def _use_extension(backend, x):
    if backend not in ("auto", "ext", "torch"):
        raise ValueError(f"unknown tile-op backend {backend!r}: choose auto, ext or torch")
    if backend == "ext" and tiles_ext is None:
        raise RuntimeError("the tile-op extension is not built: run `pip install --no-build-isolation -e .`")
    if backend == "auto" and (tiles_ext is None or (x.is_cuda and not tiles_ext.with_cuda)):
        _warn_reference_backend()
        return False
    return backend != "torch"


@functools.cache
def _warn_reference_backend():
    warnings.warn("hmtl: the tile-op extension is not built for this device; using the slower PyTorch "
                  "reference (build it with `pip install --no-build-isolation -e .`)", stacklevel=3)


def shuffle_tiles(x, perm, rot, backend="auto", out=None):
    """out[n, :, tile p] = rot90(x[n, :, tile perm[n, p]], rot[n, p]); pixels off the grid are copied.

    x: N x C x H x W (uint8, float16, bfloat16 or float32; any memory format); perm, rot:
    N x g² int64 on x's device. Tiles are t = min(H, W) // g pixels square, row-major.
    """
    if _use_extension(backend, x):
        if out is None:
            return torch.ops.hmtl.shuffle_tiles(x, perm, rot)
        torch.ops.hmtl.shuffle_tiles_out(x, perm, rot, out)
        return out
    return _shuffle_tiles_reference(x, perm, rot, out)


def shuffle_tiles_normalize(x, perm, rot, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float32,
                            channels_last=True, backend="auto", out=None):
    """Decoded uint8 N x H x W x C images to normalised, shuffled N x C x H x W `dtype`, in one pass.

    Equals shuffle_tiles(x.permute(0, 3, 1, 2), perm, rot) mapped by (x / 255 - mean) / std,
    computed as x·scale + shift in float32 (scale = 1 / (255 std), shift = -mean / std).
    """
    if _use_extension(backend, x):
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if out is None:
            return torch.ops.hmtl.shuffle_tiles_normalize(x, perm, rot, mean, std, dtype, channels_last)
        torch.ops.hmtl.shuffle_tiles_normalize_out(x, perm, rot, mean, std, out)
        return out
    return _shuffle_tiles_normalize_reference(x, perm, rot, mean, std, dtype, channels_last, out)


def _tile_grid(op, n, h, w, perm, rot, device):
    """(g, t) after the checks of csrc/tiles.cpp, raising the same errors."""
    if perm.dim() != 2:
        raise ValueError(f"{op}: perm must be N x g^2, got shape {list(perm.shape)}")
    if rot.shape != perm.shape:
        raise ValueError(f"{op}: rot must have perm's shape {list(perm.shape)}, got {list(rot.shape)}")
    if perm.shape[0] != n:
        raise ValueError(f"{op}: perm has {perm.shape[0]} rows for {n} images")
    if perm.dtype != torch.long or rot.dtype != torch.long:
        raise TypeError(f"{op}: perm and rot must be int64, got {perm.dtype} and {rot.dtype}")
    if perm.device != device or rot.device != device:
        raise ValueError(f"{op}: x, perm and rot must be on one device, got {device}, {perm.device} and {rot.device}")
    g2 = perm.shape[1]
    g = math.isqrt(g2)
    if g2 == 0 or g * g != g2:
        raise ValueError(f"{op}: perm has {g2} columns, which is not a square g^2")
    if g > min(h, w):
        raise ValueError(f"{op}: a {g}x{g} grid does not fit a {h}x{w} image (tiles would be empty)")
    bad = (perm.sort(1).values != torch.arange(g2, device=device)).any(1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{op}: perm row {i} is not a permutation of 0..{g2 - 1}: {perm[i].tolist()}")
    bad = (rot < 0) | (rot > 3)
    if bad.any():
        i, j = bad.nonzero()[0].tolist()
        raise ValueError(f"{op}: rot[{i}, {j}] = {int(rot[i, j])} is outside 0..3")
    return g, min(h, w) // g


def _check_dtype(op, what, dtype, allowed):
    if dtype not in allowed:
        names = [str(a).replace("torch.", "") for a in allowed]
        names = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise TypeError(f"{op}: {what} must be {names}, got {dtype}")


def _shuffle_tiles_reference(x, perm, rot, out=None):
    if x.dim() != 4:
        raise ValueError(f"shuffle_tiles: x must be N x C x H x W, got shape {list(x.shape)}")
    _check_dtype("shuffle_tiles", "x", x.dtype, (torch.uint8, torch.float16, torch.bfloat16, torch.float32))
    n, c, h, w = x.shape
    g, t = _tile_grid("shuffle_tiles", n, h, w, perm, rot, x.device)
    s = g * t
    tiles = x[:, :, :s, :s].unflatten(2, (g, t)).unflatten(4, (g, t)).permute(0, 2, 4, 1, 3, 5)
    moved = tiles.reshape(n, g * g, c, t, t)[torch.arange(n, device=x.device)[:, None], perm]
    for k in (1, 2, 3):
        moved[rot == k] = torch.rot90(moved[rot == k], k, dims=(-2, -1))
    out = torch.empty_like(x) if out is None else out
    out.copy_(x)
    out[:, :, :s, :s] = moved.unflatten(1, (g, g)).permute(0, 3, 1, 4, 2, 5).reshape(n, c, s, s)
    return out


def normalize_affine(mean, std, device=None):
    """float32 (scale, shift) with (x / 255 - mean) / std == x·scale + shift, as the kernels use."""
    scale = torch.tensor([1.0 / (255.0 * float(s)) for s in std], dtype=torch.float32, device=device)
    shift = torch.tensor([-float(m) / float(s) for m, s in zip(mean, std)], dtype=torch.float32, device=device)
    return scale, shift


def _shuffle_tiles_normalize_reference(x, perm, rot, mean, std, dtype, channels_last, out=None):
    op = "shuffle_tiles_normalize"
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be N x H x W x C, got shape {list(x.shape)}")
    _check_dtype(op, "x", x.dtype, (torch.uint8,))
    dtype = dtype if out is None else out.dtype
    _check_dtype(op, "the output dtype", dtype, (torch.float32, torch.bfloat16, torch.float16))
    if len(mean) != x.shape[3] or len(std) != x.shape[3]:
        raise ValueError(f"{op}: mean and std need one value per channel ({x.shape[3]}), got {len(mean)} and {len(std)}")
    if not all(s > 0 and math.isfinite(s) for s in std) or not all(math.isfinite(m) for m in mean):
        raise ValueError(f"{op}: need finite mean and std > 0, got mean {list(mean)} and std {list(std)}")
    scale, shift = normalize_affine(mean, std, x.device)
    y = _shuffle_tiles_reference(x.permute(0, 3, 1, 2), perm, rot)
    y = (y.float() * scale[:, None, None] + shift[:, None, None]).to(dtype)
    if out is not None:
        return out.copy_(y)
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


if tiles_ext is not None:  # shapes for torch.compile / FakeTensor tracing of the C++ operators
    def _fake_tile_args(x, perm, rot, h, w):
        torch._check(perm.dim() == 2 and rot.shape == perm.shape, lambda: "perm and rot must be N x g^2")
        torch._check(perm.shape[0] == x.shape[0], lambda: "perm needs one row per image")
        g = math.isqrt(perm.shape[1])
        torch._check(g * g == perm.shape[1] and 0 < g <= min(h, w), lambda: "bad tile grid")

    @torch.library.register_fake("hmtl::shuffle_tiles")
    def _(x, perm, rot):
        _fake_tile_args(x, perm, rot, x.shape[2], x.shape[3])
        return torch.empty_like(x)

    @torch.library.register_fake("hmtl::shuffle_tiles_out")
    def _(x, perm, rot, out):
        _fake_tile_args(x, perm, rot, x.shape[2], x.shape[3])

    @torch.library.register_fake("hmtl::shuffle_tiles_normalize")
    def _(x, perm, rot, mean, std, dtype, channels_last):
        n, h, w, c = x.shape
        _fake_tile_args(x, perm, rot, h, w)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty((n, c, h, w), dtype=dtype, device=x.device, memory_format=fmt)

    @torch.library.register_fake("hmtl::shuffle_tiles_normalize_out")
    def _(x, perm, rot, mean, std, out):
        _fake_tile_args(x, perm, rot, x.shape[1], x.shape[2])


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


def _render_chunk(args):
    seed, split, size, indices = args
    images, angles = [], []
    for i in indices:
        rng, yaw, pitch, roll = synthetic_pose(seed, split, i)
        images.append(render_head(yaw, pitch, roll, size, rng)[0])
        angles.append((yaw, pitch, roll))
    return np.stack(images), np.array(angles, np.float32)


# ----------------------------------------------------------------------------- datasets
# Every dataset yields (uint8 H x W x 3 RGB crop, float32 angles in degrees), angles in the
# order yaw, pitch, roll (ETH-XGaze has no roll). Any of them can be converted once into
# a memory-mapped cache of fixed-size crops (--cache) that feeds the fused tile op.
ANGLES = ("yaw", "pitch", "roll")
DATASETS = ("synthetic", "300wlp", "aflw2000", "ethxgaze", "biwi")
SOURCES = {
    "300wlp": "300W-LP: http://www.cbsr.ia.ac.cn/users/xiangyuzhu/projects/3DDFA/main.htm (300W-LP.zip)",
    "aflw2000": "AFLW2000-3D: http://www.cbsr.ia.ac.cn/users/xiangyuzhu/projects/3DDFA/main.htm (AFLW2000-3D.zip)",
    "ethxgaze": "ETH-XGaze (224 px face patches): https://ait.ethz.ch/xgaze",
    "biwi": "BIWI_noTrack.npz from FSA-Net's data: https://github.com/shamangary/FSA-Net",
}


class PoseArrays(torch.utils.data.Dataset):
    """Decoded crops: uint8 N x S x S x 3 (in memory or memory-mapped) and float32 N x A angles."""

    def __init__(self, images, angles):
        self.images, self.angles = images, np.asarray(angles, np.float32)

    def __len__(self):
        return len(self.angles)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.images[i])), torch.from_numpy(self.angles[i])


def face_box(pt2d, train, rng):
    """HopeNet's loose face box from the visible 2D landmarks (row 0: x, row 1: y; < 0: invisible).

    Training: k ~ U[0.2, 0.4], margins 0.6k left, 2k top, 0.6k right and bottom; test: k = 0.2,
    margins 2k left, top, right and 0.6k bottom. As in HopeNet, each width is measured after
    the previous side moved. None when no landmark is visible.
    """
    visible = (pt2d >= 0).all(0)
    if not visible.any():
        return None
    (x_min, y_min), (x_max, y_max) = pt2d[:, visible].min(1), pt2d[:, visible].max(1)
    k, (left, top, right, bottom) = (rng.uniform(0.2, 0.4), (0.6, 2, 0.6, 0.6)) if train else (0.2, (2, 2, 2, 0.6))
    x_min -= left * k * abs(x_max - x_min)
    y_min -= top * k * abs(y_max - y_min)
    x_max += right * k * abs(x_max - x_min)
    y_max += bottom * k * abs(y_max - y_min)
    return int(x_min), int(y_min), int(x_max), int(y_max)


def square_crop(image, box, size):
    """Crop `box` (black outside the image), shorter side to `size`, centre crop (HopeNet's test transform)."""
    face = image.crop(box)
    ratio = size / min(face.size)
    face = face.resize((max(size, round(face.width * ratio)), max(size, round(face.height * ratio))),
                       Image.BILINEAR)
    left, top = (face.width - size) // 2, (face.height - size) // 2
    return np.asarray(face.crop((left, top, left + size, top + size)).convert("RGB"))


def resized(image, size):
    """A uint8 H x W x 3 array resized (bilinear) to size x size."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def read_mat(path):
    """(yaw, pitch, roll) in degrees and pt2d from a 300W-LP / AFLW2000 .mat file."""
    from scipy.io import loadmat
    try:
        mat = loadmat(path)
        pitch, yaw, roll = np.degrees(mat["Pose_Para"][0, :3])
        return np.array([yaw, pitch, roll], np.float32), np.asarray(mat["pt2d"], np.float64)
    except Exception as e:
        raise SystemExit(f"{path}: not a 300W-LP / AFLW2000 label file with Pose_Para and pt2d ({e})") from None


class PoseFiles(torch.utils.data.Dataset):
    """300W-LP / AFLW2000-3D as published: name.jpg beside name.mat, in any folder tree.

    Angles beyond ±99° cannot be binned: `drop_out_of_range` filters them (counted in
    .dropped); otherwise they are kept. Training crops draw HopeNet's random margin once
    per image from `seed`, so a cache and direct decoding give the same pixels.
    """

    def __init__(self, root, size, train, seed, drop_out_of_range):
        files = sorted(p for p in Path(root).rglob("*.jpg") if p.with_suffix(".mat").is_file())
        if not files:
            raise SystemExit(f"no name.jpg + name.mat pairs under {root}")
        angles = np.stack([read_mat(p.with_suffix(".mat"))[0] for p in tqdm(files, "reading labels", leave=False)])
        keep = (np.abs(angles) <= 99).all(1) if drop_out_of_range else np.ones(len(files), bool)
        self.dropped = int((~keep).sum())
        self.files, self.angles = [f for f, k in zip(files, keep) if k], angles[keep]
        self.size, self.train, self.seed = size, train, seed

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        try:
            image = Image.open(path).convert("RGB")
        except OSError as e:
            raise SystemExit(f"{path}: cannot decode image ({e})") from None
        box = face_box(read_mat(path.with_suffix(".mat"))[1], self.train, np.random.default_rng([self.seed, i]))
        box = box or (0, 0, image.width, image.height)
        return torch.from_numpy(square_crop(image, box, self.size).copy()), torch.from_numpy(self.angles[i])


class XGazeFiles(torch.utils.data.Dataset):
    """ETH-XGaze subjectXXXX.h5: face_patch N x 224 x 224 x 3 uint8 BGR, face_head_pose N x 2 (pitch, yaw) radians."""

    def __init__(self, root, subjects, size):
        import h5py
        self.paths = [Path(root) / f"subject{s:04d}.h5" for s in subjects]
        angles = []
        for path in self.paths:
            try:
                with h5py.File(path, "r") as f:
                    pitch, yaw = np.degrees(f["face_head_pose"][:]).T
                    assert f["face_patch"].shape[0] == len(yaw)
            except (OSError, KeyError, AssertionError) as e:
                raise SystemExit(f"{path}: not an ETH-XGaze subject file with face_patch and face_head_pose ({e})") from None
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
    """FSA-Net's pre-processed BIWI .npz: image N x S x S x 3 uint8 (BGR: written by OpenCV), pose N x 3
    (yaw, pitch, roll in degrees). Images are resized to `size`."""
    path = Path(path)
    path = path / "BIWI_noTrack.npz" if path.is_dir() else path
    try:
        with np.load(path) as d:
            images, angles = d["image"][..., ::-1], d["pose"][:, :3]
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f"{path}: not FSA-Net's BIWI .npz with 'image' and 'pose' ({e})") from None
    if images.shape[1:3] != (size, size):
        images = np.stack([resized(np.ascontiguousarray(im), size) for im in images])
    return PoseArrays(np.ascontiguousarray(images), angles)


def cached(folder, meta, n, size, angles, chunks):
    """A memory-mapped dataset in `folder` (images.npy, angles.npy, meta.json), reused while `meta`
    matches and otherwise (re)built from chunks(): an iterator of (start, uint8 images, angles)."""
    folder = Path(folder)
    if (folder / "meta.json").is_file() and json.loads((folder / "meta.json").read_text()) == meta:
        return PoseArrays(np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "angles.npy"))
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (n, size, size, 3))
    labels = np.zeros((n, angles), np.float32)
    with tqdm(total=n, desc=f"building {folder}", unit="img") as bar:
        for start, x, y in chunks():
            images[start:start + len(x)], labels[start:start + len(x)] = x, y
            bar.update(len(x))
    images.flush()
    np.save(tmp / "angles.npy", labels)
    (tmp / "meta.json").write_text(json.dumps(meta))
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    tmp.rename(folder)  # appears whole or not at all
    return cached(folder, meta, n, size, angles, chunks)


def synthetic_heads(n, size, seed, split, folder, workers):
    """n rendered heads of split 0 (train) or 1 (validation), generated once into a cache."""
    def chunks():
        starts = range(0, n, 256)
        jobs = [(seed, split, size, range(s, min(s + 256, n))) for s in starts]
        with torch.multiprocessing.get_context("fork").Pool(max(1, workers)) as pool:
            for start, (images, angles) in zip(starts, pool.imap(_render_chunk, jobs)):
                yield start, images, angles

    meta = {"dataset": "synthetic", "n": n, "size": size, "seed": seed, "split": split, "renderer": 3}
    return cached(Path(folder) / f"synthetic-{'train' if split == 0 else 'val'}-{n}-{size}px-seed{seed}",
                  meta, n, size, 3, chunks)


def cache_dataset(dataset, folder, meta, workers):
    """--cache: dataset's crops decoded once into a memory-mapped copy."""
    def chunks():
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=workers)
        for b, (x, y) in enumerate(loader):
            yield b * 64, x.numpy(), y.numpy()

    size = dataset[0][0].shape[0]
    return cached(folder, meta, len(dataset), size, dataset.angles.shape[1], chunks)


def source_fingerprint(paths):
    """What a cache remembers of its source files: names, sizes and modification times."""
    stats = json.dumps([(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in paths])
    return [len(paths), hashlib.sha1(stats.encode()).hexdigest()]


def angle_names(dataset_name):
    return ANGLES[:2] if dataset_name == "ethxgaze" else ANGLES


def xgaze_subjects(root, spec, exclude=()):
    """--train-subjects: a count k (the first k subjects found in root, minus `exclude`) or a list
    '0,3,5' (one subject: '5,')."""
    if "," in spec:
        return [int(s) for s in spec.split(",") if s]
    found = sorted(int(p.stem[len("subject"):]) for p in Path(root).glob("subject*.h5"))
    return [s for s in found if s not in exclude][:int(spec)]


def load_split(cfg, train):
    """The training or validation set the config names; through --cache when it is given."""
    name, root = (cfg["data"], cfg["data_root"]) if train else (cfg["val_data"], cfg["val_root"])
    size, seed, split = cfg["img_size"], cfg["seed"], "train" if train else "val"
    if name == "synthetic":
        n = cfg["synthetic_train"] if train else cfg["synthetic_val"]
        return synthetic_heads(n, size, seed, 0 if train else 1, cfg["cache"] or "data/cache", cfg["workers"])
    if not root or not Path(root).exists() or (Path(root).is_dir() and not any(Path(root).iterdir())):
        flag = "--data-root" if train else "--val-root"
        raise SystemExit(f"{flag} {root!r} for {name}: missing or empty. Get {SOURCES[name]}")
    if name == "biwi":
        return biwi_arrays(root, size)
    if name == "ethxgaze":
        val = [int(s) for s in cfg["val_subjects"].split(",")]
        subjects = xgaze_subjects(root, cfg["train_subjects"], val) if train else val
        dataset = XGazeFiles(root, subjects, size)
        files = dataset.paths
    else:
        drop = train or cfg["aflw2000_reduced"]
        dataset = PoseFiles(root, size, train, seed, drop_out_of_range=drop)
        files = dataset.files
        if dataset.dropped:
            print(f"{name} {split}: {dataset.dropped} images with an angle beyond ±99° left out, {len(dataset)} kept")
        split += "-reduced" if drop and not train else ""
    if not cfg["cache"]:
        return dataset
    meta = {"dataset": name, "source": source_fingerprint(files), "size": size, "train": train, "seed": seed}
    return cache_dataset(dataset, Path(cfg["cache"]) / f"{name}-{split}-{size}px", meta, cfg["workers"])


class GlobalBatches(torch.utils.data.Sampler):
    """One global batch order per epoch, drawn from (seed, epoch); process `rank` of `world` takes
    samples rank::world of each global batch, so any number of processes sees the same batches."""

    def __init__(self, n, batch, seed, shuffle, drop_last, rank=0, world=1):
        self.n, self.batch, self.seed, self.shuffle, self.drop_last = n, batch, seed, shuffle, drop_last
        self.rank, self.world, self.epoch = rank, world, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n // self.batch if self.drop_last else math.ceil(self.n / self.batch)

    def __iter__(self):
        order = torch.randperm(self.n, generator=seeded(self.seed, "order", self.epoch)) if self.shuffle \
            else torch.arange(self.n)
        for b in range(len(self)):
            rows = order[b * self.batch:(b + 1) * self.batch][self.rank::self.world]
            if len(rows):
                yield rows.tolist()


def seeded(*keys):
    """A CPU generator determined by its keys (seed, purpose, epoch, step...)."""
    words = [int(hashlib.sha1(str(k).encode()).hexdigest()[:8], 16) for k in keys]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1))


# ----------------------------------------------------------------------------- augmentation
# On the training device, on whole uint8 batches, every random parameter drawn per sample.
# Like a PIL pipeline it returns uint8 images; the fused tile op then normalises and
# shuffles them in one pass.

class Draws:
    """Per-sample random numbers, drawn for a whole global batch of n, then cut to the rows this
    process holds: any number of processes gives each sample the same numbers."""

    def __init__(self, gen, n, rows, device):
        self.gen, self.n, self.rows, self.device = gen, n, rows, device

    def uniform(self, low, high, *shape):
        return (torch.rand(self.n, *shape, generator=self.gen)[self.rows] * (high - low) + low).to(self.device)

    def integers(self, low, high):
        return torch.randint(low, high, (self.n,), generator=self.gen)[self.rows].to(self.device)

    def normal(self, *shape):
        return torch.randn(self.n, *shape, generator=self.gen)[self.rows].to(self.device)


def zoom(x, draw):  # random central zoom: the central s·H x s·W, s ~ U[0.8, 1], resized back
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = draw.uniform(0.8, 1.0)
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def contrast(x, draw):  # scaled by U[0.6, 1.4] about the image's mean
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * draw.uniform(0.6, 1.4)[:, None, None, None] + mean


def brightness(x, draw):
    return x + draw.uniform(-0.15, 0.15)[:, None, None, None]


def hue(x, draw):  # chroma rotated in YIQ space by up to ±0.1 turn
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device)
    turn = draw.uniform(-0.2 * math.pi, 0.2 * math.pi)
    rot = torch.zeros(len(x), 3, 3, device=x.device)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 2, 2] = 1, turn.cos(), turn.cos()
    rot[:, 1, 2], rot[:, 2, 1] = -turn.sin(), turn.sin()
    return torch.einsum("nij,njhw->nihw", torch.linalg.inv(yiq) @ rot @ yiq, x)


def noise(x, draw):  # Gaussian, sigma ~ U[0, 0.05]
    return x + draw.uniform(0, 0.05)[:, None, None, None] * draw.normal(*x.shape[1:])


def blur(x, draw):  # Gaussian, sigma ~ U[0, 1.5] pixels, separable 7-tap
    n, c, h, w = x.shape
    taps = torch.arange(-3, 4, device=x.device)
    kernel = torch.exp(-taps ** 2 / (2 * draw.uniform(0.01, 1.5)[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)
    y = F.conv2d(F.pad(x.reshape(1, n * c, h, w), (3, 3, 0, 0), mode="replicate"), kernel[:, None, None], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def downscale(x, draw):  # resolution divided by 1, 2, 3 or 4, then brought back
    factor, out = draw.integers(1, 5), x.clone()
    for f in (2, 3, 4):
        rows = (factor == f).nonzero()[:, 0]
        if len(rows):
            small = F.interpolate(x[rows], scale_factor=1 / f, mode="bilinear", antialias=True)
            out[rows] = F.interpolate(small, size=x.shape[-2:], mode="bilinear")
    return out


def cutout(x, draw):  # a square of side U[0.1, 0.4]·H at a random centre, set to the mean colour
    n, _, h, w = x.shape
    half, cy, cx = draw.uniform(0.05, 0.2), draw.uniform(0, 1), draw.uniform(0, 1)
    ys, xs = (torch.arange(h, device=x.device) + 0.5) / h, (torch.arange(w, device=x.device) + 0.5) / w
    inside = ((ys[None, :, None] - cy[:, None, None]).abs() < half[:, None, None]) & \
             ((xs[None, None, :] - cx[:, None, None]).abs() < half[:, None, None])
    return torch.where(inside[:, None], torch.tensor(IMAGENET_MEAN, device=x.device)[None, :, None, None], x)


# Level 1 and 2: the 300W-LP runs; eth41 / eth52: the ETH-XGaze sets of sections 4.1 and 5.2.
AUGMENTATIONS = {"0": (), "1": (zoom, contrast), "2": (zoom, contrast, blur, downscale, cutout),
                 "eth41": (zoom, hue), "eth52": (zoom, noise, cutout, hue, brightness, contrast)}


def augment(images, recipe, draw):
    """uint8 N x H x W x C in and out, the recipe's augmentations applied with per-sample parameters."""
    if not AUGMENTATIONS[recipe]:
        return images
    x = images.permute(0, 3, 1, 2).float() / 255
    for op in AUGMENTATIONS[recipe]:
        x = op(x, draw)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ----------------------------------------------------------------------------- model

def bin_centres(width):
    """Centres of the angle bins spanning [-99°, 99°]: 66 for 3° bins, 198 for 1° bins."""
    return torch.arange(-99 + width / 2, 99, width, dtype=torch.float32)


def expected_angle(logits, centres):
    """The softmax expectation over bin centres: catreg's angle (eq. 2)."""
    return (logits.float().softmax(-1) * centres).sum(-1)


SSL_TASKS = {"none": (), "puzzle": ("puzzle",), "rotation": ("rotation",), "puzzle_rotation": ("puzzle", "rotation")}


class SSLBranch(nn.Module):
    """A self-supervised branch: one residual block of the backbone's own type (it keeps the width,
    so its skip is the identity), global average pooling, Dropout, and one Linear head per tile
    position -- the g² heads stacked in one Linear."""

    def __init__(self, block, channels, tiles, classes, dropout):
        super().__init__()
        self.block = block(channels, channels // block.expansion) if block else nn.Identity()
        self.dropout, self.heads, self.tiles = nn.Dropout(dropout), nn.Linear(channels, tiles * classes), tiles

    def forward(self, features):
        return self.heads(self.dropout(self.block(features).mean((2, 3)))).unflatten(1, (self.tiles, -1))


class HMTL(nn.Module):
    """A torchvision ResNet with supervised pose heads on its pooled output and SS branches at flag
    point `flag` (the output of stage `flag`). forward(x) -> (N x angles x outputs pose head
    outputs, {task: N x g² x classes SS logits}). With angles=0 and ssl_block=False it is the
    SS pre-training network: the SS heads sit where the pose heads were.
    """

    def __init__(self, arch="resnet50", angles=3, head="catreg", bin_width=3, dropout=0.5, task="none", flag=3,
                 grid=2, ssl_dropout=0.2, ssl_block=True):
        super().__init__()
        net = getattr(torchvision.models, arch)()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        block = type(net.layer1[0])
        width = [64 * 2 ** k * block.expansion for k in range(4)]  # channels at flags 1-4
        outputs = len(bin_centres(bin_width)) if head == "catreg" else 1
        self.pose_heads = nn.ModuleList(nn.Sequential(nn.Dropout(dropout), nn.Linear(width[3], outputs))
                                        for _ in range(angles))
        classes = {"puzzle": grid * grid, "rotation": 4}
        self.ssl_branches = nn.ModuleDict({task: SSLBranch(block if ssl_block else None, width[flag - 1],
                                                           grid * grid, classes[task], ssl_dropout)
                                           for task in SSL_TASKS[task]})
        self.flag = flag

    def forward(self, x):
        taps = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            taps.append(x)
        pooled = x.mean((2, 3))
        pose = torch.stack([head(pooled) for head in self.pose_heads], 1) if len(self.pose_heads) else None
        return pose, {task: branch(taps[self.flag - 1]) for task, branch in self.ssl_branches.items()}

    def deployable(self):
        """The supervised network alone, every SS parameter gone: what is evaluated, exported and shipped."""
        net = copy.deepcopy(self)
        net.ssl_branches = nn.ModuleDict()
        return net


def build_model(cfg):
    pretrain = cfg["stage"] == "pretrain"
    return HMTL(cfg["arch"], 0 if pretrain else len(angle_names(cfg["data"])), cfg["head"], cfg["bin_width"],
                cfg["dropout"], "none" if cfg["no_ssh"] else cfg["task"], 4 if pretrain else cfg["flag"],
                cfg["grid"], cfg["ssl_dropout"], ssl_block=not pretrain)


def load_backbone(model, init, arch):
    """--init imagenet (torchvision's weights) or PATH (a torchvision ResNet state dict, or an hmtl
    checkpoint, e.g. from --stage pretrain): copies the backbone; the heads stay as initialised."""
    if init == "imagenet":
        try:
            state = torchvision.models.get_model_weights(arch).DEFAULT.get_state_dict(progress=True)
        except Exception as e:
            raise SystemExit(f"--init imagenet: cannot download torchvision's {arch} weights ({type(e).__name__}); "
                             f"fetch them once elsewhere and pass the file: --init PATH") from e
    else:
        state = load_checkpoint(init)
        state = state.get("model", state)
    rename = {"conv1.": "stem.0.", "bn1.": "stem.1.", **{f"layer{k}.": f"stages.{k - 1}." for k in range(1, 5)}}
    for old, new in rename.items():
        state = {new + k[len(old):] if k.startswith(old) else k: v for k, v in state.items()}
    backbone = {k: v for k, v in state.items() if k.startswith(("stem.", "stages."))}
    wanted = [k for k in model.state_dict() if k.startswith(("stem.", "stages."))]
    if sorted(backbone) != sorted(wanted) or any(backbone[k].shape != model.state_dict()[k].shape for k in wanted):
        raise SystemExit(f"--init {init}: does not hold a {arch} backbone")
    model.load_state_dict(backbone, strict=False)


# ----------------------------------------------------------------------------- losses (paper eq. 1-3)

def rmse(pred, target):
    """Per angle over the batch; the ε keeps the gradient finite at zero error."""
    return ((pred - target) ** 2).mean(0).add(1e-8).sqrt()


def catreg_loss(logits, target, centres, alpha):
    """Eq. 2, catreg (HopeNet): per angle, CE over the bins + α·RMSE of the expected angle; summed."""
    width = float(centres[1] - centres[0])
    bins = ((target + 99) / width).floor().long().clamp(0, len(centres) - 1)
    ce = F.cross_entropy(logits.float().flatten(0, 1), bins.flatten(), reduction="none").view(bins.shape).mean(0)
    return (ce + alpha * rmse(expected_angle(logits, centres), target)).sum()


def reg_loss(outputs, target):
    """Eq. 2, reg: RMSE per angle, summed."""
    return rmse(outputs[..., 0].float(), target).sum()


def ssl_loss(logits, labels):
    """Eq. 3: the cross-entropy of every tile head (batch-averaged), summed over heads and tasks."""
    return sum(F.cross_entropy(logits[t].float().flatten(0, 1), labels[t].flatten(), reduction="sum") / len(labels[t])
               for t in logits)


def hmtl_loss(sl, ss, weight):
    """Eq. 1: L = L_SL + w·L_SS."""
    return sl + weight * ss


def predicted_angles(pose, head, centres):
    return expected_angle(pose, centres) if head == "catreg" else pose[..., 0].float()


# ----------------------------------------------------------------------------- optimizer

class AdaBelief(torch.optim.Optimizer):
    """AdaBelief (Zhuang et al., NeurIPS 2020, Algorithm 2; no rectification; decoupled weight decay):

        m_t = β1·m + (1 - β1)·g
        s_t = β2·s + (1 - β2)·(g - m_t)² + ε
        θ_t = θ - α·(m_t / (1 - β1^t)) / (sqrt(s_t / (1 - β2^t)) + ε)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            (b1, b2), lr, eps = group["betas"], group["lr"], group["eps"]
            states = [self.state[p] for p in params]
            for p, st in zip(params, states):
                if not st:
                    st.update(step=0, m=torch.zeros_like(p), s=torch.zeros_like(p))
                st["step"] += 1
            t = states[0]["step"]  # the parameters of a group step together
            grads, m, s = [p.grad for p in params], [st["m"] for st in states], [st["s"] for st in states]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            torch._foreach_lerp_(m, grads, 1 - b1)
            surprise = torch._foreach_sub(grads, m)
            torch._foreach_mul_(s, b2)
            torch._foreach_addcmul_(s, surprise, surprise, value=1 - b2)
            torch._foreach_add_(s, eps)
            denom = torch._foreach_div(s, 1 - b2 ** t)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - b1 ** t))


# ----------------------------------------------------------------------------- training and evaluation

def prepare(images, cfg, gen, n, rt, task, train):
    """A uint8 N x H x W x 3 batch -> (normalised float N x 3 x H x W input, perm, rot) on the device:
    augmented when training, its tiles shuffled for `task`. Random numbers are drawn for the
    n samples of the global batch; this process keeps rows rt.rows of them."""
    images = images.to(rt.device, non_blocking=True)
    if train:
        images = augment(images, cfg["aug"], Draws(gen, n, rt.rows, rt.device))
    perm, rot = sample_tiles(n, cfg["grid"], task, gen)
    perm, rot = perm[rt.rows].to(rt.device), rot[rt.rows].to(rt.device)
    return shuffle_tiles_normalize(images, perm, rot), perm, rot


def supervised_loss(pose, angles, cfg, rt):
    if cfg["head"] == "catreg":
        return catreg_loss(pose, angles, rt.centres, cfg["alpha"])
    return reg_loss(pose, angles)


def train_one_epoch(model, optimizer, loader, cfg, epoch, rt):
    model.train()
    # HMTL and HMTL w/o SSHs feed the shuffled image to every head (DESIGN.md section 1).
    task = cfg["task"]
    totals, seen, start = torch.zeros(3, device=rt.device), 0, time.perf_counter()
    bar = tqdm(loader, f"epoch {epoch + 1}/{cfg['epochs']}", disable=rt.rank != 0, leave=False, dynamic_ncols=True)
    for step, (images, angles) in enumerate(bar):
        x, perm, rot = prepare(images, cfg, seeded(cfg["seed"], "train", epoch, step), cfg["batch_size"], rt, task, True)
        angles = angles.to(rt.device)
        with rt.autocast():
            pose, ssl = model(x)
        zero = x.new_zeros(())
        sl = supervised_loss(pose, angles, cfg, rt) if pose is not None else zero
        ss = ssl_loss(ssl, {"puzzle": perm, "rotation": rot}) if ssl else zero
        loss = hmtl_loss(sl, ss, cfg["ssl_weight"])
        finite = torch.isfinite(loss).float()
        if rt.world > 1:
            dist.all_reduce(finite, dist.ReduceOp.MIN)
        if not finite:
            raise FloatingPointError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        rt.scaler.scale(loss).backward()
        rt.scaler.step(optimizer)
        rt.scaler.update()
        totals += torch.stack([loss, sl, ss]).detach() * len(images)
        seen += len(images) * rt.world
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}",
                        img_s=f"{seen / (time.perf_counter() - start):.0f}")
    if rt.world > 1:
        dist.all_reduce(totals)
    totals = (totals / max(seen, 1)).tolist()
    return {"train_loss": totals[0], "train_sl_loss": totals[1], "train_ss_loss": totals[2],
            "img_per_s": seen / (time.perf_counter() - start)}


@torch.no_grad()
def evaluate(model, loader, cfg, rt, n_total):
    """MAE per angle on untouched images; SS accuracy per task on shuffled ones (fixed per step,
    so epochs compare)."""
    model.eval()
    names = angle_names(cfg["data"])
    sums = torch.zeros(len(names) + 2 * len(SSL_TASKS[cfg["task"]]) + 1, dtype=torch.float64, device=rt.device)
    for step, (images, angles) in enumerate(loader):
        n, gen = min(cfg["batch_size"], n_total - step * cfg["batch_size"]), seeded(cfg["seed"], "val", step)
        with rt.autocast():
            pose, ssl = model(prepare(images, cfg, gen, n, rt, "none", False)[0])
            if ssl:
                x, perm, rot = prepare(images, cfg, gen, n, rt, cfg["task"], False)
                ssl = model(x)[1]
        if pose is not None:
            sums[:len(names)] += (predicted_angles(pose, cfg["head"], rt.centres) - angles.to(rt.device)).abs().sum(0)
        for k, (task, logits) in enumerate(ssl.items()):
            labels = perm if task == "puzzle" else rot
            sums[len(names) + 2 * k] += (logits.argmax(-1) == labels).sum()
            sums[len(names) + 2 * k + 1] += labels.numel()
        sums[-1] += len(images)
    if rt.world > 1:
        dist.all_reduce(sums)
    metrics = {}
    if model_has_pose(model):
        metrics = {f"val_mae_{a}": (sums[i] / sums[-1]).item() for i, a in enumerate(names)}
        metrics["val_mae_mean"] = sum(metrics.values()) / len(names)
    for k, task in enumerate(SSL_TASKS[cfg["task"]]):
        if sums[len(names) + 2 * k + 1]:
            metrics[f"val_acc_{task}"] = (sums[len(names) + 2 * k] / sums[len(names) + 2 * k + 1]).item()
    return metrics


def model_has_pose(model):
    return len(getattr(model, "module", model).pose_heads) > 0


def runtime(cfg):
    """Device, processes (torchrun sets RANK / WORLD_SIZE), mixed precision and bin centres of a run."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if cfg["sync_bn"] and world > 1 and not use_cuda:
        raise SystemExit("--sync-bn needs CUDA: SyncBatchNorm synchronises GPU processes only")
    if cfg["batch_size"] % world:
        raise SystemExit(f"--batch-size {cfg['batch_size']} (the global batch) must divide by the {world} processes")
    amp = cfg["amp"]
    if amp == "auto":  # bf16 only where the hardware computes it: on AVX2-only CPUs it is emulated, ~10x slower
        amp = "bf16" if use_cuda or torch.ops.mkldnn._is_mkldnn_bf16_supported() else "off"
    if amp == "fp16" and not use_cuda:
        raise SystemExit("--amp fp16 needs a CUDA device; use bf16 or off on the CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return argparse.Namespace(
        device=device, rank=rank, world=world, rows=slice(rank, None, world), amp=amp,
        autocast=lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
        scaler=torch.amp.GradScaler(device.type, enabled=amp == "fp16"),
        centres=bin_centres(cfg["bin_width"]).to(device))


def rank0_first(rt, load):
    """load() in process 0 first -- it may build a cache the others then read -- then in the others."""
    if rt.world > 1 and rt.rank > 0:
        dist.barrier()
    result = load()
    if rt.world > 1 and rt.rank == 0:
        dist.barrier()
    return result


def data_loader(dataset, batches, cfg, rt):
    """Decoded arrays load fastest in the training process itself; files decode in --workers processes."""
    workers = 0 if isinstance(dataset, PoseArrays) else cfg["workers"]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       pin_memory=rt.device.type == "cuda", persistent_workers=workers > 0)


def validation_loader(dataset, cfg, rt):
    """Every validation image once, in order, each process taking its share of every batch."""
    batches = GlobalBatches(len(dataset), cfg["batch_size"], cfg["seed"], False, False, rt.rank, rt.world)
    return data_loader(dataset, batches, cfg, rt)


def save_checkpoint(path, state):
    """Atomic: the file is either the previous checkpoint or the new one, never half of one."""
    tmp = Path(path).with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not Path(path).is_file():
        raise SystemExit(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def write_metrics(out, history, names, baseline):
    """metrics.csv (one row per epoch) and curves.png (training loss and validation MAE per epoch,
    beside the MAE of predicting the training mean)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = list(dict.fromkeys(k for row in history for k in row))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(history)
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [row["train_loss"] for row in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss (eq. 1)", title="training loss")
    if "val_mae_mean" in history[-1]:
        for name in [f"val_mae_{a}" for a in names] + ["val_mae_mean"]:
            right.plot(epochs, [row[name] for row in history], marker="o", label=name[8:])
        right.axhline(baseline, color="grey", ls="--", label="training mean")
        right.set(ylabel="validation MAE (degrees)")
    else:  # SS pre-training: no pose heads
        for name in [k for k in history[-1] if k.startswith("val_acc_")]:
            right.plot(epochs, [row[name] for row in history], marker="o", label=name)
        right.set(ylabel="SS accuracy")
    right.set(xlabel="epoch", title=out.name)
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)


def train(cfg, state=None):
    """Trains (or continues, from `state`) the run cfg describes, in the folder cfg["out"]."""
    rt = runtime(cfg)
    out, main_process = Path(cfg["out"]), rt.rank == 0
    last = out / "last.pt"
    if state and rt.world > 1:  # each process read last.pt itself; a run still writing it splits them
        epochs = torch.tensor([state["epoch"], -state["epoch"]], device=rt.device)
        dist.all_reduce(epochs, dist.ReduceOp.MAX)
        newest, oldest = epochs[0].item(), -epochs[1].item()
        if newest != oldest:
            raise SystemExit(f"the processes read {last} at different epochs ({oldest} to {newest}): "
                             f"another run is still writing to {out}; stop it, then --resume again")
    train_set, val_set = rank0_first(rt, lambda: (load_split(cfg, True), load_split(cfg, False)))
    names = angle_names(cfg["data"])
    torch.manual_seed(cfg["seed"])  # the weights' initialisation, then dropout
    model = build_model(cfg).to(rt.device, memory_format=torch.channels_last)
    if cfg["init"] != "random" and not state:
        load_backbone(model, cfg["init"], cfg["arch"])
    if cfg["sync_bn"] and rt.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = AdaBelief(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg["milestones"], gamma=0.1)
    history, start = [], 0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rt.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if rt.device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], rt.device)
        history, start = state["history"], state["epoch"]
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        print(f"{'resuming' if state else 'starting'} {out} at epoch {start + 1} on {rt.device} "
              f"({rt.world} process{'es' if rt.world > 1 else ''}, amp {rt.amp})\n"
              f"{json.dumps(cfg, indent=None)}\n{len(train_set)} training and {len(val_set)} validation images")
    trained = nn.parallel.DistributedDataParallel(model) if rt.world > 1 else model
    train_batches = GlobalBatches(len(train_set), cfg["batch_size"], cfg["seed"], True, True, rt.rank, rt.world)
    if len(train_batches) == 0:
        raise SystemExit(f"{len(train_set)} training images make no batch of {cfg['batch_size']}")
    loader = data_loader(train_set, train_batches, cfg, rt)
    val_loader = validation_loader(val_set, cfg, rt)
    mean = torch.from_numpy(train_set.angles.mean(0))
    baseline = (torch.from_numpy(val_set.angles) - mean).abs().mean(0)
    score = (lambda m: m["val_mae_mean"]) if model_has_pose(model) else \
        (lambda m: -np.mean([v for k, v in m.items() if k.startswith("val_acc_")]))
    for epoch in range(start, cfg["epochs"]):
        began = time.perf_counter()
        train_batches.set_epoch(epoch)
        kept = f"{last} holds epoch {epoch}" if epoch else "no checkpoint was written yet"
        try:
            stats = train_one_epoch(trained, optimizer, loader, cfg, epoch, rt)
        except FloatingPointError as e:
            raise SystemExit(f"{e}: training stopped; the last good checkpoint: {kept}") from None
        except KeyboardInterrupt:
            raise SystemExit(f"interrupted in epoch {epoch + 1}: {kept}; continue with --resume") from None
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **stats}
        scheduler.step()
        row |= evaluate(trained, val_loader, cfg, rt, len(val_set)) | {"seconds": time.perf_counter() - began}
        best = not history or score(row) < min(score(r) for r in history)
        history.append(row)
        if main_process:
            checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "scaler": rt.scaler.state_dict(),
                          "rng": {"cpu": torch.get_rng_state(),
                                  "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None},
                          "epoch": epoch + 1, "config": cfg, "history": history}
            save_checkpoint(last, checkpoint)
            if best:
                save_checkpoint(out / "best.pt", checkpoint)
            write_metrics(out, history, names, baseline.mean().item())
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    final = history[-1]
    summary = {k: v for k, v in final.items() if k.startswith(("val_", "train_"))}
    if model_has_pose(model):
        summary |= {f"baseline_mae_{a}": baseline[i].item() for i, a in enumerate(names)}
        summary["baseline_mae_mean"] = baseline.mean().item()
        best_row = min(history, key=score)
        summary |= {"best_epoch": best_row["epoch"], "best_val_mae_mean": best_row["val_mae_mean"]}
    summary |= {"epochs": len(history), "train_images": len(train_set), "val_images": len(val_set),
                "seconds": sum(r["seconds"] for r in history), "config": cfg}
    if main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if "val_mae_mean" in summary:
            print(f"final val MAE {summary['val_mae_mean']:.2f}° (" +
                  ", ".join(f"{a} {summary['val_mae_' + a]:.2f}" for a in names) +
                  f"); predicting the training mean: {summary['baseline_mae_mean']:.2f}°. Run folder: {out}")
    if rt.world > 1:
        dist.destroy_process_group()
    return summary


def evaluate_checkpoint(args):
    """--eval-only: a checkpoint's network on its validation set, or on the one the command line names."""
    state = load_checkpoint(args.checkpoint)
    cfg = {**state["config"], **given(args, "val_data", "val_root", "aflw2000_reduced", "cache", "workers", "device")}
    if args.val_data and not args.val_root:
        cfg["val_root"] = None if args.val_data != cfg["data"] else cfg["data_root"]
    rt = runtime(cfg)
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    model = model.to(rt.device, memory_format=torch.channels_last)
    val_set = rank0_first(rt, lambda: load_split(cfg, False))
    metrics = evaluate(model, validation_loader(val_set, cfg, rt), cfg, rt, len(val_set))
    metrics |= {"checkpoint": str(args.checkpoint), "epoch": state["epoch"], "val_data": cfg["val_data"],
                "val_images": len(val_set)}
    if rt.rank == 0:
        print(json.dumps(metrics, indent=1))
    return metrics


# ----------------------------------------------------------------------------- using a trained model

class PoseEstimator(nn.Module):
    """A trained network end to end: normalised N x 3 x S x S images -> N x angles, in degrees."""

    def __init__(self, net, head, bin_width):
        super().__init__()
        self.net, self.head = net, head
        self.register_buffer("centres", bin_centres(bin_width))

    def forward(self, x):
        return predicted_angles(self.net(x)[0], self.head, self.centres)


def trained_estimator(path, device):
    """(PoseEstimator of a checkpoint's deployable network, in eval mode on `device`, its config)."""
    state = load_checkpoint(path)
    cfg = state["config"]
    if cfg["stage"] == "pretrain":
        raise SystemExit(f"{path} is an SS pre-training checkpoint: it has no pose heads")
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    net = PoseEstimator(model.deployable(), cfg["head"], cfg["bin_width"]).eval()
    return net.to(device, memory_format=torch.channels_last), cfg


def predict(args):
    """--predict: yaw, pitch, roll of face crops, printed, written to predictions.csv, and each image
    saved with the three axes drawn. --boxes CSV (path,x_min,y_min,x_max,y_max) crops each image first."""
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    net, cfg = trained_estimator(args.checkpoint, device)
    names, size = angle_names(cfg["data"]), cfg["img_size"]
    files = [f for p in map(Path, args.predict) for f in (sorted(p.rglob("*")) if p.is_dir() else [p])
             if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp")]
    if not files:
        raise SystemExit(f"--predict {' '.join(args.predict)}: no .jpg, .jpeg, .png or .bmp images there")
    boxes = {}
    if args.boxes:
        with open(args.boxes, newline="") as f:
            for row in csv.DictReader(f):
                boxes[row["path"]] = tuple(float(row[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
    out = Path(args.out or "predictions")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for start in range(0, len(files), cfg["batch_size"]):
        batch = [(f, Image.open(f).convert("RGB")) for f in files[start:start + cfg["batch_size"]]]
        boxed = [boxes.get(str(f), boxes.get(f.name, (0, 0, im.width, im.height))) for f, im in batch]
        crops = torch.from_numpy(np.stack([square_crop(im, tuple(map(int, b)), size) for (_, im), b in zip(batch, boxed)]))
        with torch.no_grad():
            angles = net(shuffle_tiles_normalize(crops.to(device), *sample_tiles(len(batch), 1, "none", device=device)))
        for (path, image), box, pose in zip(batch, boxed, angles.tolist()):
            pose = dict(zip(names, pose))
            rows.append({"path": str(path), **{a: round(v, 3) for a, v in pose.items()}})
            side = min(box[2] - box[0], box[3] - box[1])
            draw_axes(ImageDraw.Draw(image), pose["yaw"], pose["pitch"], pose.get("roll", 0.0),
                      ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), side / 2)
            image.save(out / f"{path.stem}_axes.png")
            print(f"{path}: " + ", ".join(f"{a} {v:.1f}" for a, v in pose.items()))
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", *names])
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} predictions in {out / 'predictions.csv'}, images with axes beside it")
    return rows


def export(args, tolerance=1e-3):
    """--export DIR: the deployable network as torch.export (hmtl.pt2) and ONNX (hmtl.onnx, needs the
    onnx package), each checked to give PyTorch's angles within `tolerance` degrees."""
    net, cfg = trained_estimator(args.checkpoint, torch.device("cpu"))
    out = Path(args.export)
    out.mkdir(parents=True, exist_ok=True)
    x = torch.randn(3, 3, cfg["img_size"], cfg["img_size"]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = net(x)
    report = {"parameters": sum(p.numel() for p in net.parameters()), "angles": list(angle_names(cfg["data"]))}
    program = torch.export.export(net, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    torch.export.save(program, out / "hmtl.pt2")
    report["torch.export"] = (torch.export.load(out / "hmtl.pt2").module()(x) - want).abs().max().item()
    try:
        import onnx  # noqa: F401
        torch.onnx.export(net, (x,), out / "hmtl.onnx", input_names=["image"], output_names=["angles"],
                          dynamic_axes={"image": {0: "batch"}, "angles": {0: "batch"}}, dynamo=False)
        import onnxruntime
        session = onnxruntime.InferenceSession(str(out / "hmtl.onnx"))
        report["onnx"] = float(np.abs(session.run(None, {"image": x.numpy()})[0] - want.numpy()).max())
    except ImportError as e:
        report["onnx"] = f"skipped: {e.name} is not installed (pip install onnx onnxruntime)"
    for name in ("torch.export", "onnx"):
        if isinstance(report[name], float) and report[name] > tolerance:
            raise SystemExit(f"{name} gives angles {report[name]:.2g} degrees from PyTorch's (> {tolerance})")
    (out / "export.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


def draw_axes(draw, yaw, pitch, roll, centre, length):
    """The head's axes on a PIL ImageDraw: x red, y green (down the face), z blue (where it faces)."""
    rot = pose_matrix(yaw, pitch, roll)
    for axis, colour in zip(range(3), ("red", "lime", "blue")):
        tip = (centre[0] + length * rot[0, axis], centre[1] + length * rot[1, axis])
        draw.line([tuple(centre), tip], fill=colour, width=max(1, round(length / 20)))


def preview(cfg, path, per_split=12, scale=2):
    """Training crops (top rows) and validation crops (bottom rows) with their ground-truth pose
    axes drawn: look before you train."""
    names, tiles = angle_names(cfg["data"]), []
    for dataset in (load_split(cfg, True), load_split(cfg, False)):
        for i in np.linspace(0, len(dataset) - 1, min(per_split, len(dataset))).astype(int):
            image, angles = dataset[int(i)]
            tile = Image.fromarray(image.numpy()).resize((image.shape[1] * scale,) * 2, Image.NEAREST)
            pose, draw = dict(zip(names, angles.tolist())), ImageDraw.Draw(tile)
            draw_axes(draw, pose["yaw"], pose["pitch"], pose.get("roll", 0.0), (tile.width / 2,) * 2, tile.width / 3)
            draw.text((2, 1), " ".join(f"{v:.0f}" for v in angles.tolist()), fill="white")
            tiles.append(tile)
    side = tiles[0].width
    grid = Image.new("RGB", (6 * side, math.ceil(len(tiles) / 6) * side))
    for k, tile in enumerate(tiles):
        grid.paste(tile, (k % 6 * side, k // 6 * side))
    grid.save(path)
    print(f"{path}: {cfg['data']} training crops, then {cfg['val_data']} validation crops, labelled "
          f"{'/'.join(names)}; axes: x red, y green, facing direction blue")


# ----------------------------------------------------------------------------- command line
# Every value the paper sets is a flag whose default is the paper's; where the paper's runs
# differ by dataset (300W-LP / AFLW2000 / BIWI vs ETH-XGaze) the default comes from PAPER.
# With no --data, synthetic heads train under a quick preset (QUICK) sized for a laptop CPU.
DEFAULTS = dict(data="synthetic", task="none", flag=3, grid=2, stage="train", arch="resnet50", init="random",
                bin_width=3, alpha=2.0, ssl_dropout=0.2, epochs=110, batch_size=64, lr=1e-3, weight_decay=0.0,
                img_size=224, amp="auto", seed=0, workers=4, device="auto", train_subjects="1",
                val_subjects="108,109,111", synthetic_train=20000, synthetic_val=2000)
PAPER = {"300wlp": dict(head="catreg", dropout=0.5, ssl_weight=50.0, milestones=[20, 100], aug="1"),
         "ethxgaze": dict(head="reg", dropout=0.4, ssl_weight=1.0, milestones=[30, 40], aug="eth41")}
QUICK = dict(arch="resnet18", img_size=64, epochs=6, milestones=[5], synthetic_train=4000, synthetic_val=500,
             workers=2)
VALIDATION = {"synthetic": "synthetic", "300wlp": "aflw2000", "aflw2000": "aflw2000", "ethxgaze": "ethxgaze",
              "biwi": "biwi"}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("method")
    g.add_argument("--task", choices=TASKS, help="SS task: none = SL (default none)")
    g.add_argument("--flag", type=int, choices=(1, 2, 3, 4), help="flag point: the SS branch reads stage k (3)")
    g.add_argument("--grid", type=int, help="g x g tiles (2)")
    g.add_argument("--no-ssh", action="store_true", help="HMTL w/o SSHs: shuffled inputs, no SS heads or loss")
    g.add_argument("--stage", choices=("train", "pretrain"), help="pretrain: SS heads alone, at the backbone's end")
    g.add_argument("--ssl-weight", type=float, help="w of eq. 1 (50 for 300W-LP runs, 1 for ETH-XGaze)")
    g.add_argument("--arch", choices=("resnet18", "resnet34", "resnet50"), help="backbone (resnet50)")
    g.add_argument("--init", help="random, imagenet, or a checkpoint / torchvision state dict PATH (random)")
    g.add_argument("--head", choices=("catreg", "reg"), help="pose heads (catreg for 300W-LP, reg for ETH-XGaze)")
    g.add_argument("--bin-width", type=float, help="catreg bin width in degrees: 3 or 1 (3)")
    g.add_argument("--alpha", type=float, help="catreg's RMSE weight (2)")
    g.add_argument("--dropout", type=float, help="before each pose head (0.5 for 300W-LP, 0.4 for ETH-XGaze)")
    g.add_argument("--ssl-dropout", type=float, help="in each SS branch (0.2)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="110 (quick preset: 6)")
    g.add_argument("--milestones", type=int, nargs="+", help="epochs where lr drops x0.1 (20 100; ETH-XGaze 30 40)")
    g.add_argument("--batch-size", type=int, help="the global batch, over all processes (64)")
    g.add_argument("--lr", type=float, help="AdaBelief learning rate (1e-3)")
    g.add_argument("--weight-decay", type=float, help="decoupled weight decay (0)")
    g.add_argument("--img-size", type=int, help="input side in pixels (224; quick preset: 64)")
    g.add_argument("--aug", choices=tuple(AUGMENTATIONS), help="augmentation: 0, 1, 2, eth41, eth52")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision (auto: bf16 on CUDA and on CPUs with bf16 units, else off)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (torchrun)")
    g.add_argument("--seed", type=int, help="(0)")
    g.add_argument("--workers", type=int, help="data-loading processes (4; quick preset: 2)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), help="(auto)")
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=DATASETS, help="training set (synthetic)")
    g.add_argument("--data-root", help="its folder (for biwi: the .npz)")
    g.add_argument("--val-data", choices=DATASETS, help="validation set (synthetic / aflw2000 / ethxgaze / biwi)")
    g.add_argument("--val-root", help="its folder; ETH-XGaze: defaults to --data-root")
    g.add_argument("--aflw2000-reduced", action="store_true", help="AFLW2000: only the faces within ±99°")
    g.add_argument("--train-subjects", help="ETH-XGaze: a count k or a list '0,3,5' (1)")
    g.add_argument("--val-subjects", help="ETH-XGaze (108,109,111)")
    g.add_argument("--cache", help="decode every crop once into a memory-mapped cache in this folder")
    g.add_argument("--synthetic-train", type=int, help="synthetic training images (20000; quick preset: 4000)")
    g.add_argument("--synthetic-val", type=int, help="synthetic validation images (2000; quick preset: 500)")
    g = p.add_argument_group("runs")
    g.add_argument("--out", help="run folder (runs/<data>-<task>-flag<k>-grid<g>-seed<s>); --predict: its output (predictions)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the validation set")
    g.add_argument("--checkpoint", help="a checkpoint (.pt) for --eval-only, --predict or --export")
    g.add_argument("--preview", metavar="PNG", help="save a grid of training and validation crops with their pose axes")
    g = p.add_argument_group("use a trained model (with --checkpoint)")
    g.add_argument("--predict", nargs="+", metavar="PATH", help="images or folders of face crops")
    g.add_argument("--boxes", help="CSV path,x_min,y_min,x_max,y_max: a face box per image to --predict")
    g.add_argument("--export", metavar="DIR", help="write the deployable network as torch.export and ONNX")
    return p


def resolve_config(args):
    """Command line -> the full config: every flag left out takes its default or the paper's."""
    cfg = {k: v for k, v in vars(args).items()}
    preset = {**DEFAULTS, **PAPER["ethxgaze" if (cfg["data"] or "") == "ethxgaze" else "300wlp"],
              **(QUICK if (cfg["data"] or "synthetic") == "synthetic" else {})}
    for key, value in preset.items():
        if cfg.get(key) is None:
            cfg[key] = value
    cfg["val_data"] = cfg["val_data"] or VALIDATION[cfg["data"]]
    if cfg["val_root"] is None and cfg["val_data"] == cfg["data"]:
        cfg["val_root"] = cfg["data_root"]
    cfg["out"] = cfg["out"] or f"runs/{cfg['data']}-{cfg['task']}-flag{cfg['flag']}-grid{cfg['grid']}-seed{cfg['seed']}"
    if cfg["grid"] < 1 or cfg["img_size"] // cfg["grid"] < 4:
        raise SystemExit(f"--grid {cfg['grid']} cannot tile a {cfg['img_size']} px image: tiles need 4 px or more")
    if cfg["stage"] == "pretrain" and cfg["task"] == "none":
        raise SystemExit("--stage pretrain needs an SS --task (puzzle, rotation or puzzle_rotation)")
    if cfg["no_ssh"] and cfg["task"] == "none":
        raise SystemExit("--no-ssh needs a --task: it is HMTL on shuffled inputs without the SS heads")
    if cfg["head"] == "catreg" and (198 / cfg["bin_width"]) % 1:
        raise SystemExit(f"--bin-width {cfg['bin_width']} does not divide the 198° span of the bins")
    return cfg


def given(args, *keys):
    """The flags among `keys` that the command line set."""
    return {k: getattr(args, k) for k in keys if getattr(args, k) not in (None, False)}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    for use, run in (("eval_only", evaluate_checkpoint), ("predict", predict), ("export", export)):
        if getattr(args, use):
            if not args.checkpoint:
                raise SystemExit(f"--{use.replace('_', '-')} needs --checkpoint PATH")
            return run(args)
    cfg = resolve_config(args)
    if cfg["preview"]:
        return preview(cfg, cfg["preview"])
    last = Path(cfg["out"]) / "last.pt"
    if not args.resume:
        if last.exists():
            raise SystemExit(f"{cfg['out']} already holds a run: add --resume to continue it, or pick another --out")
        return train(cfg)
    state = load_checkpoint(last)  # the run goes on as it began; only its length, workers and device may change
    return train({**state["config"], **given(args, "epochs", "workers", "device"), "resume": True,
                  "out": cfg["out"]}, state)  # the folder may have moved since


if __name__ == "__main__":
    main()
