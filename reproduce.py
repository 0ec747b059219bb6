"""Every table and figure (run_all.sh): one mode per call, each refusing the flags it does not read.

    python reproduce.py paper [--quick] [--seeds 3]        the paper's Tables 1-4 and Figs. 3-7 (studies/paper.py)
    python reproduce.py plan IMG_PER_S [--seeds 3]         the paper's runs' projected GPU hours
    python reproduce.py biwi DIR [--ablations | --dev]     the BIWI benchmark (studies/biwi.py)
    python reproduce.py scarcity DIR [--aflw2000 DIR]      where HMTL helps, on BIWI (studies/biwi.py)

Runs go to <runs>/<study>/<row>/seed<k>: finished ones are skipped, unfinished ones resumed, one made
with other settings run again. --report trains nothing: it writes the tables and figures from the runs
that finished.
"""
import argparse
import sys

from hmtl_flags import Parser, UsageError
from studies import biwi, paper, run_study

STUDIES = {s.name: s for s in (paper.STUDY, biwi.BENCHMARK, biwi.SCARCITY)}


def get_args_parser():
    p = Parser(prog="reproduce.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = p.add_subparsers(dest="mode", required=True)
    common = {"--seeds": dict(type=int, default=3, help="seeds of each row (a study may give some rows fewer)"),
              "--runs": dict(default="runs", help="runs folder: <runs>/<study>/<row>/seed<k> (default: runs)"),
              "--out": dict(default="results", help="where the tables and figures go (default: results)"),
              "--report": dict(action="store_true", help="write the tables and figures from the runs that finished; "
                               "train nothing")}
    for name, text, flags in [(s.name, s.help, s.flags | common) for s in STUDIES.values()] + \
            [("plan", paper.plan.__doc__, paper.PLAN_FLAGS)]:
        sub = modes.add_parser(name, help=text, description=text)
        for flag, keywords in flags.items():
            sub.add_argument(flag, **keywords)
    return p


def main(argv=None):
    try:
        args = get_args_parser().parse_args(argv)
    except UsageError as e:
        print(f"reproduce.py: error: {e}", file=sys.stderr)
        raise
    if args.mode == "plan":
        return print(paper.plan(args.rate, args.seeds, args.gpus))
    return run_study(STUDIES[args.mode], args)


if __name__ == "__main__":
    main()
