"""Training throughput: torchvision's plain ResNet step, hmtl's SL step and its HMTL step, in one process.

    python benchmarks/train_step.py                               # CPU: ResNet50, 224 px, batch 16
    python benchmarks/train_step.py --arch resnet18 --img-size 64 --batch-size 64   # the BIWI runs' size

Every step starts from the same uint8 batch of synthetic heads (pinned, as the loader gives it on a
GPU). The plain step gets it already normalised (no augmentation, no tiles) and trains torchvision's
ResNet with one 3 x 66-way linear layer and a cross-entropy; the SL and HMTL steps are
hmtl.train_step as training runs it (augmentation level 1, flips, the fused tile op, hmtl's losses).
All use hmtl.AdaBelief and the same mixed precision. Each is timed over runs of --run-steps
consecutive steps with the device synchronised only at each run's ends, as training runs them (a
step that waits for the GPU inside shows); the three take turns run by run, so that drifts in
machine speed hit them alike. Each figure is a median over the runs, printed as images/s and as a
ratio to the plain step.

    --sync-check N   first N SL and N HMTL steps under torch.cuda.set_sync_debug_mode("error"):
                     any step that makes the host wait for the GPU stops with its traceback
    --compile-check  torch.compile of the deployable network against eager, on this device
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
import hmtl_runs  # noqa: E402
from tiles import machine  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=12, help="timed runs of each step")
    p.add_argument("--run-steps", type=int, default=1, help="consecutive steps a timed run holds")
    p.add_argument("--sync-check", type=int, default=0, metavar="N")
    p.add_argument("--compile-check", action="store_true")
    p.add_argument("--task", default="puzzle")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", default="data/cache")
    args = p.parse_args()

    config = lambda task: hmtl.config([
        "--data", "300wlp", "--arch", args.arch, "--img-size", str(args.img_size), "--batch-size",
        str(args.batch_size), "--task", task, "--amp", args.amp, "--device", args.device])
    rt = hmtl_runs.runtime(config("none"))
    n = args.batch_size
    data = hmtl_data.synthetic_heads(n, args.img_size, seed=0, split=0, folder=args.cache, workers=2)
    images, angles = torch.from_numpy(data.images[:n].copy()), torch.from_numpy(data.angles[:n])
    if rt.device.type == "cuda":
        images, angles = images.pin_memory(), angles.pin_memory()

    def plain():
        model = torchvision.models.get_model(args.arch, num_classes=3 * 66)
        model = model.to(rt.device, memory_format=torch.channels_last)
        optimizer = hmtl.AdaBelief(model.parameters())
        x = hmtl.normalize(images.to(rt.device))
        bins = ((angles.to(rt.device) + 99) / 3).floor().long().clamp(0, 65)

        def step(i):
            with rt.autocast():
                loss = F.cross_entropy(model(x).view(n, 3, 66).flatten(0, 1).float(), bins.flatten())
            optimizer.zero_grad(set_to_none=True)
            rt.scaler.scale(loss).backward()
            rt.scaler.step(optimizer)
            rt.scaler.update()
        return step

    def hmtl_step(task):
        cfg = config(task)
        model = hmtl.build_model(cfg).to(rt.device, memory_format=torch.channels_last)
        optimizer = hmtl.AdaBelief(model.parameters())
        return lambda i: hmtl.train_step(model, optimizer, images, angles, cfg, rt,
                                         hmtl.Draws(hmtl_data.seeded(0, i), n, rt.rows, rt.device))

    steps = {"torchvision ResNet, normalised batch": plain(), "SL step (augmentation + fused op)": hmtl_step("none"),
             f"HMTL step ({args.task}, flag 3, grid 2)": hmtl_step(args.task)}
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    if args.sync_check:
        sync_check(list(steps.values())[1:], args.sync_check, rt.device, sync)
    if args.compile_check:
        compile_check(config("none"), rt)
    times = {name: [] for name in steps}
    for r in range(args.steps + 2):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            for k in range(args.run_steps):
                step(r * args.run_steps + k)
            sync()
            if r >= 2:  # two warm-up rounds
                times[name].append((time.perf_counter() - t0) / args.run_steps)

    print(f"{args.arch}, {args.img_size} px, batch {n}, amp {rt.amp}, on {rt.device}: {machine(rt.device)}, "
          f"torch {torch.__version__}; median of {args.steps} runs of {args.run_steps} step(s)\n")
    print("| step | ms | images/s | x plain |\n| --- | --- | --- | --- |")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = next(iter(medians.values()))
    for name, t in medians.items():
        print(f"| {name} | {t * 1e3:.0f} | {n / t:.1f} | {t / base:.3f} |")
    sl, hm = list(medians.values())[1:]
    print(f"\nHMTL step / SL step: {hm / sl:.3f}")


def sync_check(steps, n, device, sync):
    """n steps of each under torch.cuda.set_sync_debug_mode("error"): a step that makes the host wait for
    the GPU (a blocking copy, a host read of a device tensor) raises where it does."""
    if device.type != "cuda":
        print("sync check: not on a GPU, nothing to check")
        return
    for step in steps:  # a first step allocates and builds its kernels
        step(0)
    sync()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in steps:
            for i in range(n):
                step(1 + i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sync()
    print(f"sync check: {n} SL and {n} HMTL steps, none made the host wait for the GPU")


def compile_check(cfg, rt):
    """torch.compile of the deployable network (hmtl.PoseEstimator) gives eager's angles."""
    net = hmtl.PoseEstimator(hmtl.build_model(cfg).deployable(), cfg["head"], cfg["bin_width"]).eval()
    net = net.to(rt.device, memory_format=torch.channels_last)
    x = torch.randn(8, 3, cfg["img_size"], cfg["img_size"], device=rt.device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        gap = (torch.compile(net)(x) - net(x)).abs().max().item()
    print(f"compile check: torch.compile of the deployable network is {gap:.2g}° from eager")
    if not gap <= 1e-2:
        raise SystemExit(f"torch.compile gives angles {gap:.2g}° from eager's")


if __name__ == "__main__":
    main()
