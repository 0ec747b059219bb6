"""Training throughput: a plain torchvision ResNet step, our SL step and our HMTL step, from one process.

    python benchmarks/train_step.py                               # CPU: ResNet50, 224 px, batch 16
    python benchmarks/train_step.py --device cuda --batch-size 64 # GPU: also the share spent augmenting

Every step starts from a uint8 batch read from a synthetic-heads cache. The plain step
gets it already normalised (no augmentation, no tiles) and trains torchvision's ResNet
with one 3 x 66-way linear layer; SL and HMTL steps run hmtl.prepare (augmentation
on the device + the fused tile op) and hmtl's losses. All use hmtl.AdaBelief. The three
alternate step by step, so drifts in machine speed hit them alike; each figure is a
median, printed as images/s and as a ratio to the plain step; on a GPU, then also each step run
--steps times back to back, as training runs them (the host waits for the GPU at the end only).
--compile [MODE] runs each network through torch.compile (the tile op stays outside the compiled
graph); --compile reduce-overhead replays it as CUDA graphs on a GPU.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout, installed or not
import hmtl  # noqa: E402
import hmtl_data  # noqa: E402
from tiles import machine  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--task", default="puzzle")
    p.add_argument("--flag", type=int, default=3)
    p.add_argument("--grid", type=int, default=2)
    p.add_argument("--aug", default="1")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", default="data/cache")
    p.add_argument("--compile", nargs="?", const="default", choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile each network, in this mode (reduce-overhead: CUDA graphs on a GPU)")
    args = p.parse_args()

    cfg = hmtl.resolve_config(vars(hmtl.get_args_parser().parse_args([
        "--data", "300wlp", "--arch", args.arch, "--img-size", str(args.img_size), "--batch-size",
        str(args.batch_size), "--task", args.task, "--flag", str(args.flag), "--grid", str(args.grid),
        "--aug", args.aug, "--amp", args.amp, "--device", args.device])))
    rt = hmtl.runtime(cfg)
    n = args.batch_size
    data = hmtl_data.synthetic_heads(n, args.img_size, seed=0, split=0, folder=args.cache, workers=2)
    images = torch.from_numpy(data.images[:n].copy())
    if rt.device.type == "cuda":
        images = images.pin_memory()  # as hmtl.py's loader hands batches over
    angles = torch.from_numpy(data.angles[:n]).to(rt.device)

    def trainer(model, loss_of):
        model = model.to(rt.device, memory_format=torch.channels_last)
        optimizer = hmtl.AdaBelief(model.parameters())
        model = torch.compile(model, mode=args.compile) if args.compile else model

        def step(i):
            with rt.autocast():
                loss = loss_of(model, i)
            optimizer.zero_grad(set_to_none=True)
            rt.scaler.scale(loss).backward()
            rt.scaler.step(optimizer)
            rt.scaler.update()
        return step

    plain_input = hmtl.shuffle_tiles_normalize(images.to(rt.device), *hmtl.sample_tiles(n, 1, "none", device=rt.device))
    bins = ((angles + 99) / 3).floor().long().clamp(0, 65)

    def plain_loss(model, i):
        return F.cross_entropy(model(plain_input).view(n, 3, 66).flatten(0, 1).float(), bins.flatten())

    def hmtl_loss(task):
        def loss(model, i):
            x, target, perm, rot, _ = hmtl.prepare(images, angles, cfg, hmtl.seeded(0, i), n, rt, task=task, train=True)
            pose, ssl = model(x)
            sl = hmtl.supervised_loss(pose, target, cfg, rt.centres)
            return hmtl.hmtl_loss(sl, hmtl.ssl_loss(ssl, {"puzzle": perm, "rotation": rot}) if ssl else 0, 50.0)
        return loss

    def build(task):
        return hmtl.HMTL(args.arch, 3, "catreg", 3, 0.5, task, args.flag, args.grid)

    steps = {"torchvision ResNet": trainer(getattr(torchvision.models, args.arch)(num_classes=198), plain_loss),
             "SL step (augmentation + fused op)": trainer(build("none"), hmtl_loss("none")),
             f"HMTL step ({args.task}, flag {args.flag}, grid {args.grid})": trainer(build(args.task), hmtl_loss(args.task))}
    times = {name: [] for name in steps}
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    for i in range(args.steps + 2):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step(i)
            sync()
            if i >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t0)

    print(f"{args.arch}, {args.img_size} px, batch {n}, aug {args.aug}, amp {rt.amp}"
          f"{f', torch.compile ({args.compile})' if args.compile else ''}, on {rt.device}: {machine(rt.device)}; median of "
          f"{args.steps} steps\n")
    print("| step | ms | images/s | x plain |\n| --- | --- | --- | --- |")
    base = None
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        base = base or ms
        print(f"| {name} | {ms:.0f} | {n / ms * 1e3:.1f} | {ms / base:.3f} |")
    sl, hm = (statistics.median(times[k]) for k in list(times)[1:])
    print(f"\nHMTL step / SL step: {hm / sl:.3f}")

    if rt.device.type == "cuda":  # as training runs them: the host queues step after step, waiting at the end only
        print(f"\n{args.steps} steps back to back, synchronised at the end only\n")
        print("| step | images/s | x plain |\n| --- | --- | --- |")
        base = None
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(i)
            sync()
            rate = n * args.steps / (time.perf_counter() - t0)
            base = base or rate
            print(f"| {name} | {rate:.0f} | {base / rate:.3f} |")

    if rt.device.type == "cuda":  # how much of a step the input pipeline takes on the GPU
        aug = []
        for i in range(args.steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            hmtl.prepare(images, angles, cfg, hmtl.seeded(1, i), n, rt, task=args.task, train=True)
            end.record()
            torch.cuda.synchronize()
            aug.append(start.elapsed_time(end))
        share = statistics.median(aug) / (hm * 1e3)
        print(f"augmentation + tile op: {statistics.median(aug):.2f} ms = {share:.1%} of the HMTL step")


if __name__ == "__main__":
    main()
