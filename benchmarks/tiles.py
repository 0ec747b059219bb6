"""Tile-op benchmark: every timing a ratio to a baseline measured in the same process, like for like.

    python benchmarks/tiles.py [--rounds 3]          # CPU, 64x3x224x224, g = 2 and 3, rotations on
    python benchmarks/tiles.py --device cuda         # the same against a device-to-device copy

Each row is a median of --repeats calls, the paths taking turns (so drifts in machine speed hit
them alike), in one of two cache states, the same for every path of a table:
  cold  before every timed call, a buffer twice the last-level cache (the CPU's L3, the GPU's L2) is
        copied into another, so x and out come from memory;
  warm  the paths follow each other with nothing between, each finding x and out where the one
        before left them (in cache, where the batch fits).
Rows: a plain copy into a preallocated output (the floor), the extension writing into a
preallocated output (out=) and allocating its own, a per-image Python loop (tiles cut, turned and
put back per image, as a data-loader transform does it) in the same two forms, and the PyTorch
reference (cold). On a GPU, the shuffle kernel's own device time against the copy's (profiler).
Then the per-rotation cost (cold and warm), and the fused uint8 NHWC ->
normalised float path against torch's permute + float + normalise (cold; both allocating, and both
writing into `out`). With --rounds R the whole measurement repeats and the summary gives each
ratio's range over the rounds.
"""
import argparse
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout, installed or not
import hmtl  # noqa: E402


def last_level_cache_bytes(device):
    """The GPU's L2, or the CPU's largest cache as Linux reports it (32 MiB when it says nothing)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text))
    return max(sizes, default=32 << 20)


class Flusher:
    """Evicts x and out from the caches: copies a buffer twice the last-level cache into another."""

    def __init__(self, device):
        n = 2 * last_level_cache_bytes(device)
        self.src = torch.ones(n, dtype=torch.uint8, device=device)
        self.dst = torch.empty_like(self.src)

    def __call__(self):
        self.dst.copy_(self.src)


def timed(fns, device, repeats, flush=None, warmup=3):
    """Median milliseconds of each fn(), the functions taking turns so drifts hit them alike; with
    `flush`, it runs (untimed) before every call."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            if flush is not None:
                flush()
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
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


def kernel_ms(fn, name_part, repeats):
    """Mean device milliseconds per call of fn() spent in the CUDA kernels (or copies) whose name
    holds `name_part`, from torch.profiler: the kernel alone, without the host's part of the call."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    found = [e for e in prof.key_averages() if name_part in e.key]
    if not found:
        raise RuntimeError(f"the profiler saw no kernel named like {name_part!r}")
    return sum(e.self_device_time_total for e in found) / repeats / 1e3


def per_image_loop(x, perm, rot, out=None):
    """As a Dataset.__getitem__ does it: per image, cut tiles, turn them, put them back; then stack
    (or, given `out`, write each image into it)."""
    g = int(perm.shape[1] ** 0.5)
    t = min(x.shape[2], x.shape[3]) // g
    images = []
    for n, (img, p, r) in enumerate(zip(x, perm.tolist(), rot.tolist())):
        tiles = [img[:, i * t:(i + 1) * t, j * t:(j + 1) * t] for i in range(g) for j in range(g)]
        moved = [torch.rot90(tiles[q], k, (1, 2)) for q, k in zip(p, r)]
        grid = torch.cat([torch.cat(moved[i * g:(i + 1) * g], 2) for i in range(g)], 1)
        if out is None:
            image = img.clone()
            image[:, :g * t, :g * t] = grid
            images.append(image)
        else:
            out[n].copy_(img)
            out[n, :, :g * t, :g * t] = grid
    return torch.stack(images) if out is None else out


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    isa = hmtl.tiles_ext.cpu_kernel_isa() if hmtl.tiles_ext is not None else "not built"
    return f"{name}, {torch.get_num_threads()} threads, kernel {isa}"


def batches(n, s, device, gen):
    """(dtype name, g, x, out, perm, rot) for float32 and uint8 batches at g = 2 and 3, every tile turned."""
    for dtype in (torch.float32, torch.uint8):
        x = (torch.rand(n, 3, s, s, generator=gen) * 255).to(dtype).to(device)
        out = torch.empty_like(x)
        for g in (2, 3):
            perm, _ = hmtl.sample_tiles(n, g, "puzzle", generator=gen, device=device)
            rot = torch.randint(0, 4, perm.shape, generator=gen).to(device)
            yield str(dtype).replace("torch.", ""), g, x, out, perm, rot


def one_round(args, device, ratios, show):
    n, s = args.batch, args.size
    flush = Flusher(device)
    floor_name = "copy_ into out (floor)" if device.type == "cpu" else "device-to-device copy_ (floor)"
    say = print if show else (lambda *a, **k: None)
    say("Cold: x and out come from memory\n")
    say("| input | g | path | ms | x floor |\n| --- | --- | --- | --- | --- |")
    gen = torch.Generator().manual_seed(0)
    warm = []
    for name, g, x, out, perm, rot in batches(n, s, device, gen):
        rows = [(floor_name, lambda: out.copy_(x))]
        if hmtl.tiles_ext is not None:
            rows += [("extension, out=", lambda: hmtl.shuffle_tiles(x, perm, rot, "ext", out=out)),
                     ("per-image loop, out=", lambda: per_image_loop(x, perm, rot, out)),
                     ("extension, allocating", lambda: hmtl.shuffle_tiles(x, perm, rot, "ext")),
                     ("per-image loop, allocating", lambda: per_image_loop(x, perm, rot))]
        rows += [("PyTorch reference, allocating", lambda: hmtl.shuffle_tiles(x, perm, rot, "torch"))]
        times = dict(zip([r[0] for r in rows], timed([fn for _, fn in rows], device, args.repeats, flush)))
        for path, ms in times.items():
            say(f"| {name} | {g} | {path} | {ms:.2f} | {ms / times[floor_name]:.2f} |")
        if hmtl.tiles_ext is not None:
            ratios[f"{name}, g = {g}: extension out= / copy_, cold"].append(
                times["extension, out="] / times[floor_name])
            ratios[f"{name}, g = {g}: loop / extension, both out="].append(
                times["per-image loop, out="] / times["extension, out="])
            ratios[f"{name}, g = {g}: loop / extension, both allocating"].append(
                times["per-image loop, allocating"] / times["extension, allocating"])
            copy_ms, ext_ms = timed([rows[0][1], rows[1][1]], device, args.repeats)
            warm.append((name, g, copy_ms, ext_ms))
            ratios[f"{name}, g = {g}: extension out= / copy_, warm"].append(ext_ms / copy_ms)

    if hmtl.tiles_ext is None:
        return
    if device.type == "cuda":
        say("\nThe kernels alone (torch.profiler device time; the off-grid copies and device-side checks "
            "left out): the shuffle kernel against the device-to-device copy\n")
        say("| input | g | copy ms | shuffle kernel ms | x copy |\n| --- | --- | --- | --- | --- |")
        try:
            for name, g, x, out, perm, rot in batches(n, s, device, gen):
                copy_ms = kernel_ms(lambda: out.copy_(x), "Memcpy DtoD", args.repeats)
                op_ms = kernel_ms(lambda: hmtl.shuffle_tiles(x, perm, rot, "ext", out=out, check=False),
                                  "hmtl::shuffle", args.repeats)
                say(f"| {name} | {g} | {copy_ms:.3f} | {op_ms:.3f} | {op_ms / copy_ms:.2f} |")
                ratios[f"{name}, g = {g}: shuffle kernel / copy, kernels alone"].append(op_ms / copy_ms)
        except Exception as e:  # noqa: BLE001 -- a profiler that sees nothing must not cost the other figures
            say(f"(not measured: {e})")
    say("\nWarm: the extension (out=) and copy_ taking turns, nothing between\n")
    say("| input | g | copy_ ms | extension ms | x copy_ |\n| --- | --- | --- | --- | --- |")
    for name, g, copy_ms, ext_ms in warm:
        say(f"| {name} | {g} | {copy_ms:.3f} | {ext_ms:.3f} | {ext_ms / copy_ms:.2f} |")

    say("\nWhere the time goes: g = 3, every tile turned by the same k, out=, as a ratio to copy_\n")
    say("| input | cache | 0° | 90° | 180° | 270° |\n| --- | --- | --- | --- | --- | --- |")
    for dtype in (torch.float32, torch.uint8):
        name = str(dtype).replace("torch.", "")
        x = (torch.rand(n, 3, s, s, generator=gen) * 255).to(dtype).to(device)
        out = torch.empty_like(x)
        perm = hmtl.sample_tiles(n, 3, "puzzle", generator=gen, device=device)[0]
        turned = [torch.full_like(perm, k) for k in range(4)]
        fns = [lambda: out.copy_(x)] + [lambda r=r: hmtl.shuffle_tiles(x, perm, r, "ext", out=out) for r in turned]
        for cache, flushing in (("cold", flush), ("warm", None)):
            times = timed(fns, device, args.repeats, flushing)
            say(f"| {name} | {cache} | " + " | ".join(f"{ms / times[0]:.2f}" for ms in times[1:]) + " |")
            for k, ms in enumerate(times[1:]):
                ratios[f"{name}, g = 3, all tiles turned {90 * k}°, {cache}: / copy_"].append(ms / times[0])

    say(f"\nFused uint8 {n}x{s}x{s}x3 -> normalised float32 {n}x3x{s}x{s} (channels_last), g = 3, rotations on, cold\n")
    say("| path | ms | x torch, alike |\n| --- | --- | --- |")
    x = torch.randint(0, 256, (n, s, s, 3), dtype=torch.uint8, generator=gen).to(device)
    perm, rot = hmtl.sample_tiles(n, 3, "puzzle", generator=gen, device=device)
    rot = torch.randint(0, 4, rot.shape, generator=gen).to(device)
    mean = torch.tensor(hmtl.IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(hmtl.IMAGENET_STD, device=device)[:, None, None]
    out = torch.empty(n, 3, s, s, device=device).contiguous(memory_format=torch.channels_last)
    rows = [("torch: permute + float + normalise, allocating", lambda: x.permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)),
            ("torch: the same into out", lambda: out.copy_(x.permute(0, 3, 1, 2)).div_(255).sub_(mean).div_(std)),
            ("fused extension, allocating", lambda: hmtl.shuffle_tiles_normalize(x, perm, rot, backend="ext")),
            ("fused extension, out=", lambda: hmtl.shuffle_tiles_normalize(x, perm, rot, backend="ext", out=out)),
            ("fused PyTorch reference, allocating", lambda: hmtl.shuffle_tiles_normalize(x, perm, rot, backend="torch"))]
    times = timed([fn for _, fn in rows], device, args.repeats, flush)
    alike = [0, 1, 0, 1, 0]
    for (path, _), ms, base in zip(rows, times, alike):
        say(f"| {path} | {ms:.2f} | {ms / times[base]:.2f} |")
    ratios["fused / torch, both allocating"].append(times[2] / times[0])
    ratios["fused / torch, both out="].append(times[3] / times[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything; the summary gives ranges")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"tile op on {device}: {machine(device)}; {args.batch}x3x{args.size}x{args.size}, rotations on, "
          f"median of {args.repeats}, paths taking turns; last-level cache "
          f"{last_level_cache_bytes(device) >> 20} MiB; torch {torch.__version__}\n")
    ratios = defaultdict(list)
    for r in range(args.rounds):
        one_round(args, device, ratios, show=r == args.rounds - 1)
    if args.rounds > 1:
        print(f"\nRange over {args.rounds} rounds\n\n| ratio | min | max |\n| --- | --- | --- |")
        for name, values in ratios.items():
            print(f"| {name} | {min(values):.2f} | {max(values):.2f} |")


if __name__ == "__main__":
    main()
