"""The tile op against a plain copy of the same batch, every timing a ratio to a baseline measured in the
same process, both sides allocating their output.

    python benchmarks/tiles.py [--rounds 3]          # 64 x 3 x 224 x 224, float32 and uint8, g = 2 and 3

Rows: x.clone() (the floor), the extension, a per-image Python loop (tiles cut, turned and put back per
image, as a data-loader transform does it) and the PyTorch reference, all with every tile turned at
random; then the fused uint8 N x H x W x 3 -> normalised float op (what a training step calls) against
torch's own permute + float + normalise with no shuffle at all. Each figure is a median of --repeats
calls, the paths taking turns so that drifts in machine speed hit them alike, and with a buffer twice
the last-level cache copied before every call, so that x and out come from memory ("cold").
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout, installed or not
import hmtl  # noqa: E402
import hmtl_tiles  # noqa: E402


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def timed(fns, device, repeats, flush):
    """Median milliseconds of each fn(), the functions taking turns, `flush` run (untimed) before each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            flush()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(ts) for ts in times]


def flusher(device):
    """Copies a buffer twice the last-level cache (the GPU's L2, the CPU's largest cache) into another."""
    if device.type == "cuda":
        size = torch.cuda.get_device_properties(device).L2_cache_size
    else:
        sizes = [f.read_text().strip() for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size")]
        size = max((int(s[:-1]) << {"K": 10, "M": 20}[s[-1]] for s in sizes if s[-1] in "KM"), default=32 << 20)
    src = torch.ones(2 * size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def per_image_loop(x, perm, rot):
    """As a Dataset.__getitem__ does it: per image, cut tiles, turn them, put them back; then stack."""
    g = int(perm.shape[1] ** 0.5)
    t = min(x.shape[2], x.shape[3]) // g
    images = []
    for img, p, r in zip(x, perm.tolist(), rot.tolist()):
        tiles = [img[:, i * t:(i + 1) * t, j * t:(j + 1) * t] for i in range(g) for j in range(g)]
        moved = [torch.rot90(tiles[q], k, (1, 2)) for q, k in zip(p, r)]
        image = img.clone()
        image[:, :g * t, :g * t] = torch.cat([torch.cat(moved[i * g:(i + 1) * g], 2) for i in range(g)], 1)
        images.append(image)
    return torch.stack(images)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole measurement; print each ratio's range")
    args = p.parse_args()
    device = torch.device(args.device)
    if hmtl_tiles.ext is None:
        raise SystemExit("the extension is not built: pip install --no-build-isolation -e .")
    flush, gen = flusher(device), torch.Generator().manual_seed(0)
    ratios = {}
    for r in range(args.rounds):
        print(f"\nround {r + 1}/{args.rounds}: {args.batch} x 3 x {args.size} x {args.size} on "
              f"{machine(device)}, torch {torch.__version__}; ms, median of {args.repeats}, cold\n")
        print("| input | g | path | ms | x floor |\n| --- | --- | --- | --- | --- |")
        for dtype in (torch.float32, torch.uint8):
            x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), generator=gen).to(dtype).to(device)
            for g in (2, 3):
                perm, _ = hmtl.sample_tiles(args.batch, g, "puzzle", gen)
                rot = torch.randint(0, 4, perm.shape, generator=gen)
                perm, rot = perm.to(device), rot.to(device)
                rows = [("x.clone() (floor)", x.clone),
                        ("extension", lambda: hmtl_tiles.shuffle_tiles(x, perm, rot, "ext")),
                        ("per-image loop", lambda: per_image_loop(x, perm, rot)),
                        ("PyTorch reference", lambda: hmtl_tiles.shuffle_tiles(x, perm, rot, "torch"))]
                report(rows, timed([fn for _, fn in rows], device, args.repeats, flush), ratios,
                       f"{str(dtype)[6:]} | {g}")
        u8 = torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8, generator=gen).to(device)
        perm, rot = (t.to(device) for t in hmtl.sample_tiles(args.batch, 2, "puzzle_rotation", gen))
        mean = torch.tensor(hmtl_tiles.IMAGENET_MEAN, device=device)[:, None, None]
        std = torch.tensor(hmtl_tiles.IMAGENET_STD, device=device)[:, None, None]
        rows = [("torch: permute, float, normalise (no shuffle)",
                 lambda: ((u8.permute(0, 3, 1, 2).float() / 255 - mean) / std).contiguous(
                     memory_format=torch.channels_last)),
                ("fused extension", lambda: hmtl_tiles.shuffle_tiles_normalize(u8, perm, rot, backend="ext"))]
        report(rows, timed([fn for _, fn in rows], device, args.repeats, flush), ratios, "uint8 NHWC | 2")
    if args.rounds > 1:
        print(f"\nrange over {args.rounds} rounds\n\n| input | g | path | x floor |\n| --- | --- | --- | --- |")
        for key, values in ratios.items():
            print(f"| {key} | {min(values):.2f}-{max(values):.2f} |")


def report(rows, ms, ratios, what):
    for (name, _), t in zip(rows, ms):
        print(f"| {what} | {name} | {t:.2f} | {t / ms[0]:.2f} |")
        ratios.setdefault(f"{what} | {name}", []).append(t / ms[0])


if __name__ == "__main__":
    main()
