"""The paper's tables and figures, and a benchmark on real faces, run with hmtl.py. Started by run_all.sh.

Paper mode (default). Every row of Tables 1-4 (docs/method.md, "The experiments") is a configuration
of hmtl.py flags, run --seeds times (the paper reports single runs; we report mean ± std) into
<runs>/<configuration>/seed<k>. A finished run whose configuration still matches is skipped, an
unfinished one resumed, one made with other settings run again. <out>/tables.md then holds each
table in its own layout -- ours, the paper's figures, the difference -- and <out>/fig*.png the
figures. Every test-set figure comes from the final model of a run (its last epoch).

--quick runs every configuration on synthetic heads at a tiny size (ResNet18, 32 px, 2 epochs):
a smoke test of the whole pipeline, labelled as such, not the paper's result.

--real DIR trains on the BIWI training sequences (01-16) and tests on the test sequences (17-24),
from DIR/BIWI_train.npz and DIR/BIWI_test.npz (made by tools/biwi_to_npz.py): SL, HMTL (2x2 puzzle,
flag 3) and HMTL w/o SSHs, ResNet18 at 64 px, sized for a CPU; --ablations adds the variants of
HMTL (w, grid, flag, shuffled fraction, resolution); --dev runs the flip study on the development
split instead (DIR/BIWI_devtrain.npz, sequences 01-12; DIR/BIWI_devval.npz, 13-16). It writes
<out>/biwi.md and <out>/biwi.png (or biwi_dev.*).
"""
import argparse
import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np

import hmtl
from hmtl_data import ANGLES

# MAE in degrees from the paper: (yaw, pitch, roll, mean); None where it gives none.
PAPER = {
    ("Table 1", "SL, 1 subject"): (5.338, 6.852, None, 6.095),
    ("Table 1", "HMTL puzzle 2x2, flag 1"): (6.478, 9.575, None, 8.026),
    ("Table 1", "HMTL puzzle 2x2, flag 2"): (5.667, 7.13, None, 6.398),
    ("Table 1", "HMTL puzzle 2x2, flag 3"): (4.272, 6.852, None, 5.563),
    ("Table 1", "HMTL puzzle 2x2, flag 4"): (4.347, 7.738, None, 6.043),
    ("Table 1", "HMTL rotation 2x2, flag 1"): (4.985, 10.072, None, 7.528),
    ("Table 1", "HMTL rotation 2x2, flag 2"): (4.373, 9.623, None, 6.998),
    ("Table 1", "HMTL rotation 2x2, flag 3"): (4.757, 7.337, None, 6.047),
    ("Table 1", "HMTL rotation 2x2, flag 4"): (4.701, 7.712, None, 6.207),
    ("Table 1", "HMTL puzzle-rotation 2x2, flag 1"): (5.075, 8.725, None, 6.9),
    ("Table 1", "HMTL puzzle-rotation 2x2, flag 2"): (5.243, 7.921, None, 6.582),  # the paper prints flags
    ("Table 1", "HMTL puzzle-rotation 2x2, flag 3"): (5.243, 7.921, None, 6.582),  # 2, 3 and 4 with the
    ("Table 1", "HMTL puzzle-rotation 2x2, flag 4"): (5.243, 7.921, None, 6.582),  # same figures
    ("Table 3", "SL, aug level 2"): (6.221, 5.569, 3.984, 5.258),
    ("Table 3", "HMTL 3x3 puzzle w/o SSHs"): (4.589, 6.223, 4.465, 5.092),
    ("Table 3", "HMTL 3x3 puzzle"): (3.874, 5.929, 4.416, 4.740),
}
PAPER_SUBJECTS = {  # Table 4, 1-4 training subjects: mean MAE, and (yaw, pitch) where the paper gives them
    "SL": (5.333, 4.760, 3.934, 3.828),
    "HMTL 2x2 puzzle": (5.116, 4.365, 3.615, 3.603),
    "HMTL 2x2 puzzle w/o SSHs": (7.466, 5.353, 4.203, 4.101),
}
PAPER_SUBJECTS_ANGLES = {"HMTL 2x2 puzzle w/o SSHs": ((6.6, 8.332), (4.746, 5.96), (3.490, 4.916), (3.705, 4.498))}
PEERS = "HopeNet (α=2) 6.16, FSA-Net 5.07, WHENet 5.42, 6DRepNet 3.97, DirectMHP 4.04"
TASK_NAMES = {"puzzle": "puzzle", "rotation": "rotation", "puzzle_rotation": "puzzle-rotation"}
T4_METHODS = tuple(PAPER_SUBJECTS)

# The real-face benchmark: sized for a 2-core CPU (a run ~7 min at 64 px where bf16 is native).
# The schedule and every setting were fixed before any run; the flip probability (hmtl's default)
# was chosen on the development split (--dev), never on the test sequences.
REAL = ["--data", "biwi", "--arch", "resnet18", "--epochs", "12", "--milestones", "10", "--workers", "0"]
REAL_FLIP = "0.5"
HMTL_2X2 = ["--task", "puzzle", "--flag", "3", "--grid", "2"]


# For --plan: images per epoch of each training set. 300W-LP: 122,450 images; ETH-XGaze: ~10,000
# face patches per subject (the paper's "1 subject, ~10k images"); evaluation passes are forward
# only, ~3x cheaper than a training step, and counted as such.
TRAIN_IMAGES = {"300wlp": 122_450, "ethxgaze": 10_000}
TEST_IMAGES = {"300wlp": 2_000, "ethxgaze": 3 * 10_000}


def plan(rate, seeds, gpus):
    """Projected wall time of run_all.sh's paper runs at `rate` training images/s per GPU."""
    tables = configurations(False, {k: "ROOT" for k in ("ETHXGAZE_ROOT", "W300LP_ROOT", "AFLW2000_ROOT")})
    seen, lines = set(), ["| table | runs | training images per run | hours per run | hours |",
                          "| --- | --- | --- | --- | --- |"]
    total = 0.0
    for name, rows in tables.items():
        runs, seconds, sizes, each = 0, 0.0, set(), []
        for _, flags in rows:
            if slug(flags) in seen:  # a row two tables share runs once
                continue
            seen.add(slug(flags))
            cfg = hmtl.resolve_config(vars(hmtl.get_args_parser().parse_args(
                ["pretrained.pt" if f == "PRETRAINED" else f for f in flags])))
            data = cfg["data"]
            per_epoch = TRAIN_IMAGES[data] * (int(cfg["train_subjects"]) if data == "ethxgaze" else 1)
            images = cfg["epochs"] * (per_epoch + TEST_IMAGES[data] / 3)
            runs += seeds
            seconds += seeds * images / rate
            each.append(images / rate / 3600)
            sizes.add(f"{cfg['epochs']} x {per_epoch:,}")
        total += seconds
        per_run = f"{min(each):.1f}" + (f"-{max(each):.1f}" if max(each) - min(each) >= 0.05 else "")
        lines.append(f"| {name} | {runs} | {', '.join(sorted(sizes))} | {per_run} | {seconds / 3600:.1f} |")
    lines.append(f"| all | | | | **{total / 3600:.1f}** on 1 GPU; {total / 3600 / gpus:.1f} on {gpus} "
                 f"if they scaled perfectly |")
    return "\n".join(lines)


def t4_label(method, subjects):
    """Table 4's row label: a method trained on k ETH-XGaze subjects."""
    return f"{method}, {subjects} subject{'s' * (subjects > 1)}"


def configurations(quick, env):
    """{table: [(row label, flags)]} for every row of Tables 1-4; the SS pre-training run first."""
    if quick:  # synthetic heads stand in for every dataset; ETH-XGaze runs keep their hyperparameters
        tiny = ["--arch", "resnet18", "--img-size", "32", "--batch-size", "32", "--epochs", "2", "--synthetic-val",
                "96", "--workers", "0"]
        eth = lambda subjects, aug: ["--data", "synthetic", "--synthetic-train", str(192 * subjects), "--head",
                                     "reg", "--dropout", "0.4", "--ssl-weight", "1", "--milestones", "30", "40",
                                     "--aug", aug, *tiny]
        w300 = lambda aug: ["--data", "synthetic", "--synthetic-train", "192", "--aug", aug, *tiny]
    else:
        eth = lambda subjects, aug: ["--data", "ethxgaze", "--data-root", env["ETHXGAZE_ROOT"],
                                     "--train-subjects", str(subjects), "--aug", aug]
        w300 = lambda aug: ["--data", "300wlp", "--data-root", env["W300LP_ROOT"], "--val-root",
                            env["AFLW2000_ROOT"], "--aflw2000-reduced", "--aug", aug]
    hmtl_ = lambda task, flag=3, grid=2: ["--task", task, "--flag", str(flag), "--grid", str(grid)]
    pretrain = ["--stage", "pretrain", "--task", "rotation", "--grid", "2"]
    t1 = [("SL, 1 subject", eth(1, "eth41"))] + [
        (f"HMTL {TASK_NAMES[t]} 2x2, flag {f}", eth(1, "eth41") + hmtl_(t, f))
        for t in ("puzzle", "rotation", "puzzle_rotation") for f in (1, 2, 3, 4)]
    t2 = [("SS pre-training (rotation 2x2)", w300("1") + pretrain)]
    for init, flags in (("random", []), ("ImageNet", ["--init", "imagenet"]), ("SS-pre-trained", ["--init", "PRETRAINED"])):
        t2 += [(f"SL, {init} init", w300("1") + flags), (f"HMTL puzzle, flag 3, {init} init", w300("1") + flags + hmtl_("puzzle"))]
    t2 += [("HMTL rotation, flag 3, random init", w300("1") + hmtl_("rotation")),
           ("SL, 1° bins", w300("1") + ["--bin-width", "1"]),
           ("HMTL puzzle, 1° bins", w300("1") + ["--bin-width", "1"] + hmtl_("puzzle")),
           ("SL, aug level 2", w300("2")), ("HMTL puzzle, aug level 2", w300("2") + hmtl_("puzzle"))]
    t3 = [("SL, aug level 2", w300("2")), ("HMTL 3x3 puzzle w/o SSHs", w300("2") + hmtl_("puzzle", 3, 3) + ["--no-ssh"]),
          ("HMTL 3x3 puzzle", w300("2") + hmtl_("puzzle", 3, 3))]
    t4 = [(t4_label(name, k), eth(k, "eth52") + flags) for k in (1, 2, 3, 4)
          for name, flags in zip(T4_METHODS, ([], hmtl_("puzzle"), hmtl_("puzzle") + ["--no-ssh"]))]
    return {"Table 1": t1, "Table 2": t2, "Table 3": t3, "Table 4": t4}


def real_configurations(folder, dev, ablations):
    """[(row label, flags, seeds)] of the real-face benchmark (or of its flip study, with dev); seeds is
    "main" (--seeds of them), "ablation" (--ablation-seeds) or "once" (what a 2-core CPU had time for)."""
    train, test = ("devtrain", "devval") if dev else ("train", "test")
    data = REAL + ["--data-root", str(Path(folder) / f"BIWI_{train}.npz"),
                   "--val-data", "biwi", "--val-root", str(Path(folder) / f"BIWI_{test}.npz")]
    if dev:
        return [(f"{name}, flip {p}", data + ["--img-size", "64", "--flip", p] + flags, "main")
                for p in ("0", "0.5") for name, flags in (("SL", []), ("HMTL 2x2 puzzle, flag 3", HMTL_2X2))]
    base, large = data + ["--img-size", "64", "--flip", REAL_FLIP], data + ["--img-size", "112", "--flip", REAL_FLIP]
    rows = [("SL", base, "main"), ("HMTL 2x2 puzzle, flag 3, w = 50", base + HMTL_2X2, "main"),
            ("HMTL 2x2 puzzle w/o SSHs", base + HMTL_2X2 + ["--no-ssh"], "main")]
    if ablations:
        rows += [("HMTL, w = 10", base + HMTL_2X2 + ["--ssl-weight", "10"], "ablation"),
                 ("HMTL, w = 1", base + HMTL_2X2 + ["--ssl-weight", "1"], "ablation"),
                 ("HMTL 3x3 puzzle", base + ["--task", "puzzle", "--flag", "3", "--grid", "3"], "ablation"),
                 ("HMTL, flag 2", base + ["--task", "puzzle", "--flag", "2", "--grid", "2"], "ablation"),
                 ("HMTL, flag 4", base + ["--task", "puzzle", "--flag", "4", "--grid", "2"], "ablation"),
                 ("HMTL, half of each batch puzzled", base + HMTL_2X2 + ["--ss-fraction", "0.5"], "once"),
                 ("SL, 112 px", large, "once"),
                 ("HMTL, 112 px", large + HMTL_2X2, "once")]
    return rows


def slug(flags):
    """A run folder's name: its method flags, readable, then a hash of all its flags."""
    method = {"--task", "--flag", "--grid", "--no-ssh", "--stage", "--init", "--bin-width", "--aug", "--data",
              "--train-subjects", "--synthetic-train", "--ssl-weight", "--ss-fraction", "--img-size", "--flip",
              "--train-every", "--head", "--optimizer", "--dropout", "--no-rectify", "--epochs", "--data-root"}
    valueless = lambda i: i + 1 == len(flags) or flags[i + 1].startswith("--")
    parts = [f.lstrip("-") + ("" if valueless(i) else "=" + Path(flags[i + 1]).name[:20])
             for i, f in enumerate(flags) if f in method]
    return "_".join(parts) + "_" + hashlib.sha1(json.dumps(flags).encode()).hexdigest()[:8]


def settings(cfg):
    """A run's config without where it was written: what decides its result."""
    return {k: v for k, v in cfg.items() if k not in ("out", "workers", "cache", "device")}


def wanted(flags):
    return settings(hmtl.resolve_config(vars(hmtl.get_args_parser().parse_args(flags))))


def finished(flags, folder):
    """The summary of the run in `folder` if it finished with the settings the flags now give, else None."""
    try:
        done = json.loads((folder / "summary.json").read_text())
        made = settings(hmtl.checkpoint_config({"config": done["config"]}))
    except (OSError, ValueError, KeyError, TypeError):  # not there, half-written, or not a summary
        return None
    return done if made == wanted(flags) else None


def run(flags, folder):
    """A finished run's summary, running (or resuming) it first when needed; a reason when it cannot run.
    A run made with other settings than the flags now give (a changed default, say) is run again."""
    done, last = finished(flags, folder), folder / "last.pt"
    if done:
        return done
    resume = last.is_file() and settings(hmtl.load_run(last)[1]) == wanted(flags)
    try:
        return hmtl.main([*flags, "--out", str(folder), "--resume" if resume else "--overwrite"])
    except SystemExit as e:  # a dataset or the ImageNet weights are out of reach, or training failed
        print(f"  not run: {e}")
        return {"skipped": str(e)}


def evaluate_on(folder, name, flags):
    """A finished run's final model on another test set (cached as <name>.json in its folder)."""
    path = folder / f"{name}.json"
    if not path.is_file():
        path.write_text(json.dumps(hmtl.main(["--eval-only", "--checkpoint", str(folder / "last.pt"), *flags])))
    return json.loads(path.read_text())


def mean_std(values):
    """(mean, std, count) of the values given, or None."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return float(np.mean(values)), float(np.std(values)), len(values)


def cell(ms):
    """A table cell: mean ± std, or the value alone where one seed gives no spread."""
    if ms is None:
        return "–"
    return f"{ms[0]:.2f}" if ms[2] == 1 else f"{ms[0]:.2f} ± {ms[1]:.2f}"


def aggregate(summaries, key):
    return mean_std([s.get(key) for s in summaries if "skipped" not in s])


def figure(value):
    return "–" if value is None else f"{value:g}"


def table(name, rows, angles, extra=()):
    """Markdown: per row, ours (mean ± std over seeds) and the paper's figures where it gives them."""
    head = ("| Row | " + " | ".join(f"{a} (ours)" for a in angles) + " | mean (ours) | "
            + " | ".join(f"{a} (paper)" for a in angles) + " | mean (paper) | Δ mean |")
    head += "".join(f" {e} |" for e, _ in extra)
    columns = head.count("|") - 1
    lines = [head, "|" + " --- |" * columns]
    for label, summaries in rows:
        skipped = [s["skipped"] for s in summaries if "skipped" in s]
        if len(skipped) == len(summaries):
            lines.append(f"| {label} | not run: {skipped[0][:90]}… |" + " |" * (columns - 2))
            continue
        ours = [aggregate(summaries, f"val_mae_{a}") for a in angles] + [aggregate(summaries, "val_mae_mean")]
        paper = dict(zip(ANGLES + ("mean",), PAPER.get((name, label), (None,) * 4)))
        delta = f"{ours[-1][0] - paper['mean']:+.2f}" if paper["mean"] is not None and ours[-1] else "–"
        line = (f"| {label} | " + " | ".join(cell(o) for o in ours) + " | "
                + " | ".join(figure(paper[a]) for a in list(angles) + ["mean"]) + f" | {delta} |")
        lines.append(line + "".join(f" {cell(fn(summaries))} |" for _, fn in extra))
    return "\n".join(lines)


def curves(folders):
    """Mean validation MAE per epoch over the seeds of a configuration."""
    per_seed = []
    for folder in folders:
        if (folder / "metrics.csv").is_file():
            with open(folder / "metrics.csv") as f:
                per_seed.append([float(r["val_mae_mean"]) for r in csv.DictReader(f)])
    if not per_seed:
        return None
    length = min(map(len, per_seed))
    return np.mean([c[:length] for c in per_seed], 0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every configuration on tiny synthetic heads: a smoke run")
    p.add_argument("--real", metavar="DIR", help="the real-face benchmark on BIWI, from DIR/BIWI_{train,test}.npz")
    p.add_argument("--ablations", action="store_true", help="--real: also the variants of HMTL")
    p.add_argument("--dev", action="store_true", help="--real: the flip study on the development split")
    p.add_argument("--scarcity", action="store_true", help="--real: where HMTL helps: the recipe study on the "
                   "development split, then SL and HMTL against the training set's size (frames, people) and length")
    p.add_argument("--middle-seeds", type=int,
                   help="--scarcity: seeds of the middle sizes and the people (default: --seeds)")
    p.add_argument("--aflw2000", metavar="DIR", help="--scarcity: also score every final model on these AFLW2000 "
                   "faces (never trained on, never choosing)")
    p.add_argument("--report", action="store_true", help="--scarcity: write the tables and figure from the runs "
                   "that finished; train nothing")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ablation-seeds", type=int, default=2, help="--real --ablations: seeds of each variant")
    p.add_argument("--runs", help="runs folder (runs/paper, runs/paper-quick or runs/biwi)")
    p.add_argument("--out", default="results", help="where the tables and figures go")
    p.add_argument("--plan", type=float, metavar="IMG_PER_S", help="print the projected wall time of the paper's "
                   "runs at this training throughput per GPU, and run nothing")
    p.add_argument("--gpus", type=int, default=8, help="--plan: GPUs of a torchrun run")
    args = p.parse_args()
    if args.plan:
        print(f"{args.seeds} seeds, {args.plan:g} training images/s per GPU\n\n{plan(args.plan, args.seeds, args.gpus)}")
        return
    if args.real:
        return scarcity(args) if args.scarcity else real_faces(args)
    env = {k: os.environ.get(k, "") for k in ("ETHXGAZE_ROOT", "W300LP_ROOT", "AFLW2000_ROOT", "BIWI_NPZ")}
    if not args.quick and not all(env[k] for k in ("ETHXGAZE_ROOT", "W300LP_ROOT", "AFLW2000_ROOT")):
        raise SystemExit("set ETHXGAZE_ROOT, W300LP_ROOT and AFLW2000_ROOT (and optionally BIWI_NPZ), "
                         "or run the smoke test with --quick")
    runs = Path(args.runs or ("runs/paper-quick" if args.quick else "runs/paper"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables, results, folders = configurations(args.quick, env), {}, {}
    total = sum(len(rows) for rows in tables.values()) * args.seeds
    done = 0
    for name, rows in tables.items():
        for label, flags in rows:
            for seed in range(args.seeds):
                done += 1
                folder = runs / slug(flags) / f"seed{seed}"
                pretrained = runs / slug(tables["Table 2"][0][1]) / f"seed{seed}" / "last.pt"
                flags_s = [str(pretrained) if f == "PRETRAINED" else f for f in flags] + ["--seed", str(seed)]
                print(f"[{done}/{total}] {name}: {label}, seed {seed} -> {folder}", flush=True)
                summary = run(flags_s, folder)
                if name == "Table 2" and "val_mae_mean" in summary:
                    extra = [] if args.quick else ["--val-root", env["AFLW2000_ROOT"]]
                    summary["full"] = evaluate_on(folder, "eval_aflw2000_full",
                                                  extra + ["--no-aflw2000-reduced"])["val_mae_mean"]
                    if env["BIWI_NPZ"]:
                        biwi = evaluate_on(folder, "eval_biwi", ["--val-data", "biwi", "--val-root", env["BIWI_NPZ"]])
                        summary["biwi"] = biwi["val_mae_mean"]
                results.setdefault((name, label), []).append(summary)
                folders.setdefault((name, label), []).append(folder)
    write_tables(results, out, args)
    write_figures(results, folders, out, args.quick)


def write_tables(results, out, args):
    rows = lambda table_name: [(label, s) for (t, label), s in results.items() if t == table_name]
    smoke = ("> **SMOKE RUN** (`run_all.sh --quick`): synthetic heads at 32 px, ResNet18, 2 epochs, stand in for "
             "every dataset. It shows the pipeline runs end to end; it is **not** the paper's result.\n\n") if args.quick else ""
    two_angles = ("yaw", "pitch")
    t4 = ["| Training subjects | " + " | ".join(f"{n} (ours)" for n in T4_METHODS) + " | "
          + " | ".join(f"{n} (paper)" for n in T4_METHODS) + " |", "|" + " --- |" * (1 + 2 * len(T4_METHODS))]
    for k in (1, 2, 3, 4):
        ours = [cell(aggregate(results.get(("Table 4", t4_label(n, k)), []), "val_mae_mean")) for n in T4_METHODS]
        paper = [f"{PAPER_SUBJECTS[n][k - 1]:g}" + (" (yaw {:g}, pitch {:g})".format(*PAPER_SUBJECTS_ANGLES[n][k - 1])
                                                   if n in PAPER_SUBJECTS_ANGLES else "") for n in T4_METHODS]
        t4.append(f"| {k} | " + " | ".join(ours) + " | " + " | ".join(paper) + " |")
    full = ("full 2000 (ours)", lambda s: mean_std([x.get("full") for x in s]))
    biwi = ("BIWI (ours)", lambda s: mean_std([x.get("biwi") for x in s]))
    spread = "mean ± std of " if args.seeds > 1 else ""
    text = (f"# Tables ({args.seeds} seed{'s' * (args.seeds > 1)} per row, {spread}the final model's MAE, "
            f"degrees)\n\n{smoke}"
            f"## Table 1: ETH-XGaze, 1 training subject, validation subjects 108, 109, 111\n\n"
            f"{table('Table 1', rows('Table 1'), two_angles if not args.quick else ANGLES)}\n\n"
            f"The paper prints the same figures for puzzle-rotation at flags 2, 3 and 4; they are quoted as printed.\n\n"
            f"## Table 2: trained on 300W-LP, tested on AFLW2000 (1969 reduced; the full 2000 and BIWI "
            f"evaluated with the same final models)\n\n"
            f"{table('Table 2', rows('Table 2')[1:], ANGLES, [full, biwi])}\n\n"
            f"Peers on AFLW2000 (1969): {PEERS}.\n\n"
            f"## Table 3: AFLW2000 reduced, augmentation level 2\n\n{table('Table 3', rows('Table 3'), ANGLES)}\n\n"
            f"## Table 4: ETH-XGaze, 1-4 training subjects (mean MAE)\n\n" + "\n".join(t4) + "\n")
    (out / "tables.md").write_text(text)
    print(f"wrote {out / 'tables.md'}")


def write_figures(results, folders, out, quick):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tag = "\nSMOKE RUN (synthetic heads, tiny): not the paper's result" if quick else ""

    fig, ax = plt.subplots(figsize=(6.4, 4))  # Fig 3: MAE per flag and task
    for task in TASK_NAMES.values():
        stats = [aggregate(results.get(("Table 1", f"HMTL {task} 2x2, flag {f}"), []), "val_mae_mean") for f in (1, 2, 3, 4)]
        if all(stats):
            ax.errorbar([1, 2, 3, 4], [s[0] for s in stats], [s[1] for s in stats], marker="o", capsize=3, label=f"HMTL {task}")
    sl = aggregate(results.get(("Table 1", "SL, 1 subject"), []), "val_mae_mean")
    if sl:
        ax.axhline(sl[0], color="k", ls="--", label="SL")
    ax.set(xlabel="flag point", ylabel="val MAE (°)", xticks=[1, 2, 3, 4], title="Fig 3: ETH-XGaze, 1 subject" + tag)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fig3_flags.png", dpi=100)
    plt.close(fig)

    panels = [("fig4_curves_random_init.png", "Fig 4: SL vs HMTL, random init", ["SL, random init", "HMTL puzzle, flag 3, random init"], "Table 2"),
              ("fig5_curves_pretrained_init.png", "Fig 5: SL vs HMTL, SS-pre-trained init",
               ["SL, SS-pre-trained init", "HMTL puzzle, flag 3, SS-pre-trained init"], "Table 2"),
              ("fig6_curves_table3.png", "Fig 6: Table 3 runs", ["SL, aug level 2", "HMTL 3x3 puzzle w/o SSHs", "HMTL 3x3 puzzle"], "Table 3")]
    for name, title, labels, table_name in panels:  # Figs 4-6: val MAE per epoch
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for label in labels:
            c = curves(folders.get((table_name, label), []))
            if c is not None:
                ax.plot(range(1, len(c) + 1), c, marker="o", label=label)
        ax.set(xlabel="epoch", ylabel="val MAE (°), mean of seeds", title=title + tag)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4))  # Fig 7: MAE vs number of subjects
    for name in T4_METHODS:
        stats = [aggregate(results.get(("Table 4", t4_label(name, k)), []), "val_mae_mean") for k in (1, 2, 3, 4)]
        if all(stats):
            ax.errorbar([1, 2, 3, 4], [s[0] for s in stats], [s[1] for s in stats], marker="o", capsize=3, label=f"{name} (ours)")
    for name, values in PAPER_SUBJECTS.items():
        ax.plot([1, 2, 3, 4], values, ls=":", marker="x", label=f"{name} (paper)")
    ax.set(xlabel="training subjects" + (" (x192 synthetic heads)" if quick else ""), ylabel="val MAE (°)",
           xticks=[1, 2, 3, 4], title="Fig 7: MAE vs training subjects" + tag)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fig7_subjects.png", dpi=100)
    plt.close(fig)
    print(f"wrote {out}/fig3_flags.png, fig4-6 curves, fig7_subjects.png")


# ----------------------------------------------------------------------------- real faces

def real_faces(args):
    """The BIWI benchmark (or its flip study): runs every row, then writes its table and figure."""
    for split in ("devtrain", "devval") if args.dev else ("train", "test"):
        if not (Path(args.real) / f"BIWI_{split}.npz").is_file():
            raise SystemExit(f"--real {args.real}: no BIWI_{split}.npz there; make it with tools/biwi_to_npz.py")
    runs, out = Path(args.runs or "runs/biwi"), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = real_configurations(args.real, args.dev, args.ablations)
    results = []
    seeds = {"main": args.seeds, "ablation": args.ablation_seeds, "once": 1}
    total = sum(seeds[kind] for _, _, kind in rows)
    done = 0
    for label, flags, kind in rows:
        summaries, folders = [], []
        for seed in range(seeds[kind]):
            done += 1
            folder = runs / slug(flags) / f"seed{seed}"
            print(f"[{done}/{total}] BIWI: {label}, seed {seed} -> {folder}", flush=True)
            summaries.append(run(flags + ["--seed", str(seed)], folder))
            folders.append(folder)
        results.append((label, summaries, folders))
    name = "biwi_dev" if args.dev else "biwi"
    text = real_table(results, args)
    (out / f"{name}.md").write_text(text)
    print("\n" + text)
    real_figure(results, out / f"{name}.png", args.dev)
    print(f"wrote {out / name}.md and {out / name}.png")


def real_table(results, args):
    split = ("BIWI development split: trained on sequences 01-12, tested on 13-16" if args.dev else
             "BIWI: trained on sequences 01-16, tested on 17-24")
    lines = [f"# {split}", "",
             "ResNet18, 64 px and horizontal flips with p = 0.5 (unless stated), 12 epochs, lr x0.1 after epoch 10, "
             "batch 64, catreg heads (3° bins, α = 2), augmentation level 1, AdaBelief (rectified); MAE of the final model in degrees, mean ± std "
             "over seeds (the mean alone for one seed); vs SL: the mean's change against the nearest SL row above.", "",
             "| Row | seeds | yaw | pitch | roll | mean | per seed | vs SL |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    sl = None
    for label, summaries, _ in results:
        done = [s for s in summaries if "val_mae_mean" in s]
        if not done:
            lines.append(f"| {label} | 0 | not run | | | | | |")
            continue
        means = [s["val_mae_mean"] for s in done]
        if label.startswith("SL"):
            sl = float(np.mean(means))
        versus = f"{(np.mean(means) / sl - 1) * 100:+.0f}%" if sl and not label.startswith("SL") else "–"
        lines.append(f"| {label} | {len(done)} | " + " | ".join(cell(aggregate(done, f"val_mae_{a}")) for a in ANGLES)
                     + f" | **{cell(mean_std(means))}** | {', '.join(f'{m:.2f}' for m in means)} | {versus} |")
    return "\n".join(lines) + "\n"


def real_figure(results, path, dev):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (bars, epochs) = plt.subplots(1, 2, figsize=(12, 0.45 * len(results) + 2.5),
                                       gridspec_kw={"width_ratios": [1.3, 1]})
    labels = [label for label, _, _ in results][::-1]
    for y, (label, summaries, _) in enumerate(results[::-1]):
        means = [s["val_mae_mean"] for s in summaries if "val_mae_mean" in s]
        if means:
            colour = "tab:grey" if label.startswith("SL") else "tab:orange" if "w/o" in label else "tab:blue"
            bars.barh(y, np.mean(means), xerr=np.std(means), color=colour, alpha=0.6, capsize=3)
            bars.plot(means, [y] * len(means), "k.", ms=5)
    sl = [np.mean([s["val_mae_mean"] for s in r[1] if "val_mae_mean" in s]) for r in results if r[0].startswith("SL")]
    if sl:
        bars.axvline(sl[0], color="k", ls="--", lw=1, label="SL")
    bars.set(yticks=range(len(labels)), yticklabels=labels, xlabel="MAE of the final model (°), mean ± std, dots: seeds",
             title="BIWI " + ("development split (seq. 13-16)" if dev else "test sequences 17-24"))
    for label, _, folders in results[:4 if dev else 3]:
        c = curves(folders)
        if c is not None:
            epochs.plot(range(1, len(c) + 1), c, marker="o", label=label)
    epochs.set(xlabel="epoch", ylabel="MAE (°), mean of seeds", title="per epoch (never used to choose)")
    epochs.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)



# ----------------------------------------------------------------------------- where does HMTL help?
# BIWI again, the training set's size varied by frames (every k-th frame of all 16 people, from a
# seeded offset) and by people (sequences 01-04, 01-08), and its length tripled. Every run takes the
# same number of optimiser steps, so that a small set is not also a short run: 2,000 steps of 64
# (lr x0.1 after 1,500), the test set scored every 500. The recipe is chosen on the development
# split (01-12 -> 13-16) only.
STUDY = ["--data", "biwi", "--arch", "resnet18", "--img-size", "64", "--workers", "0", "--epoch-steps", "500",
         "--epochs", "4", "--milestones", "3"]
LONG = ["--epochs", "12", "--milestones", "9"]  # 6,000 steps
METHODS = {"SL": [], "HMTL": HMTL_2X2, "HMTL w/o SSHs": HMTL_2X2 + ["--no-ssh"]}
FRAMES = (256, 32, 4, 1)
ENDS = (FRAMES[0], FRAMES[-1])  # SL vs HMTL here first; these and the length row get every seed, the rest may be cut
PEOPLE = (4, 8)
RECIPE_STUDY = {"paper's settings": [], "no rectification": ["--no-rectify"], "reg heads": ["--head", "reg"],
                "translation crops": ["--aug", "shift"], "Dropout 0.4": ["--dropout", "0.4"],
                "AdamW": ["--optimizer", "adamw"], "--recipe strong (what helped, together)": ["--recipe", "strong"]}
RECIPES = {"paper": [], "strong": ["--recipe", "strong"]}


def study_runs(folder, args):
    """[(group, size, recipe, method, flags, seeds)] of the study; study_order gives the order they run."""
    data = lambda train, test: STUDY + ["--data-root", str(Path(folder) / f"BIWI_{train}.npz"),
                                        "--val-data", "biwi", "--val-root", str(Path(folder) / f"BIWI_{test}.npz")]
    middle = args.middle_seeds or args.seeds
    rows = [("recipe", name, "dev", "SL", data("devtrain", "devval") + flags, args.ablation_seeds)
            for name, flags in RECIPE_STUDY.items()]
    frames = [(k, recipe, m) for k in FRAMES for recipe in (RECIPES if k in ENDS else ["paper"]) for m in METHODS]
    for k, recipe, method in frames:
        rows.append(("frames", k, recipe, method, data("train", "test") + RECIPES[recipe] + METHODS[method] +
                     ["--train-every", str(k)], args.seeds if k in ENDS else middle))
    for method, flags in METHODS.items():
        rows.append(("long", 3, "paper", method, data("train", "test") + flags + LONG, args.seeds))
    for people in PEOPLE:
        for method, flags in METHODS.items():
            rows.append(("people", people, "paper", method, data(f"p{people}", "test") + flags, middle))
    return rows


def study_order(rows):
    """[(row index, seed)] in the order they run: within each stage (the recipe; SL vs HMTL at the ends of the frames
    axis; SL vs HMTL elsewhere; HMTL w/o SSHs) every row gets seed 0 before any gets seed 1, so a study cut short
    has each of its comparisons started before the ablation."""
    ends = lambda group, size: group == "frames" and size in ENDS
    stage = lambda group, size, recipe, method, *_: (0 if group == "recipe" else 3 if method == "HMTL w/o SSHs"
                                                      else 1 if ends(group, size) else 2)
    return [(i, seed) for *_, seed, i in sorted((stage(*row), seed, i) for i, row in enumerate(rows)
                                               for seed in range(row[-1]))]


def scarcity(args):
    """Runs the study (or, with --report, only reads what finished), then writes results/scarcity.md and .png."""
    needed = ["train", "test", "devtrain", "devval"] + [f"p{p}" for p in PEOPLE]
    missing = [n for n in needed if not (Path(args.real) / f"BIWI_{n}.npz").is_file()]
    if missing:
        raise SystemExit(f"--real {args.real}: no {', '.join(f'BIWI_{n}.npz' for n in missing)} there; make them with "
                         f"tools/biwi_to_npz.py ... --splits train=1-16 test=17-24 devtrain=1-12 devval=13-16 "
                         f"p4=1-4 p8=1-8")
    runs, out = Path(args.runs or "runs/scarcity"), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = study_runs(args.real, args)
    summaries = [[None] * row[-1] for row in rows]
    order = study_order(rows)
    for done, (i, seed) in enumerate(order, 1):
        group, size, recipe, method, flags, _ = rows[i]
        folder = runs / slug(flags) / f"seed{seed}"
        if args.report:
            summary = finished(flags + ["--seed", str(seed)], folder) or {"skipped": "not run yet"}
        else:
            print(f"[{done}/{len(order)}] {group} {size}, {recipe}, {method}, seed {seed} -> {folder}", flush=True)
            summary = run(flags + ["--seed", str(seed)], folder)
        if args.aflw2000 and "val_mae_mean" in summary:
            aflw = evaluate_on(folder, "eval_aflw2000", [
                "--val-data", "aflw2000", "--val-root", args.aflw2000, "--aflw2000-reduced", "--crop", "visible"])
            summary |= {"aflw2000": aflw["val_mae_mean"], "aflw2000_se": aflw.get("val_mae_mean_se"),
                        "aflw2000_faces": aflw["val_images"]}
        summaries[i][seed] = summary
    results = [(*row[:4], runs_of_row) for row, runs_of_row in zip(rows, summaries)]
    text = scarcity_tables(results, args)
    (out / "scarcity.md").write_text(text)
    print("\n" + text)
    scarcity_figure(results, out / "scarcity.png")
    print(f"wrote {out / 'scarcity.md'} and {out / 'scarcity.png'}")


def pitch_offsets(folder):
    """Mean pitch of each training sequence of BIWI_train.npz: largely a per-person zero of the labels."""
    with np.load(Path(folder) / "BIWI_train.npz") as d:
        sequences = np.array([int(str(n)[:2]) for n in d["names"]])
        return {q: float(d["pose"][sequences == q, 1].mean()) for q in sorted(set(sequences))}


def scarcity_tables(results, args):
    done = lambda summaries: [s for s in summaries if "val_mae_mean" in s]
    mean = lambda summaries, key="val_mae_mean": mean_std([s.get(key) for s in done(summaries)])
    found = {(g, size, recipe, method): summaries for g, size, recipe, method, summaries in results}
    lines = ["# Where does HMTL help? BIWI, ResNet18 at 64 px, 2,000 steps of 64 per run", "",
             "Every run: 2,000 optimiser steps of 64 images (lr x0.1 after 1,500), catreg heads, w = 50, "
             "augmentation level 1, flips, and the paper's AdaBelief (rectified) and Dropout 0.5, or under "
             f"--recipe strong {', '.join(f'{k} {v}' for k, v in hmtl.STRONG.items())}; MAE of the final model in "
             "degrees, mean ± std over the seeds (n: seeds finished). Choices were made on the development split "
             "(01-12 -> 13-16) only.", "",
             "## The recipe (development split, SL)", "", "| recipe | n | yaw | pitch | roll | mean | vs paper's |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    base = mean(found.get(("recipe", "paper's settings", "dev", "SL"), []))
    for name in RECIPE_STUDY:
        s = found[("recipe", name, "dev", "SL")]
        m = mean(s)
        versus = f"{(m[0] / base[0] - 1) * 100:+.0f}%" if m and base and name != "paper's settings" else "–"
        lines.append(f"| {name} | {len(done(s))} | " + " | ".join(cell(mean(s, f"val_mae_{a}")) for a in ANGLES)
                     + f" | **{cell(m)}** | {versus} |")
    cross = " | AFLW2000 sample (95): SL | HMTL" if args.aflw2000 else ""
    for group, title, sizes in (("frames", "Frames: every k-th frame of sequences 01-16 -> 17-24", FRAMES),
                                ("people", "People: sequences 01-04 and 01-08 -> 17-24", PEOPLE),
                                ("long", "Length: all frames, 6,000 steps", (3,))):
        lines += ["", f"## {title}", "", "| recipe | size | training faces | SL | HMTL | HMTL w/o SSHs | HMTL vs SL"
                  " | predicting the training mean" + cross + " |", "| --- " * (8 + 2 * bool(args.aflw2000)) + "|"]
        for recipe in RECIPES:
            for size in sizes:
                cells = [found.get((group, size, recipe, m)) for m in METHODS]
                if cells[0] is None:
                    continue
                faces = {done(c)[0]["train_images"] for c in cells if done(c)}
                sl, hm = mean(cells[0]), mean(cells[1])
                gap = f"{(hm[0] / sl[0] - 1) * 100:+.0f}%" if sl and hm else "–"
                row = (f"| {recipe} | {size} | {', '.join(map(str, sorted(faces))) or '–'} | " +
                       " | ".join(f"{cell(mean(c))} (n {len(done(c))})" for c in cells) + f" | {gap} | "
                       f"{cell(mean(cells[0], 'baseline_mae_mean'))} |")
                if args.aflw2000:
                    row += "".join(f" {cell(mean(c, 'aflw2000'))} |" for c in cells[:2])
                lines.append(row)
        if group == "people":  # few people cannot teach another's zero of pitch
            sl, hm = ([found[(group, p, "paper", m)] for p in PEOPLE] for m in ("SL", "HMTL"))
            lines += ["", "Pitch MAE (°): " + "; ".join(
                f"{p} people: SL {cell(mean(a, 'val_mae_pitch'))}, HMTL {cell(mean(b, 'val_mae_pitch'))}, the "
                f"training mean {cell(mean(a, 'baseline_mae_pitch'))}" for p, a, b in zip(PEOPLE, sl, hm)) + "."]
    se = [s["aflw2000_se"] for *_, summaries in results for s in summaries if s.get("aflw2000_se") is not None]
    if se:
        faces = {s["aflw2000_faces"] for *_, summaries in results for s in summaries if "aflw2000_faces" in s}
        lines += ["", f"The AFLW2000 sample is small: one model's MAE on its {', '.join(map(str, faces))} faces has a "
                  f"standard error over the faces of {min(se):.2f}-{max(se):.2f}° (median {np.median(se):.2f}°)."]
    offsets = pitch_offsets(args.real)
    lines += ["", "Mean pitch of each training sequence (°): " +
              ", ".join(f"{q:02d}: {v:+.1f}" for q, v in offsets.items()) + "."]
    return "\n".join(lines) + "\n"


def scarcity_figure(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, panels = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, group, xlabel in ((panels[0], "frames", "training faces (every k-th frame of 16 people)"),
                              (panels[1], "people", "training people (sequences)")):
        for (recipe, method), colour in zip([(r, m) for r in RECIPES for m in METHODS], plt.cm.tab10.colors):
            points = []
            for g, size, rec, meth, summaries in results:
                finished = [s for s in summaries if "val_mae_mean" in s]
                if rec == recipe and meth == method and finished and (g == group or (g, group) == ("frames", "people")
                                                                      and size == 1):
                    x = finished[0]["train_images"] if group == "frames" else (16 if g == "frames" else size)
                    values = [s["val_mae_mean"] for s in finished]
                    points.append((x, np.mean(values), np.std(values), finished[0].get("baseline_mae_mean", np.nan)))
            if points:
                x, m, sd, baseline = map(np.array, zip(*sorted(points)))
                ls = "-" if recipe == "paper" else "--"
                ax.plot(x, m, ls, marker="o", color=colour, label=f"{method} ({recipe})")
                ax.fill_between(x, m - sd, m + sd, color=colour, alpha=0.15)
                if group == "people" and (recipe, method) == ("paper", "SL"):
                    ax.plot(x, baseline, ":x", color="grey", label="predicting the training mean")
            longer = [(s["train_images"], s["val_mae_mean"]) for g, _, rec, meth, summaries in results
                      for s in summaries if g == "long" and (rec, meth) == (recipe, method) and "val_mae_mean" in s]
            if group == "frames" and longer:
                ax.plot(*np.mean(longer, axis=0, keepdims=True).T, "o", mfc="none", ms=9, color=colour)
        if group == "frames" and any(g == "long" and "val_mae_mean" in s for g, *_, summaries in results
                                     for s in summaries):
            ax.plot([], [], "o", mfc="none", ms=9, color="grey", label="all frames, 6,000 steps")
        ax.set(xscale="log" if group == "frames" else "linear", xlabel=xlabel, ylabel="test MAE (°), final model",
               title="BIWI 17-24, 2,000 steps a run")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
