"""Input pipeline: images/s decoding JPEG + .mat per sample vs reading the memory-mapped cache.

    python benchmarks/loading.py --root AFLW2000     # any AFLW2000 / 300W-LP folder

Both go through a DataLoader of 64-image batches into uint8 N x S x S x 3 (what the fused tile
op takes): decoding uses --workers processes (PIL decode, HopeNet crop, resize), the cache is
read in the training process. Each figure is the best of --passes over the whole folder.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout, installed or not
import hmtl  # noqa: E402
import hmtl_data  # noqa: E402
from tiles import machine  # noqa: E402


def images_per_second(loader, passes):
    best = 0.0
    for _ in range(passes):
        start, n = time.perf_counter(), 0
        for images, _ in loader:
            n += len(images)
        best = max(best, n / (time.perf_counter() - start))
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="an AFLW2000 / 300W-LP folder")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--passes", type=int, default=3)
    args = p.parse_args()
    cfg = hmtl.config(["--data", "aflw2000", "--data-root", args.root, "--img-size", str(args.img_size), "--workers",
                       str(args.workers), "--no-aflw2000-reduced"])
    files = hmtl_data.load_split(cfg, False)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        arrays = hmtl_data.load_split({**cfg, "cache": cache}, False)
        build = time.perf_counter() - start
        batches = hmtl_data.GlobalBatches(len(files), 64, 0, True, False)
        decode = images_per_second(torch.utils.data.DataLoader(files, batch_sampler=batches,
                                                               num_workers=args.workers), args.passes)
        cached = images_per_second(torch.utils.data.DataLoader(arrays, batch_sampler=batches), args.passes)
    print(f"{len(files)} images from {args.root}, {args.img_size} px crops, on {machine(torch.device('cpu'))}\n")
    print("| source | images/s | x decoding |\n| --- | --- | --- |")
    print(f"| JPEG + .mat, decoded and cropped ({args.workers} workers) | {decode:.0f} | 1.0 |")
    print(f"| memory-mapped cache (--cache) | {cached:.0f} | {cached / decode:.1f} |")
    print(f"\nbuilding the cache took {build:.1f} s ({len(files) / build:.0f} images/s)")


if __name__ == "__main__":
    main()
