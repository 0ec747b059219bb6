"""Tile-op benchmark: every timing as a ratio to a plain copy into a preallocated output.

    python benchmarks/tiles.py                  # CPU, 64x3x224x224, g = 2 and 3, rotations on
    python benchmarks/tiles.py --device cuda    # the same against a device-to-device copy

Rows: the extension writing into a preallocated output (out=) and allocating its own;
the PyTorch reference; a per-image Python loop (how data-loader pipelines usually do
it); and the fused uint8 NHWC -> normalised float path against torch's own
permute + float + normalise with no shuffle at all. One process, median of --repeats.
"""
import argparse
import statistics
import time

import torch

import hmtl


def timed(fns, device, repeats, warmup=3):
    """Median milliseconds of each fn(), the functions taking turns so drifts hit them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                ts.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(ts) for ts in times]


def per_image_loop(x, perm, rot):
    """As a Dataset.__getitem__ does it: per image, cut tiles, rotate, reassemble; then collate."""
    g = int(perm.shape[1] ** 0.5)
    t = min(x.shape[2], x.shape[3]) // g
    images = []
    for img, p, r in zip(x, perm.tolist(), rot.tolist()):
        tiles = [img[:, i * t:(i + 1) * t, j * t:(j + 1) * t] for i in range(g) for j in range(g)]
        moved = [torch.rot90(tiles[q], k, (1, 2)) for q, k in zip(p, r)]
        out = img.clone()
        out[:, :g * t, :g * t] = torch.cat([torch.cat(moved[i * g:(i + 1) * g], 2) for i in range(g)], 1)
        images.append(out)
    return torch.stack(images)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    n, s = args.batch, args.size
    floor_name = "copy_ (floor)" if device.type == "cpu" else "device-to-device copy_ (floor)"
    print(f"tile op on {device} ({torch.get_num_threads()} threads), {n}x3x{s}x{s}, rotations on, "
          f"median of {args.repeats}, paths taking turns; torch {torch.__version__}, extension "
          f"{'built' if hmtl.tiles_ext is not None else 'NOT built'}\n")
    print("| input | g | path | ms | x floor |\n| --- | --- | --- | --- | --- |")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.uint8):
        x = (torch.rand(n, 3, s, s, generator=gen) * 255).to(dtype).to(device)
        out = torch.empty_like(x)
        for g in (2, 3):
            perm, rot = hmtl.sample_tiles(n, g, "puzzle", generator=gen, device=device)
            rot = torch.randint(0, 4, rot.shape, generator=gen).to(device)
            rows = [(floor_name, lambda: out.copy_(x))]
            if hmtl.tiles_ext is not None:
                rows += [("extension, out=", lambda: hmtl.shuffle_tiles(x, perm, rot, "ext", out=out)),
                         ("extension, allocating", lambda: hmtl.shuffle_tiles(x, perm, rot, "ext"))]
            rows += [("PyTorch reference", lambda: hmtl.shuffle_tiles(x, perm, rot, "torch")),
                     ("per-image Python loop", lambda: per_image_loop(x, perm, rot))]
            times = timed([fn for _, fn in rows], device, args.repeats)
            for (name, _), ms in zip(rows, times):
                print(f"| {str(dtype).replace('torch.', '')} | {g} | {name} | {ms:.2f} | {ms / times[0]:.2f} |")

    print(f"\nWhere the time goes: float32, g = 3, every tile rotated by the same k\n")
    print("| k | ms | x floor |\n| --- | --- | --- |")
    x = (torch.rand(n, 3, s, s, generator=gen) * 255).to(device)
    out = torch.empty_like(x)
    perm = hmtl.sample_tiles(n, 3, "puzzle", generator=gen, device=device)[0]
    rows = [lambda: out.copy_(x)]
    if hmtl.tiles_ext is not None:
        rows += [lambda k=k: hmtl.shuffle_tiles(x, perm, torch.full_like(perm, k), "ext", out=out) for k in range(4)]
    times = timed(rows, device, args.repeats)
    for k, ms in enumerate(times[1:]):
        print(f"| {k} ({90 * k}°) | {ms:.2f} | {ms / times[0]:.2f} |")

    print(f"\nFused uint8 {n}x{s}x{s}x3 -> normalised float32 {n}x3x{s}x{s} (channels_last), g = 3, rotations on\n")
    print("| path | ms | x torch |\n| --- | --- | --- |")
    x = torch.randint(0, 256, (n, s, s, 3), dtype=torch.uint8, generator=gen).to(device)
    perm, rot = hmtl.sample_tiles(n, 3, "puzzle", generator=gen, device=device)
    rot = torch.randint(0, 4, rot.shape, generator=gen).to(device)
    mean = torch.tensor(hmtl.IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(hmtl.IMAGENET_STD, device=device)[:, None, None]
    out = torch.empty(n, 3, s, s, device=device).contiguous(memory_format=torch.channels_last)
    rows = [("torch: permute + float + normalise, no shuffle",
             lambda: x.permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std))]
    if hmtl.tiles_ext is not None:
        rows += [("fused extension, allocating", lambda: hmtl.shuffle_tiles_normalize(x, perm, rot, backend="ext")),
                 ("fused extension, out=", lambda: hmtl.shuffle_tiles_normalize(x, perm, rot, backend="ext", out=out))]
    rows += [("fused PyTorch reference", lambda: hmtl.shuffle_tiles_normalize(x, perm, rot, backend="torch"))]
    times = timed([fn for _, fn in rows], device, args.repeats)
    for (name, _), ms in zip(rows, times):
        print(f"| {name} | {ms:.2f} | {ms / times[0]:.2f} |")


if __name__ == "__main__":
    main()
