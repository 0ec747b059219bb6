"""The runner of every study (reproduce.py): a study is data -- rows, each a configuration of hmtl.py
flags run for some seeds -- and one runner makes, resumes, skips and reports them all. Every test-set
figure comes from the final model of a run. The studies: paper.py, biwi.py.
"""
import contextlib
import csv
import json
import re
from collections import namedtuple
from pathlib import Path

import numpy as np

import hmtl

# A row: `key` names it in the report, its runs lie in <runs>/<study>/<folder>/seed<k>, `flags` are
# hmtl.py's ("{runs}" and "{seed}" in them name another row's checkpoint). Rows run by `stage`, each
# stage seed 0 of every row before seed 1, so a study cut short has every comparison started.
# `evaluations`: {name: hmtl.py --eval-only flags}, other test sets its final models are scored on.
Row = namedtuple("Row", "key folder flags seeds stage evaluations", defaults=(0, {}))
# A study: `flags` {flag: argparse keywords} are its own, rows(args) gives its rows, report(results,
# args) writes its tables and figures from results = {row key: [each seed's summary]}.
Study = namedtuple("Study", "name help flags rows report")


# ----------------------------------------------------------------------------- the runner

def settings(cfg):
    """A run's config without where it was written: what decides its result."""
    return {k: v for k, v in cfg.items() if k not in ("out", "workers", "cache", "device")}


def finished(flags, folder):
    """The summary of the run in `folder` if it finished with the settings the flags now give, else None."""
    try:
        done = json.loads((folder / "summary.json").read_text())
        made = settings(hmtl.checkpoint_config({"config": done["config"]}))
    except (OSError, ValueError, KeyError, TypeError):  # not there, half-written, or not a summary
        return None
    return done if made == settings(hmtl.config(flags)) else None


def run(flags, folder):
    """A finished run's summary, running (or resuming) it first when needed; a reason when it cannot run.
    A run made with other settings than the flags now give (a changed default, say) is run again."""
    done, last = finished(flags, folder), folder / "last.pt"
    if done:
        return done
    resume = last.is_file() and settings(hmtl.load_run(last)[1]) == settings(hmtl.config(flags))
    if not resume:
        for stale in folder.glob("eval_*.json"):  # another model's scores
            stale.unlink()
    try:
        return hmtl.main([*flags, "--out", str(folder), "--resume" if resume else "--overwrite"])
    except SystemExit as e:  # a dataset or the ImageNet weights are out of reach, or training failed
        print(f"  not run: {e}")
        return {"skipped": str(e)}


def evaluate_on(folder, name, flags):
    """A finished run's final model on another test set (cached as eval_<name>.json in its folder)."""
    path = folder / f"eval_{name}.json"
    if not path.is_file():
        path.write_text(json.dumps(hmtl.main(["--eval-only", "--checkpoint", str(folder / "last.pt"), *flags])))
    return json.loads(path.read_text())


def order(rows):
    """[(row, seed)] in the order they run: by stage, then seed, then row."""
    return [(rows[i], seed) for _, seed, i in sorted((row.stage, seed, i) for i, row in enumerate(rows)
                                                      for seed in range(row.seeds))]


def run_study(study, args):
    """Runs (or with --report, only reads) every row's seeds, then writes the study's report."""
    rows = study.rows(args)
    results = {row.key: [None] * row.seeds for row in rows}
    runs = order(rows)
    for done, (row, seed) in enumerate(runs, 1):
        folder = Path(args.runs) / study.name / row.folder / f"seed{seed}"
        flags = [f.format(runs=args.runs, seed=seed) for f in row.flags] + ["--seed", str(seed)]
        if args.report:
            summary = finished(flags, folder) or {"skipped": "not run yet"}
        else:
            print(f"[{done}/{len(runs)}] {study.name}: {', '.join(map(str, row.key))}, seed {seed} -> {folder}",
                  flush=True)
            summary = run(flags, folder)
        if "skipped" not in summary:
            summary |= {name: evaluate_on(folder, name, more) for name, more in row.evaluations.items()}
        results[row.key][seed] = summary | {"folder": folder}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    study.report(results, args)


# ----------------------------------------------------------------------------- reports

def scored(summaries):
    """The summaries of the runs that finished and were scored."""
    return [s for s in summaries if s and "val_mae_mean" in s]


def stat(summaries, key="val_mae_mean"):
    """(mean, std, count) of a metric over the finished runs, or None; "name.metric": an evaluation's metric."""
    name, _, metric = key.rpartition(".")
    values = [v for s in scored(summaries) if (v := (s.get(name, {}) if name else s).get(metric)) is not None]
    return (float(np.mean(values)), float(np.std(values)), len(values)) if values else None


def cell(ms):
    """A table cell: mean ± std, or the value alone where one seed gives no spread."""
    return "–" if ms is None else f"{ms[0]:.2f}" if ms[2] == 1 else f"{ms[0]:.2f} ± {ms[1]:.2f}"


def markdown(header, rows):
    """A Markdown table: a header row, then rows, each a list of cells."""
    return "\n".join("| " + " | ".join(map(str, cells)) + " |" for cells in [header, ["---"] * len(header), *rows])


def plot_curves(ax, results, keys):
    """Each row's validation MAE per epoch, the mean over its runs (labelled by the key's last part)."""
    for key in keys:
        per_seed = []
        for s in results.get(key, []):
            if s and (Path(s["folder"]) / "metrics.csv").is_file():
                with open(Path(s["folder"]) / "metrics.csv") as f:
                    per_seed.append([float(r["val_mae_mean"]) for r in csv.DictReader(f)])
        if per_seed:
            length = min(map(len, per_seed))
            ax.plot(range(1, length + 1), np.mean([c[:length] for c in per_seed], 0), marker="o", label=key[-1])


def plot_errorbars(ax, results, xs, keys, label):
    """Mean ± std of the final MAE of the rows `keys` at `xs`, where every one has finished."""
    stats = [stat(results.get(key, [])) for key in keys]
    if all(stats):
        ax.errorbar(xs, [s[0] for s in stats], [s[1] for s in stats], marker="o", capsize=3, label=label)


@contextlib.contextmanager
def figure(path, *grid, **kw):
    """Yields matplotlib axes (plt.subplots(*grid, **kw)); the figure is saved to `path` and closed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(*grid, **kw)
    try:
        yield axes
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        print(f"wrote {path}")
    finally:
        plt.close(fig)


def slug(text):
    """A folder name for a row label: 'HMTL, w = 10' -> 'hmtl-w-10'."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def write(path, text):
    Path(path).write_text(text)
    print(f"\n{text}\nwrote {path}")
