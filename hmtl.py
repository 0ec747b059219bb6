"""Hybrid Multi-Task Learning (HMTL) for fine-grained head pose estimation.

Reference implementation of Pourmirzaei, Montazer and Esmaili, "How Self-Supervised Learning Can be
Used for Fine-Grained Head Pose Estimation?" (2021).

The method. A ResNet regresses yaw, pitch and roll from a face crop (the supervised, SL, part). While
it trains, self-supervised (SS) branches attached at one of the four "flag points" of the backbone
(the output of stage 1, 2, 3 or 4) solve a jigsaw puzzle and/or predict per-tile rotations. Both
parts see the *same* input in one forward pass: every training image is cut into g x g tiles that
are shuffled (and/or rotated) before it enters the network, the pose heads must estimate the pose
of that shuffled face, and the SS heads must say where each tile came from. The loss is
L = L_SL + w·L_SS (eq. 1). The SS branches are dropped for deployment, so the shipped network is
the plain supervised one.

    python hmtl.py --task puzzle --flag 3          # HMTL on synthetic heads (no download)

This file reads top to bottom: the model, the losses, the optimizer, how a training batch is made,
the training step, loop and evaluation, then using a trained model and the command line, and last
the tile op's PyTorch reference. The datasets live in hmtl_data.py, the C++/CUDA tile op in csrc/,
the conventions (angles, tiles, datasets, crops) in docs/method.md.
"""
import argparse
import copy
import csv
import errno
import functools
import hashlib
import json
import math
import os
import shutil
import sys
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

from hmtl_data import (CROP_PROTOCOLS, DATASETS, TEST_SETS, DataError, angle_names, is_arrays, load_split,
                       pose_matrix, split_holdout, square_crop)

try:
    import hmtl_tiles as tiles_ext  # the C++/CUDA tile op, built by `pip install --no-build-isolation -e .`
except ImportError:
    tiles_ext = None

# ----------------------------------------------------------------------------- the model
# A torchvision ResNet. Supervised pose heads sit on its pooled output (after stage 4); SS
# branches read the output of stage `flag`. Pose heads are `catreg` (HopeNet: per angle, a
# softmax over bins whose expectation is the angle) or `reg` (one output per angle).

SSL_TASKS = {"none": (), "puzzle": ("puzzle",), "rotation": ("rotation",), "puzzle_rotation": ("puzzle", "rotation")}


def bin_centres(width):
    """Centres of the catreg bins spanning [-99°, 99°]: 66 for 3° bins, 198 for 1° bins."""
    return torch.arange(-99 + width / 2, 99, width, dtype=torch.float32)


def expected_angle(logits, centres):
    """catreg's angle: the softmax expectation over the bin centres (eq. 2)."""
    return (logits.float().softmax(-1) * centres).sum(-1)


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
    """The network a config describes. Three modes besides plain SL (task none):
    HMTL: SS branches for the task at the flag point; w/o SSHs (--no-ssh): no SS branches at all,
    though the inputs are still shuffled; SS pre-training (--stage pretrain): no pose heads, and the
    SS heads sit directly on the pooled backbone (flag 4, no extra block), where the pose heads were."""
    pretrain = cfg["stage"] == "pretrain"
    return HMTL(arch=cfg["arch"], angles=0 if pretrain else len(angle_names(cfg["data"])), head=cfg["head"],
                bin_width=cfg["bin_width"], dropout=cfg["dropout"], task="none" if cfg["no_ssh"] else cfg["task"],
                flag=4 if pretrain else cfg["flag"], grid=cfg["grid"], ssl_dropout=cfg["ssl_dropout"],
                ssl_block=not pretrain)


IMAGENET_WEIGHTS = {"imagenet": "IMAGENET1K_V1", "imagenet-v2": "IMAGENET1K_V2"}


def load_backbone(model, init, arch):
    """--init imagenet (torchvision's IMAGENET1K_V1 weights, the recipe a 2021 ResNet50 came from),
    imagenet-v2 (IMAGENET1K_V2, torchvision's newer recipe), or PATH (a torchvision ResNet state
    dict, or an hmtl checkpoint, e.g. from --stage pretrain): copies the backbone; the heads stay
    as initialised."""
    if init in IMAGENET_WEIGHTS:
        weights = imagenet_weights(init, arch)
        try:
            state = weights.get_state_dict(progress=True)
        except Exception as e:
            raise SystemExit(f"--init {init}: cannot download torchvision's {weights} ({type(e).__name__}); "
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


def imagenet_weights(init, arch):
    """The torchvision weights enum member that --init names for `arch`; SystemExit if it has none."""
    enum = torchvision.models.get_model_weights(arch)
    if not hasattr(enum, IMAGENET_WEIGHTS[init]):
        raise SystemExit(f"--init {init}: torchvision has no {IMAGENET_WEIGHTS[init]} weights for {arch}")
    return getattr(enum, IMAGENET_WEIGHTS[init])


# ----------------------------------------------------------------------------- the losses (paper eq. 1-3)

def rmse(pred, target):
    """Per angle over the batch; the ε keeps the gradient finite at zero error."""
    return ((pred - target) ** 2).mean(0).add(1e-8).sqrt()


def catreg_loss(logits, target, centres, alpha):
    """Eq. 2, catreg (HopeNet): per angle, CE over the bins + α·RMSE of the expected angle; summed."""
    width = centres[1] - centres[0]  # a tensor: float() would make the host wait for a GPU
    bins = ((target + 99) / width).floor().long().clamp(0, len(centres) - 1)
    ce = F.cross_entropy(logits.float().flatten(0, 1), bins.flatten(), reduction="none").view(bins.shape).mean(0)
    return (ce + alpha * rmse(expected_angle(logits, centres), target)).sum()


def reg_loss(outputs, target):
    """Eq. 2, reg: RMSE per angle, summed."""
    return rmse(outputs[..., 0].float(), target).sum()


def ssl_loss(logits, labels, shuffled=None):
    """Eq. 3: the cross-entropy of every tile head, summed over heads and tasks, averaged over the
    images (over those whose tiles were shuffled, where `shuffled` marks them)."""
    total = 0
    for task in logits:
        ce = F.cross_entropy(logits[task].float().flatten(0, 1), labels[task].flatten(), reduction="none")
        ce = ce.view(labels[task].shape).sum(1)
        total = total + (ce.mean() if shuffled is None else (ce * shuffled).sum() / shuffled.sum().clamp(min=1))
    return total


def hmtl_loss(sl, ss, weight):
    """Eq. 1: L = L_SL + w·L_SS."""
    return sl + weight * ss


def supervised_loss(pose, angles, cfg, centres):
    if cfg["head"] == "catreg":
        return catreg_loss(pose, angles, centres, cfg["alpha"])
    return reg_loss(pose, angles)


def predicted_angles(pose, head, centres):
    return expected_angle(pose, centres) if head == "catreg" else pose[..., 0].float()


# ----------------------------------------------------------------------------- the optimizer

class AdaBelief(torch.optim.Optimizer):
    """AdaBelief (Zhuang et al., NeurIPS 2020) as the official adabelief-pytorch v0.2 package computes
    it, with its defaults: decoupled weight decay and, unless rectify=False, RAdam's rectification.

        m_t = β1·m + (1 - β1)·g                          s_t = β2·s + (1 - β2)·(g - m_t)² + ε
    not rectified:
        θ_t = θ - α·(m_t / (1 - β1^t)) / (sqrt(s_t / (1 - β2^t)) + ε)
    rectified: with ρ_∞ = 2 / (1 - β2) - 1 and ρ_t = ρ_∞ - 2t·β2^t / (1 - β2^t),
        ρ_t ≥ 5:  r_t = sqrt((ρ_t - 4)(ρ_t - 2)ρ_∞ / ((ρ_∞ - 4)(ρ_∞ - 2)ρ_t))
                  θ_t = θ - α·r_t·(m_t / (1 - β1^t))·sqrt(1 - β2^t) / (sqrt(s_t) + ε)
        ρ_t < 5:  θ_t = θ - α·m_t / (1 - β1^t)        (the package's degenerated_to_sgd)

    r_t rises from 0 towards 1 over the first thousands of steps (0.65 at step 1,000, 0.92 at
    3,000 for β2 = 0.999): a built-in learning-rate warm-up.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, rectify=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rectify=rectify))

    @staticmethod
    def rectification(t, beta2):
        """(ρ_t, r_t) of step t; r_t is None where ρ_t < 5."""
        rho_inf = 2 / (1 - beta2) - 1
        rho = rho_inf - 2 * t * beta2 ** t / (1 - beta2 ** t)
        if rho < 5:
            return rho, None
        return rho, math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))

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
            if not group["rectify"]:
                denom = torch._foreach_div(s, 1 - b2 ** t)
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - b1 ** t))
                continue
            _, r = self.rectification(t, b2)
            if r is None:
                torch._foreach_add_(params, m, alpha=-lr / (1 - b1 ** t))
                continue
            denom = torch._foreach_sqrt(s)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, value=-lr * r * math.sqrt(1 - b2 ** t) / (1 - b1 ** t))


# ----------------------------------------------------------------------------- a training batch
# On the training device, a whole uint8 batch at a time: the SS labels (perm, rot) are drawn,
# the images augmented with per-sample parameters, flipped, and then one fused op (csrc/) turns
# them into normalised floats with their tiles shuffled.

TASKS = tuple(SSL_TASKS)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_device(t, device):
    """A CPU tensor on `device`. To a GPU it goes from pinned memory without waiting: a copy from
    ordinary memory first waits for all the work queued on the GPU, so the host could not queue
    the next step while the GPU runs this one."""
    if device is not None and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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
    return to_device(perm, device), to_device(rot, device)


def invert_tiles(perm, rot):
    """The parameters that undo shuffle_tiles(·, perm, rot) exactly."""
    inverse = perm.argsort(1)
    return inverse, ((4 - rot) % 4).gather(1, inverse)


def shuffle_tiles(x, perm, rot, backend="auto", out=None, check=True):
    """out[n, :, tile p] = rot90(x[n, :, tile perm[n, p]], rot[n, p]); pixels off the grid are copied.

    x: N x C x H x W (uint8, float16, bfloat16 or float32; any memory format); perm, rot:
    N x g² int64 on x's device. Tiles are t = min(H, W) // g pixels square, row-major.
    Differentiable in x (the gradient is the inverse shuffle). check=False skips the check
    that perm rows are permutations and rot lies in 0..3 on the host, which on a GPU would
    synchronise: the kernel then stops with a device-side assert on a bad value instead.
    """
    if out is not None:
        _refuse_autograd_out("shuffle_tiles", x, out)
    if _use_extension(backend, x):
        if out is None:
            return torch.ops.hmtl.shuffle_tiles(x, perm, rot, check)
        torch.ops.hmtl.shuffle_tiles_out(x, perm, rot, out, check)
        return out
    return _shuffle_tiles_reference(x, perm, rot, out)


def shuffle_tiles_normalize(x, perm, rot, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float32,
                            channels_last=True, backend="auto", out=None, check=True):
    """Decoded uint8 N x H x W x C images to normalised, shuffled N x C x H x W `dtype`, in one pass.

    Equals shuffle_tiles(x.permute(0, 3, 1, 2), perm, rot) mapped by (x / 255 - mean) / std,
    computed as x·scale + shift in float32 (scale = 1 / (255 std), shift = -mean / std).
    """
    if out is not None:
        _refuse_autograd_out("shuffle_tiles_normalize", x, out)
    if _use_extension(backend, x):
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if out is None:
            return torch.ops.hmtl.shuffle_tiles_normalize(x, perm, rot, mean, std, dtype, channels_last, check)
        torch.ops.hmtl.shuffle_tiles_normalize_out(x, perm, rot, mean, std, out, check)
        return out
    return _shuffle_tiles_normalize_reference(x, perm, rot, mean, std, dtype, channels_last, out)


class Draws:
    """Per-sample random numbers, drawn for a whole global batch of n, then cut to the rows this
    process holds: any number of processes gives each sample the same numbers."""

    def __init__(self, gen, n, rows, device):
        self.gen, self.n, self.rows, self.device = gen, n, rows, device

    def uniform(self, low, high, *shape):
        return to_device(torch.rand(self.n, *shape, generator=self.gen)[self.rows] * (high - low) + low, self.device)

    def integers(self, low, high):
        return to_device(torch.randint(low, high, (self.n,), generator=self.gen)[self.rows], self.device)

    def normal(self, *shape):
        # Drawn on the device from a seed that gen draws: a noise image per sample is too much to
        # draw on the host each step (64 x 3 x 224 x 224: 40-43 ms on the 2-core EPYC).
        seed = torch.randint(2 ** 62, (), generator=self.gen).item()
        device_gen = torch.Generator(self.device).manual_seed(seed)
        return torch.randn(self.n, *shape, generator=device_gen, device=self.device)[self.rows]


def zoom(x, draw):  # random central zoom: the central s·H x s·W, s ~ U[0.8, 1], resized back
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = draw.uniform(0.8, 1.0)
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def contrast(x, draw):  # scaled by U[0.6, 1.4] about the image's mean
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * draw.uniform(0.6, 1.4)[:, None, None, None] + mean


def brightness(x, draw):
    return x + draw.uniform(-0.15, 0.15)[:, None, None, None]


RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)  # once, on the host: inverting on a GPU waits for it


def hue(x, draw):  # chroma rotated in YIQ space by up to ±0.1 turn
    to_yiq, from_yiq = to_device(RGB_TO_YIQ, x.device), to_device(YIQ_TO_RGB, x.device)
    turn = draw.uniform(-0.2 * math.pi, 0.2 * math.pi)
    rot = torch.zeros(len(x), 3, 3, device=x.device)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 2, 2] = 1, turn.cos(), turn.cos()
    rot[:, 1, 2], rot[:, 2, 1] = -turn.sin(), turn.sin()
    return torch.einsum("nij,njhw->nihw", from_yiq @ rot @ to_yiq, x)


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
    factor, out = draw.integers(1, 5), x
    for f in (2, 3, 4):  # every image at every factor, each kept where drawn: picking rows would wait for a GPU
        small = F.interpolate(x, scale_factor=1 / f, mode="bilinear", antialias=True)
        back = F.interpolate(small, size=x.shape[-2:], mode="bilinear")
        out = torch.where((factor == f)[:, None, None, None], back, out)
    return out


def cutout(x, draw):  # a square of side U[0.1, 0.4]·H at a random centre, set to the mean colour
    n, _, h, w = x.shape
    half, cy, cx = draw.uniform(0.05, 0.2), draw.uniform(0, 1), draw.uniform(0, 1)
    ys, xs = (torch.arange(h, device=x.device) + 0.5) / h, (torch.arange(w, device=x.device) + 0.5) / w
    inside = ((ys[None, :, None] - cy[:, None, None]).abs() < half[:, None, None]) & \
             ((xs[None, None, :] - cx[:, None, None]).abs() < half[:, None, None])
    return torch.where(inside[:, None], to_device(torch.tensor(IMAGENET_MEAN), x.device)[None, :, None, None], x)


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


MIRRORED = {"yaw": -1.0, "pitch": 1.0, "roll": -1.0}  # a left-right flip negates yaw and roll


def flip(images, angles, names, draw, probability):
    """HopeNet's horizontal flip: each uint8 N x H x W x C image mirrored with `probability`, its yaw
    and roll negated."""
    flipped = draw.uniform(0, 1) < probability
    images = torch.where(flipped[:, None, None, None], images.flip(2), images)
    sign = to_device(torch.tensor([MIRRORED[a] for a in names]), angles.device)
    return images, torch.where(flipped[:, None], angles * sign, angles)


def prepare(images, angles, cfg, gen, n, rt, *, task, train):
    """A uint8 N x H x W x 3 batch and its angles -> (normalised float N x 3 x H x W input, angles,
    perm, rot, shuffled) on the device.

    train=True augments and flips the images; every image then gets its own random tiles for `task`
    (SS labels perm, rot), except that with --ss-fraction F < 1 only the images marked in the bool
    mask `shuffled` (each with probability F) are shuffled. Random numbers are drawn for the n
    samples of the global batch from `gen`; this process keeps rows rt.rows of them.
    """
    images, angles = images.to(rt.device, non_blocking=True), angles.to(rt.device, non_blocking=True)
    draw = Draws(gen, n, rt.rows, rt.device)
    if train:
        images = augment(images, cfg["aug"], draw)
        if cfg["flip"]:
            images, angles = flip(images, angles, angle_names(cfg["data"]), draw, cfg["flip"])
    perm, rot = sample_tiles(n, cfg["grid"], task, gen)
    perm, rot = to_device(perm[rt.rows], rt.device), to_device(rot[rt.rows], rt.device)
    shuffled = None
    if train and cfg["ss_fraction"] < 1 and task != "none":
        shuffled = draw.uniform(0, 1) < cfg["ss_fraction"]
        identity = sample_tiles(len(perm), cfg["grid"], "none", device=rt.device)
        perm, rot = (torch.where(shuffled[:, None], a, b) for a, b in zip((perm, rot), identity))
    return shuffle_tiles_normalize(images, perm, rot, check=False), angles, perm, rot, shuffled


# ----------------------------------------------------------------------------- training and evaluation

READ_BACK_STEPS = 25  # how often a training epoch reads its loss back to the host (a GPU waits then)


def train_one_epoch(model, optimizer, loader, cfg, epoch, rt):
    """One epoch of the one-pass HMTL step. Each batch is augmented and every image's tiles are
    shuffled for the SS task (a new permutation each time it is seen); that one shuffled image
    feeds the pose heads and the SS heads, and L = L_SL + w·L_SS (eq. 1) is minimised.

    --no-ssh (HMTL w/o SSHs): the images are shuffled the same way, but there are no SS heads, so
    L = L_SL on shuffled images. --stage pretrain: no pose heads, so L = w·L_SS. Task none: SL.
    """
    model.train()
    totals, seen, start = torch.zeros(3, device=rt.device), 0, time.perf_counter()
    # The first step whose loss was not finite, and that loss: noted on the device, read on the host
    # every READ_BACK_STEPS steps, as a read makes the host wait for the GPU. The steps in between
    # train on; nothing of the epoch is saved once it stops.
    bad_step, bad_loss = torch.full((), math.inf, device=rt.device), torch.zeros((), device=rt.device)

    def stop_if_not_finite():
        first = bad_step.clone()
        if rt.world > 1:  # every process stops, naming the first bad step of any
            dist.all_reduce(first, dist.ReduceOp.MIN)
        first, mine, value = torch.stack([first, bad_step, bad_loss]).tolist()
        if first < math.inf:
            what = f"the loss became {value}" if mine == first else "the loss of another process became NaN or infinite"
            raise FloatingPointError(f"{what} at epoch {epoch + 1}, step {int(first) + 1}")

    bar = tqdm(loader, f"epoch {epoch + 1}/{cfg['epochs']}", disable=rt.rank != 0, leave=False, dynamic_ncols=True)
    for step, (images, angles) in enumerate(bar):
        x, angles, perm, rot, shuffled = prepare(images, angles, cfg, seeded(cfg["seed"], "train", epoch, step),
                                                 cfg["batch_size"], rt, task=cfg["task"], train=True)
        with rt.autocast():
            pose, ssl = model(x)
        zero = x.new_zeros(())
        sl = supervised_loss(pose, angles, cfg, rt.centres) if pose is not None else zero
        ss = ssl_loss(ssl, {"puzzle": perm, "rotation": rot}, shuffled) if ssl else zero
        loss = hmtl_loss(sl, ss, cfg["ssl_weight"])
        newly_bad = bad_step.isinf() & ~loss.detach().isfinite()
        bad_step = torch.where(newly_bad, float(step), bad_step)
        bad_loss = torch.where(newly_bad, loss.detach().float(), bad_loss)
        optimizer.zero_grad(set_to_none=True)
        rt.scaler.scale(loss).backward()
        rt.scaler.step(optimizer)
        rt.scaler.update()
        totals += torch.stack([loss, sl, ss]).detach() * len(images)
        seen += len(images) * rt.world
        if (step + 1) % READ_BACK_STEPS == 0:
            stop_if_not_finite()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}")
    stop_if_not_finite()
    if rt.world > 1:
        dist.all_reduce(totals)
    loss, sl, ss = (totals / max(seen, 1)).tolist()
    return {"train_loss": loss, "train_sl_loss": sl, "train_ss_loss": ss,
            "img_per_s": seen / (time.perf_counter() - start)}


@torch.no_grad()
def evaluate(model, loader, cfg, rt, n_total, prefix="val"):
    """MAE per angle on untouched images; SS accuracy per task on shuffled ones (their tiles fixed
    per step, so epochs compare). Keys: {prefix}_mae_{angle}, {prefix}_mae_mean, {prefix}_acc_{task}."""
    model.eval()
    names, tasks = angle_names(cfg["data"]), SSL_TASKS[cfg["task"]] if not cfg["no_ssh"] else ()
    abs_error = torch.zeros(len(names), dtype=torch.float64, device=rt.device)
    right, asked = (torch.zeros(len(tasks), dtype=torch.float64, device=rt.device) for _ in range(2))
    images_seen = torch.zeros((), dtype=torch.float64, device=rt.device)
    for step, (images, angles) in enumerate(loader):
        n, gen = min(cfg["batch_size"], n_total - step * cfg["batch_size"]), seeded(cfg["seed"], prefix, step)
        with rt.autocast():
            x, angles, _, _, _ = prepare(images, angles, cfg, gen, n, rt, task="none", train=False)
            pose, ssl = model(x)
            if ssl:
                x, _, perm, rot, _ = prepare(images, angles, cfg, gen, n, rt, task=cfg["task"], train=False)
                ssl = model(x)[1]
        if pose is not None:
            abs_error += (predicted_angles(pose, cfg["head"], rt.centres) - angles).abs().sum(0)
        for k, task in enumerate(tasks):
            labels = perm if task == "puzzle" else rot
            right[k] += (ssl[task].argmax(-1) == labels).sum()
            asked[k] += labels.numel()
        images_seen += len(images)
    if rt.world > 1:
        for total in (abs_error, right, asked, images_seen):
            dist.all_reduce(total)
    metrics = {}
    if model_has_pose(model):
        metrics = {f"{prefix}_mae_{a}": (abs_error[i] / images_seen).item() for i, a in enumerate(names)}
        metrics[f"{prefix}_mae_mean"] = sum(metrics.values()) / len(names)
    for k, task in enumerate(tasks):
        metrics[f"{prefix}_acc_{task}"] = (right[k] / asked[k]).item()
    return metrics


def model_has_pose(model):
    return len(getattr(model, "module", model).pose_heads) > 0


def cpu_has_bf16():
    """Whether this CPU computes bf16 natively (AVX-512 BF16 / AMX on x86, BF16 on Arm): where it does
    not, bf16 is emulated and measured ~10x slower than fp32. HMTL_CPU_BF16=0 or 1 overrides it."""
    forced = os.environ.get("HMTL_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def runtime(cfg):
    """Device, processes (torchrun sets RANK / WORLD_SIZE), mixed precision and bin centres of a run."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if cfg["sync_bn"] and world > 1 and not use_cuda:
        raise SystemExit("--sync-bn needs CUDA: SyncBatchNorm synchronises GPU processes only")
    if cfg["batch_size"] % world or cfg["batch_size"] // world < 2:
        raise SystemExit(f"--batch-size {cfg['batch_size']} (the global batch) must split evenly over the {world} "
                         f"processes, at least 2 images each (BatchNorm)")
    amp = cfg["amp"]
    if amp == "auto":
        amp = "bf16" if use_cuda or cpu_has_bf16() else "off"
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


def data_loader(dataset, batches, cfg, rt):
    """Decoded arrays load fastest in the training process itself; files decode in --workers processes."""
    workers = 0 if is_arrays(dataset) else cfg["workers"]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       pin_memory=rt.device.type == "cuda", persistent_workers=workers > 0)


def evaluation_loader(dataset, cfg, rt):
    """Every image once, in order, each process taking its share of every batch."""
    batches = GlobalBatches(len(dataset), cfg["batch_size"], cfg["seed"], False, False, rt.rank, rt.world)
    return data_loader(dataset, batches, cfg, rt)


# ----------------------------------------------------------------------------- checkpoints and run files
# A run folder holds config.json, metrics.csv, curves.png, last.pt, best.pt (where a checkpoint
# may be chosen) and summary.json. Every file is written whole or not at all.

RUN_FILES = ("config.json", "metrics.csv", "curves.png", "last.pt", "best.pt", "summary.json")


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
    except Exception as e:
        raise SystemExit(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def checkpoint_state(model, optimizer, scheduler, rt, cfg, history, best_epoch):
    """Everything a run needs to go on exactly where it stopped."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": rt.scaler.state_dict(),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None},
            "epoch": history[-1]["epoch"], "config": cfg, "history": history, "best_epoch": best_epoch}


def restore_state(state, model, optimizer, scheduler, rt):
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rt.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if rt.device.type == "cuda" and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], rt.device)


def repair_best(out, state):
    """last.pt is written before best.pt: if a run was stopped between the two, best.pt still holds an
    older epoch while last.pt names itself the best. Then last.pt is what best.pt must hold."""
    best = Path(out) / "best.pt"
    if state.get("best_epoch") == state["epoch"] and \
            (not best.is_file() or load_checkpoint(best)["epoch"] != state["epoch"]):
        save_checkpoint(best, state)


def write_metrics(out, history, names, baseline):
    """metrics.csv (one row per epoch) and curves.png (training loss and validation MAE per epoch,
    beside the MAE of predicting the training mean)."""
    import io
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = list(dict.fromkeys(k for row in history for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(history)
    write_atomically(out / "metrics.csv", lambda f: f.write(text.getvalue().encode()))
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
    fig.tight_layout()
    write_atomically(out / "curves.png", lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


def selection_score(row, prefix):
    """What best.pt minimises: the MAE, or for SS pre-training, minus the mean SS accuracy."""
    if f"{prefix}_mae_mean" in row:
        return row[f"{prefix}_mae_mean"]
    return -np.mean([v for k, v in row.items() if k.startswith(f"{prefix}_acc_")])


def not_finite(model, row):
    """What became NaN or infinite: metrics of the row and, as one item, the weights."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        bad.append("the weights")
    return bad


# ----------------------------------------------------------------------------- the training loop

def train(cfg, state=None):
    """Trains (or continues, from `state`) the run cfg describes, in the folder cfg["out"].

    Reported figures come from the final epoch. best.pt is written only where a checkpoint may be
    chosen: on a held-out part of the training set (--holdout), or on a validation set that is
    not a test set (synthetic heads); summary.json names the set that chose it.
    """
    rt = runtime(cfg)
    out, main_process = Path(cfg["out"]), rt.rank == 0
    last, best = out / "last.pt", out / "best.pt"
    if state and rt.world > 1:  # each process read last.pt itself; a run still writing it splits them
        epochs = torch.tensor([state["epoch"], -state["epoch"]], device=rt.device)
        dist.all_reduce(epochs, dist.ReduceOp.MAX)
        newest, oldest = epochs[0].item(), -epochs[1].item()
        if newest != oldest:
            raise SystemExit(f"the processes read {last} at different epochs ({oldest} to {newest}): "
                             f"another run is still writing to {out}; stop it, then --resume again")
    train_set, val_set = rank0_first(rt, lambda: (load_split(cfg, True), load_split(cfg, False)))
    holdout = None
    if cfg["holdout"]:
        train_set, holdout = split_holdout(train_set, cfg["holdout"], cfg["seed"])
    chooser = "holdout" if holdout is not None else None if cfg["val_data"] in TEST_SETS else "val"
    names = angle_names(cfg["data"])
    torch.manual_seed(cfg["seed"])  # the weights' initialisation, then dropout
    model = build_model(cfg).to(rt.device, memory_format=torch.channels_last)
    if cfg["init"] != "random" and not state:
        load_backbone(model, cfg["init"], cfg["arch"])
    if cfg["sync_bn"] and rt.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = AdaBelief(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], rectify=cfg["rectify"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg["milestones"], gamma=0.1)
    history, best_epoch = [], None
    if state:
        restore_state(state, model, optimizer, scheduler, rt)
        history, best_epoch = state["history"], state.get("best_epoch")
        if main_process and chooser:
            repair_best(out, state)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / "config.json", lambda f: f.write(json.dumps(cfg, indent=1).encode()))
        print(f"{'resuming' if state else 'starting'} {out} at epoch {len(history) + 1} on {rt.device} "
              f"({rt.world} process{'es' if rt.world > 1 else ''}, amp {rt.amp})\n"
              f"{json.dumps(cfg, indent=None)}\n{len(train_set)} training, "
              f"{f'{len(holdout)} held-out and ' if holdout is not None else ''}{len(val_set)} validation images")
    trained = nn.parallel.DistributedDataParallel(model) if rt.world > 1 else model
    train_batches = GlobalBatches(len(train_set), cfg["batch_size"], cfg["seed"], True, True, rt.rank, rt.world)
    if len(train_batches) == 0:
        raise SystemExit(f"{len(train_set)} training images make no batch of {cfg['batch_size']}")
    loader = data_loader(train_set, train_batches, cfg, rt)
    evaluated = [("val", val_set, evaluation_loader(val_set, cfg, rt))]
    if holdout is not None:
        evaluated.append(("holdout", holdout, evaluation_loader(holdout, cfg, rt)))
    mean = torch.from_numpy(train_set.angles.mean(0))
    baseline = (torch.from_numpy(val_set.angles) - mean).abs().mean(0)
    for epoch in range(len(history), cfg["epochs"]):
        began = time.perf_counter()
        train_batches.set_epoch(epoch)
        kept = f"{last} holds epoch {epoch}" if epoch else "no checkpoint was written yet"
        try:
            stats = train_one_epoch(trained, optimizer, loader, cfg, epoch, rt)
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **stats}
            scheduler.step()
            for prefix, dataset, evaluation in evaluated:
                row |= evaluate(trained, evaluation, cfg, rt, len(dataset), prefix)
        except FloatingPointError as e:
            raise SystemExit(f"{e}: training stopped; {kept}") from None
        except KeyboardInterrupt:
            raise SystemExit(f"interrupted in epoch {epoch + 1}: {kept}; continue with --resume") from None
        bad = not_finite(model, row)
        if bad:
            raise SystemExit(f"epoch {epoch + 1}: {', '.join(bad)} became NaN or infinite (is the learning rate "
                             f"too high?): training stopped, nothing of this epoch was written; {kept}")
        row["seconds"] = time.perf_counter() - began
        history.append(row)
        if chooser and (best_epoch is None or selection_score(row, chooser) <
                        selection_score(history[best_epoch - 1], chooser)):
            best_epoch = epoch + 1
        if main_process:
            state = checkpoint_state(model, optimizer, scheduler, rt, cfg, history, best_epoch)
            save_checkpoint(last, state)
            if best_epoch == epoch + 1:
                save_checkpoint(best, state)
            write_metrics(out, history, names, baseline.mean().item())
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    summary = {k: v for k, v in history[-1].items() if k.startswith(("val_", "holdout_", "train_"))}
    if model_has_pose(model):
        summary |= {f"baseline_mae_{a}": baseline[i].item() for i, a in enumerate(names)}
        summary["baseline_mae_mean"] = baseline.mean().item()
    summary |= {"best_pt": {"epoch": best_epoch, "chosen_on": chosen_on(chooser, cfg, holdout)},
                "epochs": len(history), "train_images": len(train_set), "val_images": len(val_set),
                "seconds": sum(r["seconds"] for r in history), "config": cfg}
    if main_process:
        write_atomically(out / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
        if "val_mae_mean" in summary:
            print(f"final val MAE {summary['val_mae_mean']:.2f}° (" +
                  ", ".join(f"{a} {summary['val_mae_' + a]:.2f}" for a in names) +
                  f"); predicting the training mean: {summary['baseline_mae_mean']:.2f}°. Run folder: {out}")
    if rt.world > 1:
        dist.destroy_process_group()
    return summary


def chosen_on(chooser, cfg, holdout):
    """What summary.json says of best.pt: the set that chose it, or why there is none."""
    if chooser == "holdout":
        return f"{len(holdout)} images held out of the training set (--holdout {cfg['holdout']})"
    if chooser == "val":
        return f"the validation set ({cfg['val_data']}, not a test set)"
    return (f"not written: the validation set ({cfg['val_data']}) is a test set; --holdout F chooses on a part "
            f"of the training set")


def evaluate_checkpoint(path, state, overrides):
    """--eval-only: a checkpoint's network on its validation set, or on the one the command line names."""
    cfg = {**checkpoint_config(state), **overrides}
    rt = runtime(cfg)
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    model = model.to(rt.device, memory_format=torch.channels_last)
    val_set = rank0_first(rt, lambda: load_split(cfg, False))
    metrics = evaluate(model, evaluation_loader(val_set, cfg, rt), cfg, rt, len(val_set))
    metrics |= {"checkpoint": str(path), "epoch": state["epoch"], "val_data": cfg["val_data"],
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
    if not all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()):
        raise SystemExit(f"{path}: its weights hold NaN or infinite values; it cannot predict")
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    net = PoseEstimator(model.deployable(), cfg["head"], cfg["bin_width"]).eval()
    return net.to(device, memory_format=torch.channels_last), cfg


BOX_COLUMNS = ("path", "x_min", "y_min", "x_max", "y_max")


def read_boxes(path):
    """--boxes CSV (path,x_min,y_min,x_max,y_max): {path or file name: (line, box)}; a bad file or row
    stops with its name and line."""
    import io
    try:
        reader = csv.DictReader(io.StringIO(Path(path).read_text(encoding="utf-8")))
        header = reader.fieldnames
    except OSError as e:
        raise SystemExit(f"--boxes {path}: cannot read it ({e.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise SystemExit(f"--boxes {path}: not a UTF-8 CSV file ({e})") from None
    if not header or not set(BOX_COLUMNS) <= set(header):
        raise SystemExit(f"--boxes {path}: needs the columns {','.join(BOX_COLUMNS)}, its header is {header}")
    boxes = {}
    try:
        for row in reader:
            where = f"--boxes {path} line {reader.line_num}"
            try:
                box = tuple(float(row[k]) for k in BOX_COLUMNS[1:])
            except (TypeError, ValueError):
                raise SystemExit(f"{where}: x_min, y_min, x_max, y_max must be numbers, got "
                                 f"{[row.get(k) for k in BOX_COLUMNS[1:]]}") from None
            if not all(map(math.isfinite, box)) or box[2] <= box[0] or box[3] <= box[1]:
                raise SystemExit(f"{where}: the box {box} is empty (it needs x_min < x_max and y_min < y_max)")
            if row["path"] in boxes:
                raise SystemExit(f"{where}: {row['path']} already has a box on line {boxes[row['path']][0]}")
            boxes[row["path"]] = (reader.line_num, box)
    except csv.Error as e:
        raise SystemExit(f"--boxes {path} line {reader.line_num}: {e}") from None
    return boxes


def unique_name(stem, used):
    """stem_axes.png, or stem-2_axes.png, ... when two images share a name."""
    name, k = f"{stem}_axes.png", 1
    while name in used:
        k += 1
        name = f"{stem}-{k}_axes.png"
    used.add(name)
    return name


def predict(args):
    """--predict: yaw, pitch, roll of face crops, printed, written to predictions.csv, and each image
    saved with the three axes drawn. --boxes CSV (path,x_min,y_min,x_max,y_max) crops each image
    first. Images that cannot be read (or whose box misses them) are skipped, listed at the end, and
    make the exit status nonzero; predictions.csv always holds every image that succeeded."""
    device = torch.device("cuda" if args["device"] != "cpu" and torch.cuda.is_available() else "cpu")
    net, cfg = trained_estimator(args["checkpoint"], device)
    names, size = angle_names(cfg["data"]), cfg["img_size"]
    files = [f for p in map(Path, args["predict"]) for f in (sorted(p.rglob("*")) if p.is_dir() else [p])
             if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp")]
    if not files:
        raise SystemExit(f"--predict {' '.join(args['predict'])}: no .jpg, .jpeg, .png or .bmp images there")
    boxes = read_boxes(args["boxes"]) if args.get("boxes") else {}
    out = Path(args.get("out") or "predictions")
    out.mkdir(parents=True, exist_ok=True)
    rows, failed, matched, drawn_names = [], [], set(), set()
    for start in range(0, len(files), cfg["batch_size"]):
        batch = []
        for path in files[start:start + cfg["batch_size"]]:
            try:
                with Image.open(path) as opened:
                    image = opened.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                failed.append((path, f"cannot decode it ({e})"))
                continue
            line, box = boxes.get(str(path)) or boxes.get(path.name) or (None, (0, 0, image.width, image.height))
            matched.add(line)
            if box[2] <= 0 or box[3] <= 0 or box[0] >= image.width or box[1] >= image.height:
                failed.append((path, f"its box {box} (--boxes line {line}) lies outside the "
                                     f"{image.width}x{image.height} image"))
                continue
            batch.append((path, image, box))
        if not batch:
            continue
        crops = torch.from_numpy(np.stack([square_crop(im, tuple(map(int, b)), size) for _, im, b in batch]))
        with torch.no_grad():
            angles = net(shuffle_tiles_normalize(crops.to(device), *sample_tiles(len(batch), 1, "none", device=device)))
        if not torch.isfinite(angles).all():
            raise SystemExit(f"{args['checkpoint']}: the network gives NaN or infinite angles")
        for (path, image, box), pose in zip(batch, angles.tolist()):
            pose = dict(zip(names, pose))
            side = min(box[2] - box[0], box[3] - box[1])
            draw_axes(ImageDraw.Draw(image), pose["yaw"], pose["pitch"], pose.get("roll", 0.0),
                      ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), side / 2)
            drawn = unique_name(path.stem, drawn_names)
            image.save(out / drawn)
            rows.append({"path": str(path), **{a: round(v, 3) for a, v in pose.items()}, "drawn": drawn})
            print(f"{path}: " + ", ".join(f"{a} {v:.1f}" for a, v in pose.items()))

    def write_csv(f):
        import io
        text = io.StringIO()
        writer = csv.DictWriter(text, ["path", *names, "drawn"])
        writer.writeheader()
        writer.writerows(rows)
        f.write(text.getvalue().encode())
    write_atomically(out / "predictions.csv", write_csv)
    print(f"{len(rows)} predictions in {out / 'predictions.csv'}, images with axes beside it")
    unmatched = sorted(line for line, _ in boxes.values() if line not in matched)
    if unmatched:
        print(f"--boxes {args['boxes']}: {len(unmatched)} row(s) match no image given to --predict, "
              f"lines {', '.join(map(str, unmatched))}", file=sys.stderr)
    if failed:
        for path, why in failed:
            print(f"{path}: skipped: {why}", file=sys.stderr)
        raise SystemExit(f"{len(failed)} of {len(files)} images were skipped (listed above); "
                         f"{out / 'predictions.csv'} holds the other {len(rows)}")
    return rows


def export(args, tolerance=1e-3):
    """--export DIR: the deployable network as torch.export (hmtl.pt2) and ONNX (hmtl.onnx, needs the
    onnx package), each checked to give PyTorch's angles within `tolerance` degrees."""
    net, cfg = trained_estimator(args["checkpoint"], torch.device("cpu"))
    out = Path(args["export"])
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
        if isinstance(report[name], float) and not report[name] <= tolerance:  # NaN fails too
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
DEFAULTS = dict(data="synthetic", task="none", flag=3, grid=2, stage="train", no_ssh=False, ss_fraction=1.0,
                arch="resnet50", init="random", bin_width=3.0, alpha=2.0, ssl_dropout=0.2, epochs=110,
                batch_size=64, lr=1e-3, weight_decay=0.0, rectify=True, img_size=224, flip=0.5, amp="auto",
                sync_bn=False, seed=0, workers=4, device="auto", data_root=None, val_data=None, val_root=None,
                aflw2000_reduced=False, crop="hopenet", holdout=0.0, train_subjects="1", val_subjects="108,109,111",
                cache=None, synthetic_train=20000, synthetic_val=2000, out=None)
PAPER = {"300wlp": dict(head="catreg", dropout=0.5, ssl_weight=50.0, milestones=[20, 100], aug="1"),
         "ethxgaze": dict(head="reg", dropout=0.4, ssl_weight=1.0, milestones=[30, 40], aug="eth41")}
QUICK = dict(arch="resnet18", img_size=64, epochs=6, milestones=[5], synthetic_train=4000, synthetic_val=500,
             workers=2)
VALIDATION = {"synthetic": "synthetic", "300wlp": "aflw2000", "aflw2000": "aflw2000", "ethxgaze": "ethxgaze",
              "biwi": "biwi"}
# What --resume may change (the run's length, where it runs, where its data now lies), what
# --eval-only may (which set it evaluates, and how it is read), and the flags --predict and
# --export read (any other is refused).
RESUMABLE = {"epochs", "workers", "device", "cache", "data_root", "val_root"}
EVALUATION = {"val_data", "val_root", "aflw2000_reduced", "crop", "cache", "workers", "device", "batch_size"}
USE = {"predict": {"predict", "checkpoint", "boxes", "out", "device"}, "export": {"export", "checkpoint"}}
PROG = "hmtl.py"


class UsageError(SystemExit):
    """A bad flag or flag combination: exit status 2 (argparse's) and one line, printed by main()."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def bounded(kind, low=None, high=None, *, above=None, below=None):
    """An argparse type: a number of `kind` in the interval the bounds give (low/high inclusive,
    above/below exclusive)."""
    lower = f"≥ {low}" if low is not None else f"> {above}" if above is not None else None
    upper = f"≤ {high}" if high is not None else f"< {below}" if below is not None else None
    what = f"{'an integer' if kind is int else 'a number'} {' and '.join(b for b in (lower, upper) if b)}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not (math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high)
                and (above is None or value > above) and (below is None or value < below)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


def subject_list(text):
    """ETH-XGaze subjects: a count k, or a comma list '0,3,5' (one subject: '5,')."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts or not all(p.strip().isdigit() for p in parts) or ("," not in text and int(text) < 1):
        raise argparse.ArgumentTypeError(f"must be a count k ≥ 1 or subject numbers like 0,3,5; got {text!r}")
    return text


def shown(key):
    """A flag's default as --help shows it, read from the presets."""
    def text(v):
        if isinstance(v, list):
            return " ".join(map(str, v))
        if isinstance(v, bool) or v is None:
            return {True: "on", False: "off", None: "none"}[v]
        return f"{v:g}" if isinstance(v, (int, float)) else str(v)
    parts = [f"300W-LP/AFLW2000/BIWI {text(PAPER['300wlp'][key])}, ETH-XGaze {text(PAPER['ethxgaze'][key])}"] \
        if key in PAPER["300wlp"] else [text(DEFAULTS[key])]
    if key in QUICK:
        parts.append(f"quick preset {text(QUICK[key])}")
    return f" (default: {'; '.join(parts)})"


def get_args_parser():
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               argument_default=argparse.SUPPRESS)  # only the flags given appear: the rest come from the presets

    def add(group, flag, help, **kw):
        key = flag[2:].replace("-", "_")
        group.add_argument(flag, help=help + (shown(key) if key in DEFAULTS or key in PAPER["300wlp"] else ""), **kw)

    g = p.add_argument_group("method")
    add(g, "--task", "SS task; none = SL", choices=TASKS)
    add(g, "--flag", "flag point: the SS branch reads the output of stage k", type=int, choices=(1, 2, 3, 4))
    add(g, "--grid", "g x g tiles", type=bounded(int, 1))
    add(g, "--no-ssh", "HMTL w/o SSHs: shuffled inputs, no SS heads or loss", action="store_true")
    add(g, "--stage", "pretrain: the SS heads alone, at the backbone's end", choices=("train", "pretrain"))
    add(g, "--ssl-weight", "w of eq. 1", type=bounded(float, 0))
    add(g, "--ss-fraction", "shuffle only this fraction of each training batch (drawn per image); "
        "the SS loss averages over those", type=bounded(float, above=0, high=1))
    add(g, "--arch", "backbone", choices=("resnet18", "resnet34", "resnet50"))
    add(g, "--init", "random, imagenet (torchvision's IMAGENET1K_V1), imagenet-v2 (IMAGENET1K_V2), or a "
        "checkpoint / torchvision state dict PATH")
    add(g, "--head", "pose heads", choices=("catreg", "reg"))
    add(g, "--bin-width", "catreg bin width in degrees (3 or 1)", type=bounded(float, above=0))
    add(g, "--alpha", "catreg's RMSE weight", type=bounded(float, 0))
    add(g, "--dropout", "before each pose head", type=bounded(float, 0, below=1))
    add(g, "--ssl-dropout", "in each SS branch", type=bounded(float, 0, below=1))
    g = p.add_argument_group("training")
    add(g, "--epochs", "", type=bounded(int, 1))
    add(g, "--milestones", "epochs after which the learning rate drops x0.1", type=bounded(int, 1), nargs="+")
    add(g, "--batch-size", "the global batch, over all processes", type=bounded(int, 2))
    add(g, "--lr", "AdaBelief's learning rate", type=bounded(float, above=0))
    add(g, "--weight-decay", "decoupled weight decay", type=bounded(float, 0))
    add(g, "--rectify", "AdaBelief's rectification, on as in the official package", action=argparse.BooleanOptionalAction)
    add(g, "--img-size", "input side in pixels", type=bounded(int, 16))
    add(g, "--aug", "augmentation: 0, 1, 2, eth41, eth52", choices=tuple(AUGMENTATIONS))
    add(g, "--flip", "probability of HopeNet's horizontal flip (yaw and roll negated); on by default, as it "
        "measured better on BIWI's development split (README)", type=bounded(float, 0, 1))
    add(g, "--amp", "mixed precision; auto: bf16 on CUDA and on CPUs with bf16 units, else off",
        choices=("auto", "bf16", "fp16", "off"))
    add(g, "--sync-bn", "SyncBatchNorm across processes (torchrun, GPUs)", action="store_true")
    add(g, "--seed", "", type=bounded(int, 0, 2 ** 63 - 1))
    add(g, "--workers", "data-loading processes", type=bounded(int, 0))
    add(g, "--device", "", choices=("auto", "cpu", "cuda"))
    g = p.add_argument_group("data")
    add(g, "--data", "training set", choices=DATASETS)
    add(g, "--data-root", "its folder (for biwi: the .npz)")
    add(g, "--val-data", "validation set (none: the training set's test set)", choices=DATASETS)
    add(g, "--val-root", "its folder; defaults to --data-root when it is the training set's dataset")
    add(g, "--aflw2000-reduced", "AFLW2000: only the faces within ±99° (the 1969 protocol)",
        action=argparse.BooleanOptionalAction)
    add(g, "--crop", "AFLW2000 / 300W-LP face boxes: hopenet (the published code's, -1 landmarks "
        "included) or visible (visible landmarks only)", choices=CROP_PROTOCOLS)
    add(g, "--holdout", "hold out this fraction of the training set to choose best.pt on", type=bounded(float, above=0, below=1))
    add(g, "--train-subjects", "ETH-XGaze: a count k or a list 0,3,5", type=subject_list)
    add(g, "--val-subjects", "ETH-XGaze", type=subject_list)
    add(g, "--cache", "decode every crop once into a memory-mapped cache in this folder")
    add(g, "--synthetic-train", "synthetic training images", type=bounded(int, 1))
    add(g, "--synthetic-val", "synthetic validation images", type=bounded(int, 1))
    g = p.add_argument_group("runs")
    add(g, "--out", "run folder (runs/<data>-<task>-flag<k>-grid<g>-seed<s>); --predict: its output (predictions)")
    add(g, "--resume", "continue the run in --out from its last checkpoint", action="store_true")
    add(g, "--overwrite", "replace the finished or unfinished run in --out", action="store_true")
    add(g, "--eval-only", "evaluate --checkpoint on its validation set, or on --val-data", action="store_true")
    add(g, "--checkpoint", "a checkpoint (.pt) for --eval-only, --predict or --export")
    add(g, "--preview", "save a grid of training and validation crops with their pose axes", metavar="PNG")
    g = p.add_argument_group("use a trained model (with --checkpoint)")
    add(g, "--predict", "images or folders of face crops", nargs="+", metavar="PATH")
    add(g, "--boxes", "CSV path,x_min,y_min,x_max,y_max: a face box per image to --predict")
    add(g, "--export", "write the deployable network as torch.export and ONNX", metavar="DIR")
    return p


def preset(data):
    """Every setting's default for a training set: DEFAULTS, the paper's for its family, QUICK for synthetic."""
    return {**DEFAULTS, **PAPER["ethxgaze" if data == "ethxgaze" else "300wlp"],
            **(QUICK if data == "synthetic" else {})}


def resolve_config(given):
    """The flags given -> the full config of a run: every flag left out takes its preset, then the
    combinations are checked (UsageError, exit status 2)."""
    cfg = {**preset(given.get("data", DEFAULTS["data"])),
           **{k: v for k, v in given.items() if k in DEFAULTS or k in PAPER["300wlp"]}}
    cfg["val_data"] = cfg["val_data"] or VALIDATION[cfg["data"]]
    if cfg["val_root"] is None and cfg["val_data"] == cfg["data"]:
        cfg["val_root"] = cfg["data_root"]
    cfg["out"] = cfg["out"] or f"runs/{cfg['data']}-{cfg['task']}-flag{cfg['flag']}-grid{cfg['grid']}-seed{cfg['seed']}"
    ss = cfg["task"] != "none"
    problems = [
        (cfg["img_size"] // cfg["grid"] < 4, f"--grid {cfg['grid']} cannot tile a {cfg['img_size']} px image: "
                                             f"tiles need 4 px or more"),
        (cfg["grid"] < 2 and "puzzle" in cfg["task"], f"--task {cfg['task']} needs --grid 2 or more"),
        (cfg["stage"] == "pretrain" and not ss, "--stage pretrain needs an SS --task (puzzle, rotation or puzzle_rotation)"),
        (cfg["no_ssh"] and not ss, "--no-ssh needs a --task: it is HMTL on shuffled inputs without the SS heads"),
        (cfg["ss_fraction"] < 1 and not ss, "--ss-fraction needs an SS --task"),
        (cfg["head"] == "catreg" and abs(198 / cfg["bin_width"] - round(198 / cfg["bin_width"])) > 1e-9,
         f"--bin-width {cfg['bin_width']:g} does not divide the 198° span of the bins"),
        (cfg["data"] == "synthetic" and round(cfg["synthetic_train"] * (1 - cfg["holdout"])) < cfg["batch_size"],
         f"--synthetic-train {cfg['synthetic_train']} (less --holdout) makes no batch of {cfg['batch_size']}"),
    ]
    for bad, message in problems:
        if bad:
            raise UsageError(message)
    if cfg["init"] in IMAGENET_WEIGHTS:
        try:
            imagenet_weights(cfg["init"], cfg["arch"])
        except SystemExit as e:
            raise UsageError(str(e)) from None
    return cfg


def checkpoint_config(state):
    """A checkpoint's config, settings it predates taking their defaults."""
    return {**preset(state["config"]["data"]), **state["config"]}


def refuse_changes(given, cfg, allowed, why):
    """UsageError naming every flag given whose value differs from the run's own (cfg) and may not."""
    changed = [f"--{k.replace('_', '-')} {given[k]} (the run has {cfg.get(k)})" for k in given
               if k in DEFAULTS or k in PAPER["300wlp"] if k not in allowed | {"out"} and given[k] != cfg.get(k)]
    if changed:
        raise UsageError(f"{why}: {', '.join(changed)}; leave {'it' if len(changed) == 1 else 'them'} out")


def start_folder(cfg, overwrite):
    """A new run's folder: refused while it holds another run's files, unless --overwrite removes them."""
    out = Path(cfg["out"])
    found = [f for f in RUN_FILES if (out / f).exists()]
    if found and not overwrite:
        raise SystemExit(f"{out} already holds a run ({', '.join(found)}): add --resume to continue it, "
                         f"--overwrite to replace it, or pick another --out")
    for f in found:
        (out / f).unlink()


def main(argv=None):
    """The command line (--help lists the flags); returns what the action returned."""
    try:
        return run_command(vars(get_args_parser().parse_args(argv)))
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise
    except DataError as e:
        raise SystemExit(e.brief) from None


def run_command(given):
    """Carries out what the flags given ask for: an evaluation, predictions, an export, a preview, a
    resumed run or a new one."""
    actions = [a for a in ("eval_only", "predict", "export", "preview", "resume") if a in given]
    if len(actions) > 1:
        raise UsageError(f"--{actions[0].replace('_', '-')} and --{actions[1].replace('_', '-')} do not go together")
    if "resume" in given and "overwrite" in given:
        raise UsageError("--resume continues a run and --overwrite replaces it: choose one")
    if actions and actions[0] in ("eval_only", "predict", "export"):
        action = actions[0]
        if "checkpoint" not in given:
            raise UsageError(f"--{action.replace('_', '-')} needs --checkpoint PATH")
        if action == "eval_only":
            state = load_checkpoint(given["checkpoint"])
            cfg = checkpoint_config(state)
            refuse_changes(given, cfg, EVALUATION, "--eval-only evaluates the run as it was trained")
            overrides = {k: v for k, v in given.items() if k in EVALUATION}
            if "val_data" in given and "val_root" not in given:
                overrides["val_root"] = cfg["data_root"] if given["val_data"] == cfg["data"] else None
            return evaluate_checkpoint(given["checkpoint"], state, overrides)
        unused = [f"--{k.replace('_', '-')}" for k in given if k not in USE[action]]
        if unused:
            raise UsageError(f"--{action} uses only {', '.join('--' + k for k in sorted(USE[action] - {action}))}; "
                             f"it would ignore {', '.join(unused)}")
        return {"predict": predict, "export": export}[action]({"device": "auto", **given})
    if "boxes" in given:
        raise UsageError("--boxes crops the images given to --predict; without --predict it has nothing to crop")
    cfg = resolve_config(given)
    if "preview" in given:
        return preview(cfg, given["preview"])
    if "resume" not in given:
        start_folder(cfg, "overwrite" in given)
        return train(cfg)
    state = load_checkpoint(Path(cfg["out"]) / "last.pt")
    run_cfg = checkpoint_config(state)
    refuse_changes(given, run_cfg, RESUMABLE, f"--resume continues {cfg['out']} as it began")
    return train({**run_cfg, **{k: v for k, v in given.items() if k in RESUMABLE}, "out": cfg["out"]}, state)


# ----------------------------------------------------------------------------- the tile op's plumbing
# The PyTorch reference of the tile op (the tests hold the C++/CUDA kernels to it, and it runs
# when the extension is not built), the argument checks it shares with them, and the
# registrations that let torch.compile trace the C++ operators and autograd differentiate them.
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


SCALAR_NAMES = {torch.uint8: "Byte", torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float",
                torch.float64: "Double"}  # as c10 spells them in the extension's messages


def _check_out(op, out, shape, dtype, x):
    """The checks csrc/tiles.cpp makes of an out= tensor, raising the same errors."""
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{op}: out must have shape {list(shape)}, got {list(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{op}: out must be {SCALAR_NAMES.get(dtype, dtype)}, got {SCALAR_NAMES.get(out.dtype, out.dtype)}")
    if out.device != x.device:
        raise ValueError(f"{op}: out must be on {x.device}, got {out.device}")
    if _overlap(out, x):
        raise RuntimeError("unsupported operation: some elements of the input tensor and the written-to tensor refer "
                           "to a single memory location. Please clone() the tensor before performing the operation.")


def _overlap(a, b):
    """ATen's at::assert_no_overlap test: dense tensors of one storage whose byte ranges meet."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if not (_dense(a) and _dense(b)):
        return False  # ATen gives up ("too hard") and lets it through
    ends = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in (a, b)]
    return ends[0][0] < ends[1][1] and ends[1][0] < ends[0][1]


def _dense(t):
    """Non-overlapping and dense, as ATen decides it: in stride order, each stride is the span below it."""
    span = 1
    for size, stride in sorted(((n, s) for n, s in zip(t.shape, t.stride()) if n != 1), key=lambda d: d[1]):
        if stride != span:
            return False
        span *= size
    return True


def _refuse_autograd_out(op, x, out):
    if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
        raise RuntimeError(f"{op}: out= does not support automatic differentiation (an argument requires grad); "
                           f"call it without out=")


def _shuffle_tiles_reference(x, perm, rot, out=None):
    if x.dim() != 4:
        raise ValueError(f"shuffle_tiles: x must be N x C x H x W, got shape {list(x.shape)}")
    _check_dtype("shuffle_tiles", "x", x.dtype, (torch.uint8, torch.float16, torch.bfloat16, torch.float32))
    n, c, h, w = x.shape
    g, t = _tile_grid("shuffle_tiles", n, h, w, perm, rot, x.device)
    if out is not None:
        _check_out("shuffle_tiles", out, x.shape, x.dtype, x)
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
    if out is not None:
        _check_out(op, out, y.shape, out.dtype, x)
    y = (y.float() * scale[:, None, None] + shift[:, None, None]).to(dtype)
    if out is not None:
        return out.copy_(y)
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


if tiles_ext is not None:
    # Shapes for torch.compile / FakeTensor tracing of the C++ operators: the functional ops are
    # composite (they allocate and call the _out ops), so the _out ops' fakes serve both.
    def _fake_tile_args(x, perm, rot, h, w):
        torch._check(perm.dim() == 2 and rot.shape == perm.shape, lambda: "perm and rot must be N x g^2")
        torch._check(perm.shape[0] == x.shape[0], lambda: "perm needs one row per image")
        g = math.isqrt(perm.shape[1])
        torch._check(g * g == perm.shape[1] and 0 < g <= min(h, w), lambda: "bad tile grid")

    @torch.library.register_fake("hmtl::shuffle_tiles_out")
    def _(x, perm, rot, out, check=True):
        _fake_tile_args(x, perm, rot, x.shape[2], x.shape[3])

    @torch.library.register_fake("hmtl::shuffle_tiles_normalize_out")
    def _(x, perm, rot, mean, std, out, check=True):
        _fake_tile_args(x, perm, rot, x.shape[1], x.shape[2])

    # The gradient of a shuffle is the inverse shuffle of the gradient. (The fused op's input is
    # uint8, which has no gradient.)
    def _save_tiles(ctx, inputs, output):
        ctx.save_for_backward(inputs[1], inputs[2])

    def _unshuffle_gradient(ctx, grad):
        perm, rot = ctx.saved_tensors
        return torch.ops.hmtl.shuffle_tiles(grad, *invert_tiles(perm, rot), False), None, None, None

    torch.library.register_autograd("hmtl::shuffle_tiles", _unshuffle_gradient, setup_context=_save_tiles)


if __name__ == "__main__":
    main()
