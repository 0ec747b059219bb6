"""The studies on real faces, BIWI (DIR/BIWI_<split>.npz from tools/biwi_to_npz.py), sized for a CPU:
biwi, the benchmark (01-16 -> 17-24: SL, HMTL and HMTL w/o SSHs; --ablations its variants, --dev
the flip study on the development split, 01-12 -> 13-16), and scarcity, where HMTL helps.
"""
from pathlib import Path

import numpy as np

import hmtl
from hmtl_data import ANGLES
from studies import Row, Study, cell, figure, markdown, plot_curves, scored, slug, stat, write

HMTL_2X2 = ["--task", "puzzle", "--flag", "3", "--grid", "2"]


def splits(folder, *names):
    """The BIWI flags of a training and a test split in `folder`, which must hold every split named."""
    missing = [n for n in names if not (Path(folder) / f"BIWI_{n}.npz").is_file()]
    if missing:
        raise SystemExit(f"{folder}: no {', '.join(f'BIWI_{n}.npz' for n in missing)} there; make "
                         f"{'it' if len(missing) == 1 else 'them'} with tools/biwi_to_npz.py (README)")
    return lambda train, test: ["--data-root", str(Path(folder) / f"BIWI_{train}.npz"), "--val-data", "biwi",
                                "--val-root", str(Path(folder) / f"BIWI_{test}.npz")]


# ----------------------------------------------------------------------------- the benchmark
# A run ~7 min at 64 px where bf16 is native. The schedule and every setting were fixed before any
# run; the flip probability (hmtl's default) was chosen on the development split (--dev), never on
# the test sequences.
REAL = ["--data", "biwi", "--arch", "resnet18", "--epochs", "12", "--milestones", "10", "--workers", "0"]
REAL_FLIP = "0.5"


def benchmark_rows(args):
    """The three main rows (--seeds each), the variants (--ablation-seeds; the last three one seed, what a
    2-core CPU had time for), or the flip study."""
    if args.dev:
        data = REAL + splits(args.real, "devtrain", "devval")("devtrain", "devval") + ["--img-size", "64"]
        return [Row((f"{name}, flip {p}",), f"dev/{slug(name)}-flip-{p}", data + ["--flip", p] + flags, args.seeds)
                for p in ("0", "0.5") for name, flags in (("SL", []), ("HMTL 2x2 puzzle, flag 3", HMTL_2X2))]
    data = REAL + splits(args.real, "train", "test")("train", "test") + ["--flip", REAL_FLIP]
    base, large = data + ["--img-size", "64"], data + ["--img-size", "112"]
    rows = [("SL", base, args.seeds), ("HMTL 2x2 puzzle, flag 3, w = 50", base + HMTL_2X2, args.seeds),
            ("HMTL 2x2 puzzle w/o SSHs", base + HMTL_2X2 + ["--no-ssh"], args.seeds)]
    if args.ablations:
        rows += [("HMTL, w = 10", base + HMTL_2X2 + ["--ssl-weight", "10"], args.ablation_seeds),
                 ("HMTL, w = 1", base + HMTL_2X2 + ["--ssl-weight", "1"], args.ablation_seeds),
                 ("HMTL 3x3 puzzle", base + ["--task", "puzzle", "--flag", "3", "--grid", "3"], args.ablation_seeds),
                 ("HMTL, flag 2", base + ["--task", "puzzle", "--flag", "2", "--grid", "2"], args.ablation_seeds),
                 ("HMTL, flag 4", base + ["--task", "puzzle", "--flag", "4", "--grid", "2"], args.ablation_seeds),
                 ("HMTL, half of each batch puzzled", base + HMTL_2X2 + ["--ss-fraction", "0.5"], 1),
                 ("SL, 112 px", large, 1), ("HMTL, 112 px", large + HMTL_2X2, 1)]
    return [Row((label,), slug(label), flags, seeds) for label, flags, seeds in rows]


def benchmark_report(results, args):
    name = "biwi_dev" if args.dev else "biwi"
    means = {key: [s["val_mae_mean"] for s in scored(summaries)] for key, summaries in results.items()}
    lines, sl = [], None
    for (label,), summaries in results.items():
        m = means[(label,)]
        sl = float(np.mean(m)) if m and label.startswith("SL") else sl
        versus = f"{(np.mean(m) / sl - 1) * 100:+.0f}%" if m and sl and not label.startswith("SL") else "–"
        lines.append([label, len(m), *[cell(stat(summaries, f"val_mae_{a}")) for a in ANGLES],
                      f"**{cell(stat(summaries))}**", ", ".join(f"{v:.2f}" for v in m), versus] if m else
                     [label, 0, "not run", "", "", "", "", ""])
    split = "development split: trained on sequences 01-12, tested on 13-16" if args.dev else \
        "trained on sequences 01-16, tested on 17-24"
    write(Path(args.out) / f"{name}.md", f"# BIWI {split}\n\n"
          "ResNet18, 64 px and horizontal flips with p = 0.5 (unless stated), 12 epochs, lr x0.1 after epoch 10, "
          "batch 64, catreg heads (3° bins, α = 2), augmentation level 1, AdaBelief (rectified); MAE of the final "
          "model in degrees, mean ± std over seeds (the mean alone for one seed); vs SL: the mean's change against "
          "the nearest SL row above.\n\n" +
          markdown(["Row", "seeds", "yaw", "pitch", "roll", "mean", "per seed", "vs SL"], lines) + "\n")
    with figure(Path(args.out) / f"{name}.png", 1, 2, figsize=(12, 0.45 * len(results) + 2.5),
                gridspec_kw={"width_ratios": [1.3, 1]}) as (bars, epochs):
        labels = [label for (label,) in results][::-1]
        for y, label in enumerate(labels):
            if means[(label,)]:
                colour = "tab:grey" if label.startswith("SL") else "tab:orange" if "w/o" in label else "tab:blue"
                bars.barh(y, np.mean(means[(label,)]), xerr=np.std(means[(label,)]), color=colour, alpha=0.6,
                          capsize=3)
                bars.plot(means[(label,)], [y] * len(means[(label,)]), "k.", ms=5)
        for m in [m for (label,), m in means.items() if label.startswith("SL") and m][:1]:
            bars.axvline(np.mean(m), color="k", ls="--", lw=1, label="SL")
        bars.set(yticks=range(len(labels)), yticklabels=labels, xlabel="MAE of the final model (°), mean ± std, dots: "
                 "seeds", title="BIWI " + ("development split (seq. 13-16)" if args.dev else "test sequences 17-24"))
        plot_curves(epochs, results, list(results)[:4 if args.dev else 3])
        epochs.set(xlabel="epoch", ylabel="MAE (°), mean of seeds", title="per epoch (never used to choose)")
        epochs.legend(fontsize=8)


BENCHMARK = Study("biwi", "the BIWI benchmark: SL, HMTL and HMTL w/o SSHs (and variants), 01-16 -> 17-24", {
    "real": dict(metavar="DIR", help="the folder of BIWI_train.npz and BIWI_test.npz"),
    "--ablations": dict(action="store_true", help="also the variants of HMTL"),
    "--dev": dict(action="store_true", help="the flip study on the development split instead"),
    "--ablation-seeds": dict(type=int, default=2, help="--ablations: seeds of each variant")},
    benchmark_rows, benchmark_report)


# ----------------------------------------------------------------------------- where does HMTL help?
# The training set varied by frames (every k-th frame of all 16 people, from a seeded offset) and by
# people (sequences 01-04, 01-08), and its length tripled. Every run takes the same optimiser steps,
# so that a small set is not also a short run: 2,000 of 64 (lr x0.1 after 1,500), the test set
# scored every 500. The recipe is chosen on the development split only.

STUDY = ["--data", "biwi", "--arch", "resnet18", "--img-size", "64", "--workers", "0", "--epoch-steps", "500",
         "--epochs", "4", "--milestones", "3"]
LONG = ["--epochs", "12", "--milestones", "9"]  # 6,000 steps
METHODS = {"SL": ("sl", []), "HMTL": ("hmtl", HMTL_2X2), "HMTL w/o SSHs": ("hmtl-no-ssh", HMTL_2X2 + ["--no-ssh"])}
FRAMES = (256, 32, 4, 1)
ENDS = (FRAMES[0], FRAMES[-1])  # SL vs HMTL here first; these and the length row get every seed, the rest may be cut
PEOPLE = (4, 8)
RECIPE_STUDY = {"paper's settings": ("paper", []), "no rectification": ("no-rectify", ["--no-rectify"]),
                "reg heads": ("reg-heads", ["--head", "reg"]), "translation crops": ("shift", ["--aug", "shift"]),
                "Dropout 0.4": ("dropout-0.4", ["--dropout", "0.4"]), "AdamW": ("adamw", ["--optimizer", "adamw"]),
                "--recipe strong (what helped, together)": ("strong", ["--recipe", "strong"])}
RECIPES = {"paper": [], "strong": ["--recipe", "strong"]}
GROUPS = {"frames": lambda k: "frames-all" if k == 1 else f"frames-1of{k}", "long": lambda _: "steps-6000",
          "people": lambda p: f"people-{p}"}


def scarcity_rows(args):
    """Stages: the recipe (development split); SL vs HMTL at the ends of the frames axis; SL vs HMTL
    elsewhere; HMTL w/o SSHs. --middle-seeds cuts the middle sizes and the people, never the ends or
    the length row."""
    data = splits(args.real, "train", "test", "devtrain", "devval", *[f"p{p}" for p in PEOPLE])
    middle = args.middle_seeds or args.seeds
    aflw = {"aflw2000": ["--val-data", "aflw2000", "--val-root", args.aflw2000, "--aflw2000-reduced", "--crop",
                         "visible"]} if args.aflw2000 else {}
    rows = [Row(("recipe", name, "dev", "SL"), f"recipe/{folder}", STUDY + data("devtrain", "devval") + flags,
                args.ablation_seeds, 0, aflw) for name, (folder, flags) in RECIPE_STUDY.items()]
    cells = [("frames", k, recipe, ["--train-every", str(k)], args.seeds if k in ENDS else middle)
             for k in FRAMES for recipe in (RECIPES if k in ENDS else ["paper"])]
    cells += [("long", 3, "paper", LONG, args.seeds)] + [("people", p, "paper", [], middle) for p in PEOPLE]
    for group, size, recipe, more, seeds in cells:
        train = f"p{size}" if group == "people" else "train"
        for method, (folder, flags) in METHODS.items():
            stage = 3 if method == "HMTL w/o SSHs" else 1 if group == "frames" and size in ENDS else 2
            rows.append(Row((group, size, recipe, method), f"{GROUPS[group](size)}/{folder}-{recipe}",
                            STUDY + data(train, "test") + RECIPES[recipe] + flags + more, seeds, stage, aflw))
    return rows


def pitch_offsets(folder):
    """Mean pitch of each training sequence of BIWI_train.npz: largely a per-person zero of the labels."""
    with np.load(Path(folder) / "BIWI_train.npz") as d:
        sequences = np.array([int(str(n)[:2]) for n in d["names"]])
        return {q: float(d["pose"][sequences == q, 1].mean()) for q in sorted(set(sequences))}


def scarcity_report(results, args):
    cross = ["AFLW2000 sample (95): SL", "HMTL"] if args.aflw2000 else []
    text = ["# Where does HMTL help? BIWI, ResNet18 at 64 px, 2,000 steps of 64 per run", "",
            "Every run: 2,000 optimiser steps of 64 images (lr x0.1 after 1,500), catreg heads, w = 50, "
            "augmentation level 1, flips, and the paper's AdaBelief (rectified) and Dropout 0.5, or under "
            f"--recipe strong {', '.join(f'{k} {v}' for k, v in hmtl.STRONG.items())}; MAE of the final model in "
            "degrees, mean ± std over the seeds (n: seeds finished). Choices were made on the development split "
            "(01-12 -> 13-16) only.", "", "## The recipe (development split, SL)", ""]
    base, lines = stat(results[("recipe", "paper's settings", "dev", "SL")]), []
    for name in RECIPE_STUDY:
        s = results[("recipe", name, "dev", "SL")]
        m = stat(s)
        versus = f"{(m[0] / base[0] - 1) * 100:+.0f}%" if m and base and name != "paper's settings" else "–"
        lines.append([name, len(scored(s)), *[cell(stat(s, f"val_mae_{a}")) for a in ANGLES], f"**{cell(m)}**", versus])
    text.append(markdown(["recipe", "n", "yaw", "pitch", "roll", "mean", "vs paper's"], lines))
    for group, title, sizes in (("frames", "Frames: every k-th frame of sequences 01-16 -> 17-24", FRAMES),
                                ("people", "People: sequences 01-04 and 01-08 -> 17-24", PEOPLE),
                                ("long", "Length: all frames, 6,000 steps", (3,))):
        lines = []
        for recipe in RECIPES:
            for size in sizes:
                cells = [results.get((group, size, recipe, m)) for m in METHODS]
                if cells[0] is None:
                    continue
                faces = {scored(c)[0]["train_images"] for c in cells if scored(c)}
                sl, hm = stat(cells[0]), stat(cells[1])
                gap = f"{(hm[0] / sl[0] - 1) * 100:+.0f}%" if sl and hm else "–"
                lines.append([recipe, size, ", ".join(map(str, sorted(faces))) or "–",
                              *[f"{cell(stat(c))} (n {len(scored(c))})" for c in cells], gap,
                              cell(stat(cells[0], "baseline_mae_mean")),
                              *([cell(stat(c, "aflw2000.val_mae_mean")) for c in cells[:2]] if cross else [])])
        text += ["", f"## {title}", "", markdown(["recipe", "size", "training faces", *METHODS, "HMTL vs SL",
                                                  "predicting the training mean", *cross], lines)]
        if group == "people":  # few people cannot teach another's zero of pitch
            sl, hm = ([results[(group, p, "paper", m)] for p in PEOPLE] for m in ("SL", "HMTL"))
            text += ["", "Pitch MAE (°): " + "; ".join(
                f"{p} people: SL {cell(stat(a, 'val_mae_pitch'))}, HMTL {cell(stat(b, 'val_mae_pitch'))}, the "
                f"training mean {cell(stat(a, 'baseline_mae_pitch'))}" for p, a, b in zip(PEOPLE, sl, hm)) + "."]
    evaluated = [s["aflw2000"] for summaries in results.values() for s in scored(summaries) if "aflw2000" in s]
    if evaluated:
        se = [e["val_mae_mean_se"] for e in evaluated]
        faces = ", ".join(map(str, sorted({e["val_images"] for e in evaluated})))
        text += ["", f"The AFLW2000 sample is small: one model's MAE on its {faces} faces has a standard error over "
                 f"the faces of {min(se):.2f}-{max(se):.2f}° (median {np.median(se):.2f}°)."]
    text += ["", "Mean pitch of each training sequence (°): " +
             ", ".join(f"{q:02d}: {v:+.1f}" for q, v in pitch_offsets(args.real).items()) + "."]
    write(Path(args.out) / "scarcity.md", "\n".join(text) + "\n")
    scarcity_figure(results, Path(args.out) / "scarcity.png")


# Each panel's label and points (x, row): x the training faces (read from the runs) or people; all
# frames of the 16 people is the people panel's last point.
PANELS = {"frames": ("training faces (every k-th frame of 16 people)", [(None, ("frames", k)) for k in FRAMES]),
          "people": ("training people (sequences)", [(p, ("people", p)) for p in PEOPLE] + [(16, ("frames", 1))])}


def scarcity_figure(results, path):
    import matplotlib.pyplot as plt
    with figure(path, 1, 2, figsize=(12, 4.2)) as panels:
        for ax, (group, (xlabel, points)) in zip(panels, PANELS.items()):
            for (recipe, method), colour in zip([(r, m) for r in RECIPES for m in METHODS], plt.cm.tab10.colors):
                runs = [(x, scored(results.get((*where, recipe, method), []))) for x, where in points]
                line = sorted((x or s[0]["train_images"], *stat(s)[:2], s[0]["baseline_mae_mean"]) for x, s in runs if s)
                if line:
                    x, m, sd, baseline = map(np.array, zip(*line))
                    ax.plot(x, m, "-" if recipe == "paper" else "--", marker="o", color=colour,
                            label=f"{method} ({recipe})")
                    ax.fill_between(x, m - sd, m + sd, color=colour, alpha=0.15)
                    if group == "people" and (recipe, method) == ("paper", "SL"):
                        ax.plot(x, baseline, ":x", color="grey", label="predicting the training mean")
                longer = scored(results.get(("long", 3, recipe, method), []))
                if group == "frames" and longer:
                    ax.plot(longer[0]["train_images"], stat(longer)[0], "o", mfc="none", ms=9, color=colour)
            if group == "frames" and any(scored(s) for k, s in results.items() if k[0] == "long"):
                ax.plot([], [], "o", mfc="none", ms=9, color="grey", label="all frames, 6,000 steps")
            ax.set(xscale="log" if group == "frames" else "linear", xlabel=xlabel, ylabel="test MAE (°), final model",
                   title="BIWI 17-24, 2,000 steps a run")
            ax.legend(fontsize=8)


SCARCITY = Study("scarcity", "where HMTL helps: BIWI's training set varied by frames and people, and a run three "
                 "times as long", {
    "real": dict(metavar="DIR", help="the folder of BIWI_{train,test,devtrain,devval,p4,p8}.npz"),
    "--middle-seeds": dict(type=int, help="seeds of the middle sizes and the people (default: --seeds; the ends of "
                           "the frames axis and the length row get --seeds)"),
    "--ablation-seeds": dict(type=int, default=2, help="seeds of the recipe study"),
    "--aflw2000": dict(metavar="DIR", help="also score every final model on these AFLW2000 faces (never trained on, "
                       "never choosing)")}, scarcity_rows, scarcity_report)
