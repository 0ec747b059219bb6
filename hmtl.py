"""Hybrid Multi-Task Learning (HMTL) for fine-grained head pose estimation.

Reference implementation of Pourmirzaei, Montazer and Esmaili, "How Self-Supervised Learning Can be
Used for Fine-Grained Head Pose Estimation?" (2021).

A ResNet regresses yaw, pitch and roll from a face crop (the supervised, SL, part). While it trains,
self-supervised (SS) branches attached at one of the four "flag points" of the backbone (the output
of stage 1, 2, 3 or 4) solve a jigsaw puzzle and/or predict per-tile rotations. Both parts see the
*same* input in one forward pass: every training image is cut into g x g tiles that are shuffled
(and/or turned) before it enters the network; the pose heads must read the pose off that shuffled
face, and the SS heads must say where each tile came from. The loss is L = L_SL + w·L_SS (eq. 1).
The SS branches are dropped for deployment, so the shipped network is the plain supervised one.

    python hmtl.py --task puzzle --flag 3          # HMTL on synthetic heads (no download)

This file reads top to bottom: the model, the losses, the optimizer, a training batch, the HMTL step,
the epoch, evaluation, training, the command line. Around it: hmtl_data.py (datasets, crops, the
angle convention, synthetic heads), hmtl_tiles.py and csrc/ (the tile op), hmtl_runs.py (devices,
processes, run folders), hmtl_use.py (prediction, export, preview), hmtl_flags.py (the command
line's checks); docs/method.md (the conventions).
"""
import argparse
import copy
import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import hmtl_use
from hmtl_data import (CROP_PROTOCOLS, DATASETS, MIRRORED, TEST_SETS, DataError, GlobalBatches, angle_names,
                       data_loader, every_kth, load_split, seeded, split_holdout)
from hmtl_flags import (Parser, UsageError, action_of, bounded, check_combinations, help_default,
                        refuse_changes, subject_list)
from hmtl_runs import (IMAGENET_WEIGHTS, Run, check_new_folder, imagenet_weights, load_backbone,
                       load_checkpoint, rank0_first, runtime, sum_over_processes, summed_over_processes)
from hmtl_tiles import IMAGENET_MEAN, normalize, shuffle_tiles_normalize

# ----------------------------------------------------------------------------- the model
# A torchvision ResNet. Supervised pose heads sit on its pooled output (after stage 4); SS
# branches read the output of stage `flag`. Pose heads are `catreg` (HopeNet: per angle, a
# softmax over bins whose expectation is the angle) or `reg` (one output per angle).

SSL_TASKS = {"none": (), "puzzle": ("puzzle",), "rotation": ("rotation",),
             "puzzle_rotation": ("puzzle", "rotation")}
TASKS = tuple(SSL_TASKS)


class SSLBranch(nn.Module):
    """A self-supervised branch: one residual block of the backbone's own type (it keeps the width,
    so its skip is the identity), global average pooling, Dropout, and one Linear head per tile
    position -- the g² heads stacked in one Linear."""

    def __init__(self, block, channels, tiles, classes, dropout):
        super().__init__()
        self.block = block(channels, channels // block.expansion) if block else nn.Identity()
        self.dropout, self.heads = nn.Dropout(dropout), nn.Linear(channels, tiles * classes)
        self.tiles = tiles

    def forward(self, features):
        return self.heads(self.dropout(self.block(features).mean((2, 3)))).unflatten(1, (self.tiles, -1))


class HMTL(nn.Module):
    """A torchvision ResNet with supervised pose heads on its pooled output and SS branches at flag
    point `flag`. forward(x) -> (N x angles x outputs pose head outputs, {task: N x g² x classes SS
    logits}). With angles=0 and ssl_block=False it is the SS pre-training network: the SS heads sit
    where the pose heads were."""

    def __init__(self, arch="resnet50", angles=3, head="catreg", bin_width=3, dropout=0.5, task="none",
                 flag=3, grid=2, ssl_dropout=0.2, ssl_block=True):
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
        self.ssl_branches = nn.ModuleDict({t: SSLBranch(block if ssl_block else None, width[flag - 1],
                                                        grid * grid, classes[t], ssl_dropout)
                                           for t in SSL_TASKS[task]})
        self.flag = flag

    def forward(self, x):
        taps, x = [], self.stem(x)
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


def build_model(cfg, weights=None):
    """The network a config describes, holding `weights` (a state dict) if given: SL, HMTL, w/o SSHs (no SS
    branches, inputs still shuffled) or SS pre-training (no pose heads; the SS heads on the pooled
    backbone, flag 4, no extra block, where the pose heads were)."""
    pretrain = cfg["stage"] == "pretrain"
    model = HMTL(arch=cfg["arch"], angles=0 if pretrain else len(angle_names(cfg["data"])), head=cfg["head"],
                 bin_width=cfg["bin_width"], dropout=cfg["dropout"],
                 task="none" if cfg["no_ssh"] else cfg["task"], flag=4 if pretrain else cfg["flag"],
                 grid=cfg["grid"], ssl_dropout=cfg["ssl_dropout"], ssl_block=not pretrain)
    if weights is not None:
        model.load_state_dict(weights)
    return model


# ----------------------------------------------------------------------------- the losses (paper eq. 1-3)

def bin_centres(width, device=None):
    """Centres of the catreg bins spanning [-99°, 99°]: 66 for 3° bins, 198 for 1° bins."""
    return torch.arange(-99 + width / 2, 99, width, dtype=torch.float32, device=device)


def expected_angle(logits, centres):
    """catreg's angle: the softmax expectation over the bin centres."""
    return (logits.float().softmax(-1) * centres).sum(-1)


def rmse(pred, target):
    """Per angle over the batch; the ε keeps the gradient finite at zero error."""
    return ((pred - target) ** 2).mean(0).add(1e-8).sqrt()


def catreg_loss(logits, target, centres, alpha):
    """Eq. 2, catreg (HopeNet): per angle, CE over the bins + α·RMSE of the expected angle; summed."""
    bins = ((target + 99) / (centres[1] - centres[0])).floor().long().clamp(0, len(centres) - 1)
    ce = F.cross_entropy(logits.float().flatten(0, 1), bins.flatten(), reduction="none")
    ce = ce.view(bins.shape).mean(0)
    return (ce + alpha * rmse(expected_angle(logits, centres), target)).sum()


def reg_loss(outputs, target):
    """Eq. 2, reg: RMSE per angle, summed."""
    return rmse(outputs[..., 0].float(), target).sum()


def ssl_loss(logits, labels, shuffled=None):
    """Eq. 3: the cross-entropy of every tile head, summed over heads and tasks, averaged over the
    images (over those whose tiles were shuffled, where the bool mask `shuffled` marks them)."""
    total = 0
    for task in logits:
        ce = F.cross_entropy(logits[task].float().flatten(0, 1), labels[task].flatten(), reduction="none")
        ce = ce.view(labels[task].shape).sum(1)
        total = total + (ce.mean() if shuffled is None else
                         (ce * shuffled).sum() / shuffled.sum().clamp(min=1))
    return total


def hmtl_loss(sl, ss, weight):
    """Eq. 1: L = L_SL + w·L_SS."""
    return sl + weight * ss


def supervised_loss(pose, angles, cfg):
    if cfg["head"] == "catreg":
        return catreg_loss(pose, angles, bin_centres(cfg["bin_width"], pose.device), cfg["alpha"])
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
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      rectify=rectify))

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
# A whole uint8 N x H x W x 3 batch at a time, on the training device: the images augmented with
# per-sample parameters and flipped, then the tiles of each drawn (its SS labels) and shuffled.

def sample_tiles(n, grid, task, generator=None, device=None):
    """Random SS parameters (perm, rot), each n x grid² int64 on `device`: the labels of the tile heads.

    puzzle: a random permutation, no rotation; rotation: tiles in place, each turned by k·90°;
    puzzle_rotation: a permutation and at most two tiles turned (two distinct positions, each a
    random k in 0..3); none: the identity. Valid by construction (an argsort is a permutation), so
    the tile op need not read them back from a GPU to check them.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    g2, draw = grid * grid, dict(generator=generator, device=device)
    perm = torch.arange(g2, device=device).repeat(n, 1)
    rot = torch.zeros(n, g2, dtype=torch.long, device=device)
    if task in ("puzzle", "puzzle_rotation"):
        perm = torch.rand(n, g2, **draw).argsort(1)
    if task == "rotation":
        rot = torch.randint(0, 4, (n, g2), **draw)
    if task == "puzzle_rotation":
        where = torch.rand(n, g2, **draw).argsort(1)[:, :2]
        rot.scatter_(1, where, torch.randint(0, 4, where.shape, **draw))
    return perm, rot


class Draws:
    """Per-sample random numbers, drawn for a whole global batch of n on the training device from one
    seed that `gen` gives (so a step never waits for a copy from the host), then cut to the rows this
    process holds: any number of processes gives each sample the same numbers."""

    def __init__(self, gen, n, rows, device):
        seed = int(torch.randint(2 ** 62, (), generator=gen))
        self.on = dict(generator=torch.Generator(device).manual_seed(seed), device=device)
        self.n, self.rows, self.device = n, rows, device

    def uniform(self, low, high, *shape):
        return low + (high - low) * torch.rand(self.n, *shape, **self.on)[self.rows]

    def integers(self, low, high):
        return torch.randint(low, high, (self.n,), **self.on)[self.rows]

    def normal(self, *shape):
        return torch.randn(self.n, *shape, **self.on)[self.rows]

    def tiles(self, grid, task):
        perm, rot = sample_tiles(self.n, grid, task, self.on["generator"], self.device)
        return perm[self.rows], rot[self.rows]


@functools.cache
def constant(values, device):
    """A small constant tensor on `device`, made once, from pinned memory on a GPU: no step waits for it."""
    t = torch.tensor(values)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def zoom(x, draw):  # random central zoom: the central s·H x s·W, s ~ U[0.8, 1], resized back
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = draw.uniform(0.8, 1.0)
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def contrast(x, draw):  # scaled by U[0.6, 1.4] about the image's mean
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * draw.uniform(0.6, 1.4)[:, None, None, None] + mean


def brightness(x, draw):
    return x + draw.uniform(-0.15, 0.15)[:, None, None, None]


RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
YIQ_TO_RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(RGB_TO_YIQ)).tolist()))


def hue(x, draw):  # chroma rotated in YIQ space by up to ±0.1 turn
    turn = draw.uniform(-0.2 * math.pi, 0.2 * math.pi)
    rot = torch.zeros(len(x), 3, 3, device=x.device)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 2, 2] = 1, turn.cos(), turn.cos()
    rot[:, 1, 2], rot[:, 2, 1] = -turn.sin(), turn.sin()
    to_yiq, to_rgb = constant(RGB_TO_YIQ, x.device), constant(YIQ_TO_RGB, x.device)
    return torch.einsum("nij,njhw->nihw", to_rgb @ rot @ to_yiq, x)


def noise(x, draw):  # Gaussian, sigma ~ U[0, 0.05]
    return x + draw.uniform(0, 0.05)[:, None, None, None] * draw.normal(*x.shape[1:])


def blur(x, draw):  # Gaussian, sigma ~ U[0, 1.5] pixels, separable 7-tap
    n, c, h, w = x.shape
    taps = torch.arange(-3, 4, device=x.device)
    kernel = torch.exp(-taps ** 2 / (2 * draw.uniform(0.01, 1.5)[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)
    y = F.pad(x.reshape(1, n * c, h, w), (3, 3, 0, 0), mode="replicate")
    y = F.conv2d(y, kernel[:, None, None], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def downscale(x, draw):  # resolution divided by 1, 2, 3 or 4, then brought back
    factor, out = draw.integers(1, 5)[:, None, None, None], x
    for f in (2, 3, 4):  # the whole batch at each factor, each image keeping its own: no host reads them
        small = F.interpolate(x, scale_factor=1 / f, mode="bilinear", antialias=True)
        out = torch.where(factor == f, F.interpolate(small, size=x.shape[-2:], mode="bilinear"), out)
    return out


def translate(x, draw):  # shifted by up to 1/16 of the side each way, edges repeated: 64 px crops of 72 px
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = draw.uniform(-0.125, 0.125, 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def cutout(x, draw):  # a square of side U[0.1, 0.4]·H at a random centre, set to the mean colour
    n, _, h, w = x.shape
    half, cy, cx = draw.uniform(0.05, 0.2), draw.uniform(0, 1), draw.uniform(0, 1)
    ys, xs = (torch.arange(h, device=x.device) + 0.5) / h, (torch.arange(w, device=x.device) + 0.5) / w
    inside = ((ys[None, :, None] - cy[:, None, None]).abs() < half[:, None, None]) & \
             ((xs[None, None, :] - cx[:, None, None]).abs() < half[:, None, None])
    return torch.where(inside[:, None], constant(IMAGENET_MEAN, x.device)[None, :, None, None], x)


# Level 1 and 2: the 300W-LP runs; eth41 / eth52: the ETH-XGaze sets of sections 4.1 and 5.2;
# shift: translation crops, not the paper's (docs/method.md, section 8).
AUGMENTATIONS = {"0": (), "1": (zoom, contrast), "2": (zoom, contrast, blur, downscale, cutout),
                 "eth41": (zoom, hue), "eth52": (zoom, noise, cutout, hue, brightness, contrast),
                 "shift": (translate,)}


def augment(images, recipe, draw):
    """uint8 N x H x W x C in and out, the recipe's augmentations applied with per-sample parameters."""
    if not AUGMENTATIONS[recipe]:
        return images
    x = images.permute(0, 3, 1, 2).float() / 255
    for op in AUGMENTATIONS[recipe]:
        x = op(x, draw)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def flip(images, angles, names, draw, probability):
    """HopeNet's horizontal flip: each image mirrored with `probability`, its yaw and roll negated."""
    flipped = draw.uniform(0, 1) < probability
    images = torch.where(flipped[:, None, None, None], images.flip(2), images)
    sign = constant(tuple(MIRRORED[a] for a in names), angles.device)
    return images, torch.where(flipped[:, None], angles * sign, angles)


def training_batch(images, angles, cfg, draw):
    """(images augmented and flipped, their angles, perm, rot, shuffled): every image gets its own
    random tiles for the SS task, except that with --ss-fraction F < 1 only the images the bool mask
    `shuffled` marks (each with probability F) are shuffled."""
    images = augment(images.to(draw.device, non_blocking=True), cfg["aug"], draw)  # pinned by the loader
    angles = angles.to(draw.device, non_blocking=True)
    if cfg["flip"]:
        images, angles = flip(images, angles, angle_names(cfg["data"]), draw, cfg["flip"])
    perm, rot = draw.tiles(cfg["grid"], cfg["task"])
    shuffled = None
    if cfg["ss_fraction"] < 1 and cfg["task"] != "none":
        shuffled = draw.uniform(0, 1) < cfg["ss_fraction"]
        perm = torch.where(shuffled[:, None], perm, torch.arange(perm.shape[1], device=perm.device))
        rot = torch.where(shuffled[:, None], rot, 0)
    return images, angles, perm, rot, shuffled


# ----------------------------------------------------------------------------- the HMTL step, the epoch

def train_step(model, optimizer, images, angles, cfg, rt, draw):
    """One step of eq. 1. Each image's tiles are drawn (its SS labels) and shuffled; that one shuffled
    image feeds the pose heads and the SS heads in one forward pass; L = L_SL + w·L_SS is minimised.
    --no-ssh (HMTL w/o SSHs): shuffled images, no SS heads, so L = L_SL. --stage pretrain: no pose
    heads, so L = w·L_SS. Task none: SL. Returns (L, L_SL, L_SS), on the device."""
    images, angles, perm, rot, shuffled = training_batch(images, angles, cfg, draw)
    x = shuffle_tiles_normalize(images, perm, rot)
    with rt.autocast():
        pose, ssl = model(x)
    zero = x.new_zeros(())
    sl = supervised_loss(pose, angles, cfg) if pose is not None else zero
    ss = ssl_loss(ssl, {"puzzle": perm, "rotation": rot}, shuffled) if ssl else zero
    loss = hmtl_loss(sl, ss, cfg["ssl_weight"])
    optimizer.zero_grad(set_to_none=True)
    rt.scaler.scale(loss).backward()
    rt.scaler.step(optimizer)
    rt.scaler.update()
    return torch.stack([loss, sl, ss]).detach()


CHECK_EVERY = 25  # steps between reads of the loss on the host (each read makes the host wait for a GPU)


def stop_unless_finite(loss, epoch, step):
    if not math.isfinite(loss):
        raise FloatingPointError(f"the loss became {loss} in epoch {epoch + 1} (read at step {step + 1})")


def train_one_epoch(model, optimizer, loader, cfg, epoch, rt):
    """One epoch: a pass over the training set (or --epoch-steps steps), every image shuffled anew."""
    model.train()
    totals, seen, start = torch.zeros(3, device=rt.device), 0, time.perf_counter()
    bar = tqdm(loader, f"epoch {epoch + 1}/{cfg['epochs']}", disable=rt.rank != 0, leave=False,
               dynamic_ncols=True)
    for step, (images, angles) in enumerate(bar):
        draw = Draws(seeded(cfg["seed"], "train", epoch, step), cfg["batch_size"], rt.rows, rt.device)
        losses = train_step(model, optimizer, images, angles, cfg, rt, draw)
        totals += losses * len(images)
        seen += len(images) * rt.world
        if (step + 1) % CHECK_EVERY == 0:
            loss = sum_over_processes(losses[0], rt).item() / rt.world
            stop_unless_finite(loss, epoch, step)
            bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
    loss, sl, ss = (sum_over_processes(totals, rt) / max(seen, 1)).tolist()
    stop_unless_finite(loss, epoch, step)  # a step whose loss was not finite makes the sum not finite
    return {"train_loss": loss, "train_sl_loss": sl, "train_ss_loss": ss,
            "img_per_s": seen / (time.perf_counter() - start)}


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, loader, cfg, rt, n_total, prefix="val"):
    """MAE per angle on untouched images (never augmented, flipped or shuffled); SS accuracy per task
    on shuffled copies (their tiles fixed per step, so epochs compare). Keys: {prefix}_mae_{angle},
    {prefix}_mae_mean, {prefix}_mae_mean_se (its standard error over the images), {prefix}_acc_{task}."""
    model.eval()
    names, tasks = angle_names(cfg["data"]), () if cfg["no_ssh"] else SSL_TASKS[cfg["task"]]
    centres = bin_centres(cfg["bin_width"], rt.device)
    zero = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=rt.device)
    sums = {"abs_error": zero(len(names)), "squared_image_mae": zero(), "images": zero(),
            **{f"right_{t}": zero() for t in tasks}, **{f"asked_{t}": zero() for t in tasks}}
    for step, (images, angles) in enumerate(loader):
        images, angles = images.to(rt.device, non_blocking=True), angles.to(rt.device, non_blocking=True)
        with rt.autocast():
            pose, ssl = model(normalize(images))  # untouched
            if ssl:
                n = min(cfg["batch_size"], n_total - step * cfg["batch_size"])
                draw = Draws(seeded(cfg["seed"], prefix, step), n, rt.rows, rt.device)
                perm, rot = draw.tiles(cfg["grid"], cfg["task"])
                ssl = model(shuffle_tiles_normalize(images, perm, rot))[1]
        if pose is not None:
            errors = (predicted_angles(pose, cfg["head"], centres) - angles).abs().double()
            sums["abs_error"] += errors.sum(0)
            sums["squared_image_mae"] += errors.mean(1).square().sum()
        for task in tasks:
            labels = perm if task == "puzzle" else rot
            sums[f"right_{task}"] += (ssl[task].argmax(-1) == labels).sum()
            sums[f"asked_{task}"] += labels.numel()
        sums["images"] += len(images)
    sums, metrics = summed_over_processes(sums, rt), {}
    if cfg["stage"] != "pretrain":  # the network has pose heads
        n = sums["images"]
        metrics = {f"{prefix}_mae_{a}": e / n for a, e in zip(names, sums["abs_error"])}
        metrics[f"{prefix}_mae_mean"] = mean = sum(metrics.values()) / len(names)
        variance = max(sums["squared_image_mae"] / n - mean ** 2, 0)  # a small test set's MAE is uncertain
        metrics[f"{prefix}_mae_mean_se"] = math.sqrt(variance / max(n - 1, 1))
    for task in tasks:
        metrics[f"{prefix}_acc_{task}"] = sums[f"right_{task}"] / sums[f"asked_{task}"]
    return metrics


def predicting_the_mean(train_set, val_set, names):
    """The MAE of predicting the training set's mean angles for every validation face: learning nothing."""
    mae = np.abs(val_set.angles - train_set.angles.mean(0)).mean(0)
    baseline = {f"baseline_mae_{a}": float(e) for a, e in zip(names, mae)}
    return baseline | {"baseline_mae_mean": float(mae.mean())}


def selection_score(row, prefix):
    """What best.pt minimises: the MAE, or for SS pre-training, minus the mean SS accuracy."""
    if f"{prefix}_mae_mean" in row:
        return row[f"{prefix}_mae_mean"]
    return -float(np.mean([v for k, v in row.items() if k.startswith(f"{prefix}_acc_")]))


def evaluation_loader(dataset, cfg, rt):
    """Every image once, in order, each process taking its share of every batch."""
    batches = GlobalBatches(len(dataset), cfg["batch_size"], cfg["seed"], False, False, rt.rank, rt.world)
    return data_loader(dataset, batches, cfg, rt)


def evaluate_checkpoint(given):
    """--eval-only: a checkpoint's network on its validation set, or on the one the command line names."""
    state, cfg = load_run(given["checkpoint"])
    refuse_changes(given, cfg, EVALUATION, "--eval-only evaluates the run as it was trained")
    overrides = {k: v for k, v in given.items() if k in EVALUATION}
    if "val_data" in given and "val_root" not in given:
        overrides["val_root"] = cfg["data_root"] if given["val_data"] == cfg["data"] else None
    cfg |= overrides
    rt = runtime(cfg)
    model = build_model(cfg, state["model"]).to(rt.device, memory_format=torch.channels_last)
    val_set = rank0_first(rt, lambda: load_split(cfg, False))
    metrics = evaluate(model, evaluation_loader(val_set, cfg, rt), cfg, rt, len(val_set))
    metrics |= {"checkpoint": str(given["checkpoint"]), "epoch": state["epoch"], "val_data": cfg["val_data"],
                "val_images": len(val_set)}
    if rt.rank == 0:
        print(json.dumps(metrics, indent=1))
    return metrics


class PoseEstimator(nn.Module):
    """A trained network as deployed: normalised N x 3 x S x S images -> N x angles, in degrees."""

    def __init__(self, net, head, bin_width):
        super().__init__()
        self.net, self.head = net, head
        self.register_buffer("centres", bin_centres(bin_width))

    def forward(self, x):
        return predicted_angles(self.net(x)[0], self.head, self.centres)


def trained_estimator(path, device):
    """(PoseEstimator of a checkpoint's deployable network, in eval mode on `device`, its config)."""
    state, cfg = load_run(path)
    if cfg["stage"] == "pretrain":
        raise SystemExit(f"{path} is an SS pre-training checkpoint: it has no pose heads")
    net = PoseEstimator(build_model(cfg, state["model"]).deployable(), cfg["head"], cfg["bin_width"]).eval()
    return net.to(device, memory_format=torch.channels_last), cfg


# ----------------------------------------------------------------------------- training

def train(cfg, state=None):
    """Trains (or continues, from `state`) the run cfg describes, in the folder cfg["out"]: setup, the
    epochs, the summary. Reported figures come from the final epoch; best.pt is written only where a
    checkpoint may be chosen (hmtl_runs.Run)."""
    rt = runtime(cfg)
    with Run(cfg, rt, state, val_is_test_set=cfg["val_data"] in TEST_SETS, score=selection_score) as run:
        train_set, val_set = rank0_first(rt, lambda: (load_split(cfg, True), load_split(cfg, False)))
        if cfg["train_every"] > 1:
            train_set = every_kth(train_set, cfg["train_every"], cfg["seed"])
        evaluated = {"val": val_set}
        if cfg["holdout"]:
            train_set, evaluated["holdout"] = split_holdout(train_set, cfg["holdout"], cfg["seed"])
        torch.manual_seed(cfg["seed"])  # the weights' initialisation, then dropout
        model = build_model(cfg).to(rt.device, memory_format=torch.channels_last)
        if cfg["init"] != "random" and not state:
            load_backbone(model, cfg["init"], cfg["arch"])
        if cfg["sync_bn"] and rt.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        optimizer = AdaBelief(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                              rectify=cfg["rectify"]) if cfg["optimizer"] == "adabelief" else \
            torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg["milestones"], gamma=0.1)
        batches = GlobalBatches(len(train_set), cfg["batch_size"], cfg["seed"], True, True, rt.rank, rt.world,
                                cfg["epoch_steps"])
        if len(batches) == 0 or len(train_set) == 0:
            raise SystemExit(f"{len(train_set)} training images make no batch of {cfg['batch_size']}")
        first = run.start(model, optimizer, scheduler, train_set, evaluated, angle_names(cfg["data"]))
        trained = nn.parallel.DistributedDataParallel(model) if rt.world > 1 else model
        loader = data_loader(train_set, batches, cfg, rt)
        loaders = {prefix: (len(d), evaluation_loader(d, cfg, rt)) for prefix, d in evaluated.items()}
        for epoch in range(first, cfg["epochs"]):
            batches.set_epoch(epoch)
            with run.epoch(epoch) as row:  # Ctrl-C, or a loss not finite: one line naming what last.pt holds
                row["lr"] = optimizer.param_groups[0]["lr"]
                row |= train_one_epoch(trained, optimizer, loader, cfg, epoch, rt)
                scheduler.step()
                for prefix, (size, val_loader) in loaders.items():
                    row |= evaluate(trained, val_loader, cfg, rt, size, prefix)
            run.save(row, model, optimizer, scheduler)  # last.pt (and best.pt) whole, never a non-finite one
        return run.finish(predicting_the_mean(train_set, val_set, angle_names(cfg["data"]))
                          if model.pose_heads else {})


# ----------------------------------------------------------------------------- command line
# Every value the paper sets is a flag whose default is the paper's; where the paper's runs
# differ by dataset (300W-LP / AFLW2000 / BIWI vs ETH-XGaze) the default comes from PAPER.
# With no --data, synthetic heads train under a quick preset (QUICK) sized for a laptop CPU.
DEFAULTS = dict(data="synthetic", task="none", flag=3, grid=2, stage="train", no_ssh=False, ss_fraction=1.0,
                arch="resnet50", init="random", bin_width=3.0, alpha=2.0, ssl_dropout=0.2, epochs=110,
                epoch_steps=None, batch_size=64, optimizer="adabelief", lr=1e-3, weight_decay=0.0,
                rectify=True, img_size=224, flip=0.5, amp="auto", sync_bn=False, seed=0, workers=4,
                device="auto", data_root=None, val_data=None, val_root=None,
                aflw2000_reduced=False, crop="hopenet", holdout=0.0, train_every=1, train_subjects="1",
                val_subjects="108,109,111", cache=None, synthetic_train=20000, synthetic_val=2000, out=None)
PAPER = {"300wlp": dict(head="catreg", dropout=0.5, ssl_weight=50.0, milestones=[20, 100], aug="1"),
         "ethxgaze": dict(head="reg", dropout=0.4, ssl_weight=1.0, milestones=[30, 40], aug="eth41")}
# QUICK leaves out the rectification's warm-up and the augmentation: a run this short learns without them.
QUICK = dict(arch="resnet18", img_size=64, epochs=4, milestones=[3], rectify=False, aug="0",
             synthetic_train=4000, synthetic_val=500, workers=2)
# STRONG: --recipe strong, what helped SL on BIWI's development split (results/scarcity.md).
STRONG = dict(rectify=False, dropout=0.4)
PRESETS = {"default": DEFAULTS, **PAPER, "quick": QUICK, "strong": STRONG}
VALIDATION = {**{d: d for d in DATASETS}, "300wlp": "aflw2000"}  # each training set's test set
# What --resume may change (the run's length, where it runs and its data lie), what --eval-only may
# (which set it evaluates, and how it is read), and the flags --predict and --export read.
RESUMABLE = {"epochs", "workers", "device", "cache", "data_root", "val_root"}
EVALUATION = {"val_data", "val_root", "aflw2000_reduced", "crop", "cache", "workers", "device", "batch_size"}
USE = {"predict": {"predict", "checkpoint", "boxes", "out", "device"}, "export": {"export", "checkpoint"}}


def get_args_parser():
    p = Parser(prog="hmtl.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               argument_default=argparse.SUPPRESS)  # flags not given come from the presets

    def add(group, flag, help, **kw):
        group.add_argument(flag, help=help + help_default(flag[2:].replace("-", "_"), PRESETS), **kw)

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
    add(g, "--recipe", "paper: the paper's settings (default); strong: the defaults that --help marks "
        "'--recipe strong', chosen for SL on BIWI's development split", choices=("paper", "strong"))
    add(g, "--epochs", "", type=bounded(int, 1))
    add(g, "--epoch-steps", "optimiser steps per epoch, from a stream of passes over the training set "
        "(none: one pass)", type=bounded(int, 1))
    add(g, "--milestones", "epochs after which the learning rate drops x0.1", type=bounded(int, 1), nargs="+")
    add(g, "--batch-size", "the global batch, over all processes", type=bounded(int, 2))
    add(g, "--optimizer", "AdaBelief (the paper's) or AdamW", choices=("adabelief", "adamw"))
    add(g, "--lr", "learning rate", type=bounded(float, above=0))
    add(g, "--weight-decay", "decoupled weight decay", type=bounded(float, 0))
    add(g, "--rectify", "AdaBelief's rectification (a warm-up), on as in the official package",
        action=argparse.BooleanOptionalAction)
    add(g, "--img-size", "input side in pixels", type=bounded(int, 16))
    add(g, "--aug", "augmentation: 0, 1, 2, eth41, eth52, shift", choices=tuple(AUGMENTATIONS))
    add(g, "--flip", "probability of HopeNet's horizontal flip (yaw and roll negated)",
        type=bounded(float, 0, 1))
    add(g, "--amp", "mixed precision; auto: bf16 where the GPU or CPU computes it natively, fp16 on older "
        "GPUs, else off", choices=("auto", "bf16", "fp16", "off"))
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
    add(g, "--holdout", "hold out this fraction of the training set to choose best.pt on",
        type=bounded(float, above=0, below=1))
    add(g, "--train-every", "train on every k-th training image (offset drawn from --seed)",
        type=bounded(int, 1))
    add(g, "--train-subjects", "ETH-XGaze: a count k or a list 0,3,5", type=subject_list)
    add(g, "--val-subjects", "ETH-XGaze", type=subject_list)
    add(g, "--cache", "decode every crop once into a memory-mapped cache in this folder")
    add(g, "--synthetic-train", "synthetic training images", type=bounded(int, 1))
    add(g, "--synthetic-val", "synthetic validation images", type=bounded(int, 1))
    g = p.add_argument_group("runs")
    add(g, "--out", "run folder (runs/<data>-<task>-flag<k>-grid<g>-seed<s>); --predict: its output "
        "(predictions)")
    add(g, "--resume", "continue the run in --out from its last checkpoint", action="store_true")
    add(g, "--overwrite", "replace the finished or unfinished run in --out", action="store_true")
    add(g, "--eval-only", "evaluate --checkpoint on its validation set, or on --val-data",
        action="store_true")
    add(g, "--checkpoint", "a checkpoint (.pt) for --eval-only, --predict or --export")
    add(g, "--preview", "save a grid of training and validation crops with their pose axes", metavar="PNG")
    g = p.add_argument_group("use a trained model (with --checkpoint)")
    add(g, "--predict", "images or folders of face crops", nargs="+", metavar="PATH")
    add(g, "--boxes", "CSV path,x_min,y_min,x_max,y_max: a face box per image to --predict")
    add(g, "--export", "write the deployable network as torch.export and ONNX", metavar="DIR")
    return p


def preset(data):
    """Every setting's default for a training set: DEFAULTS, the paper's for its family, QUICK for
    synthetic heads."""
    family = PAPER["ethxgaze" if data == "ethxgaze" else "300wlp"]
    return {**DEFAULTS, **family, **(QUICK if data == "synthetic" else {})}


def resolve_config(given):
    """The flags given -> the full config of a run: every flag left out takes its preset; then the
    combinations are checked (UsageError, exit status 2)."""
    cfg = preset(given.get("data", DEFAULTS["data"])) | (STRONG if given.get("recipe") == "strong" else {})
    cfg |= {k: v for k, v in given.items() if k in cfg}
    cfg["val_data"] = cfg["val_data"] or VALIDATION[cfg["data"]]
    if cfg["val_root"] is None and cfg["val_data"] == cfg["data"]:
        cfg["val_root"] = cfg["data_root"]
    cfg["out"] = cfg["out"] or \
        f"runs/{cfg['data']}-{cfg['task']}-flag{cfg['flag']}-grid{cfg['grid']}-seed{cfg['seed']}"
    check_combinations(cfg)
    if cfg["init"] in IMAGENET_WEIGHTS:
        imagenet_weights(cfg["init"], cfg["arch"])
    return cfg


def config(argv):
    """The full config of a run that these command-line flags describe."""
    return resolve_config(vars(get_args_parser().parse_args(argv)))


def checkpoint_config(state):
    """A checkpoint's config, settings it predates taking their defaults."""
    return {**preset(state["config"]["data"]), **state["config"]}


def load_run(path):
    """(state, config) of an hmtl checkpoint (last.pt, best.pt) whose weights are all finite."""
    state = load_checkpoint(path)
    if not (isinstance(state, dict) and isinstance(state.get("config"), dict) and "model" in state):
        raise SystemExit(f"{path}: not an hmtl checkpoint (no run config); backbone weights, such as a "
                         f"torchvision state dict, go to --init PATH")
    if not all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()):
        raise SystemExit(f"{path}: its weights hold NaN or infinite values; it cannot be used")
    return state, checkpoint_config(state)


def main(argv=None):
    """The command line (--help lists the flags); returns what the action returned."""
    try:
        given = vars(get_args_parser().parse_args(argv))
        action = action_of(given, USE)  # at most one, with the flags it reads
        if action in ("predict", "export"):
            on_gpu = action == "predict" and given.get("device") != "cpu" and torch.cuda.is_available()
            net, cfg = trained_estimator(given["checkpoint"], "cuda" if on_gpu else "cpu")
            return getattr(hmtl_use, action)(given, net, cfg)
        if action == "eval_only":
            return evaluate_checkpoint(given)
        cfg = resolve_config(given)
        if action == "preview":
            return hmtl_use.preview(cfg, given["preview"])
        if action == "resume":
            state, run_cfg = load_run(Path(cfg["out"]) / "last.pt")
            refuse_changes(given, run_cfg, RESUMABLE, f"--resume continues {cfg['out']} as it began")
            if given.get("epochs", state["epoch"]) < state["epoch"]:
                raise UsageError(f"--resume --epochs {given['epochs']}: {cfg['out']} has trained "
                                 f"{state['epoch']} epochs already")
            run_cfg |= {k: v for k, v in given.items() if k in RESUMABLE}
            return train({**run_cfg, "out": cfg["out"]}, state)
        check_new_folder(cfg["out"], "overwrite" in given)
        return train(cfg)
    except UsageError as e:
        print(f"hmtl.py: error: {e}", file=sys.stderr)
        raise
    except DataError as e:
        raise SystemExit(e.brief) from None


if __name__ == "__main__":
    main()
