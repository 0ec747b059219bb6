"""The tile op: the g x g tiles of every image of a batch shuffled and turned in one pass.

    out[n, :, tile p] = rot90(x[n, :, tile perm[n, p]], rot[n, p])

Tiles are t = min(H, W) // g pixels square, numbered row by row; pixels off the grid are copied;
rot90 is torch.rot90(tile, k, dims=(-2, -1)), counter-clockwise (docs/method.md, section 4).
The kernels are C++ (CPU) and CUDA, in csrc/, built as the extension _hmtl_tiles by
`pip install --no-build-isolation -e .`. This module is their Python side: the PyTorch reference
that the tests hold them to (and that runs where the extension is not built), raising the same
errors, and the registrations that let torch.compile trace the operators and autograd
differentiate them.
"""
import functools
import math
import warnings

import torch

try:
    import _hmtl_tiles as ext  # registers torch.ops.hmtl.*
except ImportError:
    ext = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def shuffle_tiles(x, perm, rot, backend="auto"):
    """x: N x C x H x W (uint8, float16, bfloat16 or float32; any memory format); perm, rot: N x g²
    int64 on x's device. Differentiable in x: the gradient is the inverse shuffle."""
    if use_extension(backend, x):
        return torch.ops.hmtl.shuffle_tiles(x, perm, rot)
    return reference_shuffle(x, perm, rot)


def shuffle_tiles_normalize(x, perm, rot, mean=IMAGENET_MEAN, std=IMAGENET_STD, backend="auto"):
    """Decoded uint8 N x H x W x C images -> normalised, shuffled float32 N x C x H x W (channels-last
    memory, as the network takes it): shuffle_tiles(x.permute(0, 3, 1, 2), perm, rot) mapped by
    (x / 255 - mean) / std, computed as x·scale + shift (normalize_affine)."""
    if use_extension(backend, x):
        return torch.ops.hmtl.shuffle_tiles_normalize(x, perm, rot, [float(m) for m in mean], [float(s) for s in std])
    return reference_normalize(x, perm, rot, mean, std)


def normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD, backend="auto"):
    """shuffle_tiles_normalize with no tile moved: one tile per image, turned 0°."""
    one_tile = torch.zeros(len(x), 1, dtype=torch.long, device=x.device)
    return shuffle_tiles_normalize(x, one_tile, one_tile, mean, std, backend)


def invert_tiles(perm, rot):
    """The parameters that undo shuffle_tiles(·, perm, rot) exactly."""
    inverse = perm.argsort(1)
    return inverse, ((4 - rot) % 4).gather(1, inverse)


def normalize_affine(mean, std, device=None):
    """float32 (scale, shift) with (x / 255 - mean) / std == x·scale + shift, as the kernels compute it."""
    scale = torch.tensor([1.0 / (255.0 * float(s)) for s in std], dtype=torch.float32, device=device)
    shift = torch.tensor([-float(m) / float(s) for m, s in zip(mean, std)], dtype=torch.float32, device=device)
    return scale, shift


def use_extension(backend, x):
    if backend not in ("auto", "ext", "torch"):
        raise ValueError(f"unknown tile-op backend {backend!r}: choose auto, ext or torch")
    if backend == "ext" and ext is None:
        raise RuntimeError("the tile-op extension is not built: run `pip install --no-build-isolation -e .`")
    if backend == "auto" and (ext is None or (x.is_cuda and not ext.with_cuda)):
        warn_reference_backend()
        return False
    return backend != "torch"


@functools.cache
def warn_reference_backend():
    warnings.warn("hmtl: the tile-op extension is not built for this device; using the slower PyTorch "
                  "reference (build it with `pip install --no-build-isolation -e .`)", stacklevel=4)


# ----------------------------------------------------------------------------- the PyTorch reference
# Its checks raise the errors csrc/tiles.cpp raises, in the same order.

def tile_grid(op, n, h, w, perm, rot, device):
    """(g, t) of a batch of n images of h x w pixels, after checking perm and rot."""
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
    if device.type != "cpu":  # as the kernels: a GPU's values are not read back (csrc/tiles.h, source_run)
        return g, min(h, w) // g
    for i, (p, r) in enumerate(zip(perm.tolist(), rot.tolist())):
        for j in range(g2):  # row by row, as the C++ check goes
            if not (0 <= p[j] < g2 and p[j] not in p[:j]):
                raise ValueError(f"{op}: perm row {i} is not a permutation of 0..{g2 - 1}: {p}")
            if not 0 <= r[j] <= 3:
                raise ValueError(f"{op}: rot[{i}, {j}] = {r[j]} is outside 0..3")
    return g, min(h, w) // g


def reference_shuffle(x, perm, rot, op="shuffle_tiles"):
    if x.dim() != 4:
        raise ValueError(f"shuffle_tiles: x must be N x C x H x W, got shape {list(x.shape)}")
    if x.dtype not in (torch.uint8, torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"shuffle_tiles: x must be uint8, float16, bfloat16 or float32, got {x.dtype}")
    n, c, h, w = x.shape
    g, t = tile_grid(op, n, h, w, perm, rot, x.device)
    perm, rot, s = perm.clamp(0, g * g - 1), rot & 3, g * t  # as source_run keeps a bad value inside the image
    tiles = x[:, :, :s, :s].unflatten(2, (g, t)).unflatten(4, (g, t)).permute(0, 2, 4, 1, 3, 5)
    moved = tiles.reshape(n, g * g, c, t, t)[torch.arange(n, device=x.device)[:, None], perm]
    for k in (1, 2, 3):
        moved[rot == k] = torch.rot90(moved[rot == k], k, dims=(-2, -1))
    out = torch.empty_like(x)
    out.copy_(x)
    out[:, :, :s, :s] = moved.unflatten(1, (g, g)).permute(0, 3, 1, 4, 2, 5).reshape(n, c, s, s)
    return out


def reference_normalize(x, perm, rot, mean, std):
    op = "shuffle_tiles_normalize"
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be N x H x W x C, got shape {list(x.shape)}")
    if x.dtype != torch.uint8:
        raise TypeError(f"{op}: x must be uint8, got {x.dtype}")
    if len(mean) != x.shape[3] or len(std) != x.shape[3]:
        raise ValueError(f"{op}: mean and std need one value per channel ({x.shape[3]}), got {len(mean)} and "
                         f"{len(std)}")
    if not all(s > 0 and math.isfinite(s) for s in std) or not all(math.isfinite(m) for m in mean):
        raise ValueError(f"{op}: need finite mean and std > 0, got mean {list(mean)} and std {list(std)}")
    scale, shift = normalize_affine(mean, std, x.device)
    y = reference_shuffle(x.permute(0, 3, 1, 2), perm, rot, op).float()
    return (y * scale[:, None, None] + shift[:, None, None]).contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- operator registration

if ext is not None:
    def check_fake_grid(x, perm, rot, h, w):
        torch._check(perm.dim() == 2 and rot.shape == perm.shape, lambda: "perm and rot must be N x g^2")
        torch._check(perm.shape[0] == x.shape[0], lambda: "perm needs one row per image")
        g = math.isqrt(perm.shape[1])
        torch._check(g * g == perm.shape[1] and 0 < g <= min(h, w), lambda: "bad tile grid")

    @torch.library.register_fake("hmtl::shuffle_tiles")
    def _(x, perm, rot):
        check_fake_grid(x, perm, rot, x.shape[2], x.shape[3])
        return torch.empty_like(x)

    @torch.library.register_fake("hmtl::shuffle_tiles_normalize")
    def _(x, perm, rot, mean, std):
        n, h, w, c = x.shape
        check_fake_grid(x, perm, rot, h, w)
        return x.new_empty((n, c, h, w), dtype=torch.float32).contiguous(memory_format=torch.channels_last)

    # The gradient of a shuffle is the inverse shuffle of the gradient. (The fused op's input is
    # uint8, which has no gradient.)
    def save_tiles(ctx, inputs, output):
        ctx.save_for_backward(inputs[1], inputs[2])

    def unshuffle_gradient(ctx, grad):
        perm, rot = ctx.saved_tensors
        return torch.ops.hmtl.shuffle_tiles(grad, *invert_tiles(perm, rot)), None, None

    torch.library.register_autograd("hmtl::shuffle_tiles", unshuffle_gradient, setup_context=save_tiles)
