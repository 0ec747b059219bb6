"""The checks of hmtl.py's command line: every bad flag value or combination is refused in one line
(exit status 2, as argparse does) before any work, naming the flag and what it must be."""
import argparse
import math

ACTIONS = ("eval_only", "predict", "export", "preview", "resume")


class UsageError(SystemExit):
    """A bad flag or flag combination: exit status 2 and one line, printed by hmtl.main()."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def bounded(kind, low=None, high=None, *, above=None, below=None):
    """An argparse type: a number of `kind` in the interval the bounds give (low/high inclusive,
    above/below exclusive)."""
    lower = f"≥ {low}" if low is not None else f"> {above}" if above is not None else None
    upper = f"≤ {high}" if high is not None else f"< {below}" if below is not None else None
    what = f"{'an integer' if kind is int else 'a number'} {' and '.join(b for b in (lower, upper) if b)}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not (math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high)
                and (above is None or value > above) and (below is None or value < below)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


def subject_list(text):
    """ETH-XGaze subjects: a count k, or a comma list '0,3,5' (one subject: '5,')."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts or not all(p.strip().isdigit() for p in parts) or ("," not in text and int(text) < 1):
        raise argparse.ArgumentTypeError(f"must be a count k ≥ 1 or subject numbers like 0,3,5; got {text!r}")
    return text


def help_default(key, presets):
    """A flag's default as --help shows it, read from the presets (hmtl.PRESETS)."""
    def text(v):
        if isinstance(v, list):
            return " ".join(map(str, v))
        if isinstance(v, bool) or v is None:
            return {True: "on", False: "off", None: "none"}[v]
        return f"{v:g}" if isinstance(v, (int, float)) else str(v)
    if key in presets["300wlp"]:
        parts = [f"300W-LP/AFLW2000/BIWI {text(presets['300wlp'][key])}, ETH-XGaze {text(presets['ethxgaze'][key])}"]
    elif key in presets["default"]:
        parts = [text(presets["default"][key])]
    else:
        return ""
    parts += [f"{name} {text(presets[p][key])}" for p, name in (("quick", "quick preset"), ("strong", "--recipe strong"))
              if key in presets[p]]
    return f" (default: {'; '.join(parts)})"


def check_combinations(cfg):
    """A run's config whose flags do not go together: UsageError naming them."""
    ss = cfg["task"] != "none"
    problems = [
        (cfg["img_size"] // cfg["grid"] < 4,
         f"--grid {cfg['grid']} cannot tile a {cfg['img_size']} px image: tiles need 4 px or more"),
        (cfg["grid"] < 2 and "puzzle" in cfg["task"], f"--task {cfg['task']} needs --grid 2 or more"),
        (cfg["stage"] == "pretrain" and not ss,
         "--stage pretrain needs an SS --task (puzzle, rotation or puzzle_rotation)"),
        (cfg["no_ssh"] and not ss, "--no-ssh needs a --task: it is HMTL on shuffled inputs without the SS heads"),
        (cfg["ss_fraction"] < 1 and not ss, "--ss-fraction needs an SS --task"),
        (cfg["head"] == "catreg" and abs(198 / cfg["bin_width"] - round(198 / cfg["bin_width"])) > 1e-9,
         f"--bin-width {cfg['bin_width']:g} does not divide the 198° span of the bins"),
        (cfg["data"] == "synthetic" and not cfg["epoch_steps"] and
         round(cfg["synthetic_train"] / cfg["train_every"] * (1 - cfg["holdout"])) < cfg["batch_size"],
         f"--synthetic-train {cfg['synthetic_train']} (less --holdout) makes no batch of {cfg['batch_size']}"),
    ]
    for bad, message in problems:
        if bad:
            raise UsageError(message)


def action_of(given, use):
    """What the flags given ask for besides training (one of ACTIONS, or None), checked: one at most,
    --checkpoint where it is read and nowhere else, and no flag that the action would ignore (`use`)."""
    actions = [a for a in ACTIONS if a in given]
    flag = lambda key: "--" + key.replace("_", "-")
    if len(actions) > 1:
        raise UsageError(f"{flag(actions[0])} and {flag(actions[1])} do not go together")
    if "resume" in given and "overwrite" in given:
        raise UsageError("--resume continues a run and --overwrite replaces it: choose one")
    action = actions[0] if actions else None
    reads_checkpoint = action in ("eval_only", "predict", "export")
    if reads_checkpoint and "checkpoint" not in given:
        raise UsageError(f"{flag(action)} needs --checkpoint PATH")
    if "checkpoint" in given and not reads_checkpoint:
        raise UsageError("--checkpoint is read by --eval-only, --predict and --export; a run starts from --init "
                         "PATH and --resume continues --out's last.pt")
    writes = [flag(k) for k in ("out", "overwrite") if k in given]
    if action == "eval_only" and writes:
        raise UsageError(f"--eval-only prints its metrics and writes nothing; it would ignore {', '.join(writes)}")
    if action in use:
        unused = [flag(k) for k in given if k not in use[action]]
        if unused:
            raise UsageError(f"{flag(action)} uses only {', '.join(map(flag, sorted(use[action] - {action})))}; "
                             f"it would ignore {', '.join(unused)}")
    if "boxes" in given and action != "predict":
        raise UsageError("--boxes crops the images given to --predict; without --predict it has nothing to crop")
    return action


def refuse_changes(given, cfg, allowed, why):
    """UsageError naming every setting given whose value differs from the run's own (cfg) and may not."""
    changed = [f"--{k.replace('_', '-')} {v} (the run has {cfg[k]})" for k, v in given.items()
               if k in cfg and k not in allowed | {"out"} and v != cfg[k]]
    if changed:
        raise UsageError(f"{why}: {', '.join(changed)}; leave {'it' if len(changed) == 1 else 'them'} out")
