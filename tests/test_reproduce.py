"""reproduce.py and its studies: the paper's figures it quotes, the runner, and the BIWI studies end to end."""
import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

import hmtl
import reproduce
import studies
from conftest import REPO, config, fake_biwi
from hmtl_data import ANGLES
from studies import biwi, paper


def test_every_figure_the_paper_gives_is_quoted_and_consistent():
    """Each quoted mean is the mean of the quoted angles, as the paper computes it (to its rounding):
    a typo in any figure breaks that."""
    t1 = {label: v for (table, label), v in paper.PAPER.items() if table == "Table 1"}
    assert len(t1) == 13 and set(t1) == {label for label, _ in paper.configurations(True, {})["Table 1"]}
    for (table, label), (yaw, pitch, roll, mean) in paper.PAPER.items():
        angles = [a for a in (yaw, pitch, roll) if a is not None]
        assert mean == pytest.approx(np.mean(angles), abs=0.0015), (table, label)
    for k, (yaw, pitch) in enumerate(paper.PAPER_SUBJECTS_ANGLES["HMTL 2x2 puzzle w/o SSHs"]):
        assert paper.PAPER_SUBJECTS["HMTL 2x2 puzzle w/o SSHs"][k] == pytest.approx((yaw + pitch) / 2, abs=0.0015)
    assert paper.PAPER[("Table 1", "HMTL puzzle-rotation 2x2, flag 2")] == \
        paper.PAPER[("Table 1", "HMTL puzzle-rotation 2x2, flag 4")]  # as the paper prints them


def test_the_full_aflw2000_column_evaluates_the_final_model_on_all_faces(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hmtl, "main", lambda argv: calls.append(argv) or {"val_mae_mean": 1.0})
    studies.evaluate_on(tmp_path, "aflw2000_full", ["--no-aflw2000-reduced"])
    assert calls == [["--eval-only", "--checkpoint", str(tmp_path / "last.pt"), "--no-aflw2000-reduced"]]
    assert json.loads((tmp_path / "eval_aflw2000_full.json").read_text()) == {"val_mae_mean": 1.0}


def test_a_run_made_with_other_settings_is_run_again(tmp_path, monkeypatch):
    flags = ["--arch", "resnet18", "--img-size", "32", "--batch-size", "16", "--synthetic-train", "32",
             "--synthetic-val", "16", "--epochs", "1", "--workers", "0", "--cache", str(tmp_path / "cache")]
    first = studies.run(flags, tmp_path / "run")
    assert studies.run(flags, tmp_path / "run") == first  # finished and matching: reused
    changed = 0.25 if first["config"]["flip"] != 0.25 else 0.75
    monkeypatch.setitem(hmtl.DEFAULTS, "flip", changed)  # a default changes under the finished run
    again = studies.run(flags, tmp_path / "run")
    assert again["config"]["flip"] == changed != first["config"]["flip"]


def test_the_real_face_benchmark_runs_end_to_end(tmp_path, monkeypatch, capsys):
    for split, seed in (("train", 0), ("test", 1)):
        fake_biwi(tmp_path / f"BIWI_{split}.npz", n=32, seed=seed, size=32)
    tiny = ["--data", "biwi", "--arch", "resnet18", "--epochs", "1", "--milestones", "10", "--workers", "0",
            "--batch-size", "16"]
    monkeypatch.setattr(biwi, "REAL", tiny)
    reproduce.main(["biwi", str(tmp_path), "--seeds", "2", "--runs", str(tmp_path / "runs"), "--out",
                    str(tmp_path / "results")])
    table = (tmp_path / "results" / "biwi.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2:5] != "---" and "Row" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == ["SL", "HMTL 2x2 puzzle, flag 3, w = 50", "HMTL 2x2 puzzle w/o SSHs"]
    folders = sorted(p.parent.relative_to(tmp_path / "runs") for p in (tmp_path / "runs").glob("*/*/seed*/summary.json"))
    assert [str(f) for f in folders] == [f"biwi/{row}/seed{k}" for row in ("hmtl-2x2-puzzle-flag-3-w-50",
                                                                          "hmtl-2x2-puzzle-w-o-sshs", "sl")
                                         for k in (0, 1)]  # named by their row
    summaries = [json.loads((tmp_path / "runs" / f / "summary.json").read_text()) for f in folders]
    assert {s["val_images"] for s in summaries} == {32}
    sl = [s["val_mae_mean"] for s in summaries if s["config"]["task"] == "none"]
    assert f"**{np.mean(sl):.2f} ± {np.std(sl):.2f}**" in rows[0]
    assert (tmp_path / "results" / "biwi.png").stat().st_size > 10_000 and table in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no BIWI_devtrain.npz, BIWI_devval.npz there; make them with tools/biwi_to_npz.py"):
        reproduce.main(["biwi", str(tmp_path), "--dev"])


def test_each_mode_refuses_the_flags_it_does_not_read_in_one_line():
    for argv, flag in ((["biwi", "DIR", "--middle-seeds", "1"], "--middle-seeds"), (["scarcity", "DIR", "--dev"], "--dev"),
                       (["plan", "2194", "--report"], "--report"), (["paper", "--aflw2000", "A"], "--aflw2000")):
        done = subprocess.run([sys.executable, str(REPO / "reproduce.py"), *argv], capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.startswith("reproduce.py: error: ") and \
            done.stderr.count("\n") == 1 and flag in done.stderr, (argv, done.stderr)


def test_the_papers_rows_share_runs_and_fine_tune_from_their_own_seeds_pre_training(monkeypatch):
    for root in paper.ROOTS:
        monkeypatch.setenv(root, "/data")
    monkeypatch.delenv("BIWI_NPZ", raising=False)
    smoke = paper.rows(argparse.Namespace(quick=True, seeds=2, runs="R"))
    rows = paper.rows(argparse.Namespace(quick=False, seeds=2, runs="R"))
    assert not {row.folder for row in smoke} & {row.folder for row in rows}  # a smoke run never replaces a real one
    folders = {row.key: row.folder for row in rows}
    assert folders[("Table 3", "SL, aug level 2")] == folders[("Table 2", "SL, aug level 2")]  # one run, two tables
    assert len(set(folders.values())) == len(rows) - 1
    assert folders[("Table 1", "SL, 1 subject")] == "table-1/sl-1-subject" != folders[("Table 4", "SL, 1 subject")]
    order = [(row.key, seed) for row, seed in studies.order(rows)]
    pretrain = folders[("Table 2", "SS pre-training (rotation 2x2)")]
    for row in rows:
        if any("{runs}" in f for f in row.flags):
            init = row.flags[row.flags.index("--init") + 1].format(runs="R", seed=1)
            assert init == f"R/paper/{pretrain}/seed1/last.pt"
            assert order.index(((("Table 2", "SS pre-training (rotation 2x2)")), 1)) < order.index((row.key, 1))
    assert {tuple(row.evaluations) for row in rows if row.key[0] == "Table 2" and "pre-training" not in row.key[1]} \
        == {("aflw2000_full",)}


def test_run_all_passes_its_arguments_to_reproduce():
    assert 'exec python reproduce.py "$@"' in (REPO / "run_all.sh").read_text()


def test_the_plan_counts_every_run_once_and_projects_its_hours():
    text = paper.plan(rate=1000, seeds=1, gpus=8)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[4:]]
    rows = {c[0]: c for c in cells}
    assert [int(rows[t][1]) for t in ("Table 1", "Table 2", "Table 3", "Table 4")] == [13, 12, 2, 12]
    # Table 2: 12 runs of 110 epochs over 122,450 images, and the 2,000 AFLW2000 faces evaluated
    # each epoch at a third of a training step's cost
    one_run = 110 * (122_450 + 2_000 / 3) / 1000 / 3600
    assert float(rows["Table 2"][3]) == pytest.approx(one_run, abs=0.05)
    assert float(rows["Table 2"][4]) == pytest.approx(12 * 110 * (122_450 + 2_000 / 3) / 1000 / 3600, abs=0.05)
    assert float(rows["Table 4"][4]) == pytest.approx(3 * 110 * (10_000 * (1 + 2 + 3 + 4) + 4 * 10_000) / 1000 / 3600,
                                                      abs=0.05)


def test_the_scarcity_study_reports_what_finished(tmp_path):
    """--report: the tables and figure from the runs that finished (here fabricated summaries with known
    MAEs), none trained; every run of a row the same steps, sizes by frames and people."""
    names = np.array([f"{q:02d}/frame_{i:05d}_rgb.png" for q in (1, 2) for i in range(3)])
    for split in ("train", "test", "devtrain", "devval", "p4", "p8"):
        np.savez(tmp_path / f"BIWI_{split}.npz", image=np.zeros((6, 8, 8, 3), np.uint8), names=names,
                 pose=np.array([[0, -10, 0]] * 3 + [[0, 20, 0]] * 3, np.float32))
    args = argparse.Namespace(real=str(tmp_path), seeds=2, middle_seeds=1, ablation_seeds=1, aflw2000="A")
    rows = biwi.scarcity_rows(args)
    assert all("--epoch-steps" in row.flags and row.flags[row.flags.index("--epoch-steps") + 1] == "500" for row in rows)
    # --middle-seeds cuts the middle sizes and the people, never the ends of the frames axis or the length row
    assert {(row.key[0], row.key[1], row.seeds) for row in rows if row.key[0] != "recipe"} == {
        ("frames", 256, 2), ("frames", 32, 1), ("frames", 4, 1), ("frames", 1, 2), ("long", 3, 2), ("people", 4, 1),
        ("people", 8, 1)}
    folders = {row.key: row.folder for row in rows}
    assert folders[("frames", 256, "paper", "HMTL")] == "frames-1of256/hmtl-paper"  # named by their row
    assert folders[("long", 3, "paper", "HMTL w/o SSHs")] == "steps-6000/hmtl-no-ssh-paper"
    assert len(set(folders.values())) == len(rows)
    order = [(row.key, seed) for row, seed in studies.order(rows)]
    assert len(set(order)) == len(order) == sum(row.seeds for row in rows)
    # a study cut short: every cell at the ends has seed 0 before any has seed 1, and both before the middle sizes;
    # SL vs HMTL everywhere before the ablation
    assert order.index((("frames", 1, "strong", "HMTL"), 0)) < order.index((("frames", 256, "paper", "SL"), 1)) \
        < order.index((("frames", 32, "paper", "SL"), 0)) < order.index((("people", 8, "paper", "HMTL"), 0)) \
        < order.index((("frames", 1, "paper", "HMTL w/o SSHs"), 0))
    mae, written = {"SL": 4.0, "HMTL": 5.0, "HMTL w/o SSHs": 6.0}, []
    for row in rows:
        (group, size, _, method), flags = row.key, row.flags
        for seed in range(row.seeds):
            folder = tmp_path / "runs" / "scarcity" / row.folder / f"seed{seed}"
            folder.mkdir(parents=True)
            if (group, size, method) == ("people", 4, "HMTL"):  # made with other settings than its row's
                (folder / "summary.json").write_text(json.dumps({"val_mae_mean": 1.0, "train_images": 1,
                                                                 "config": config(*flags, "--img-size", "32")}))
                continue
            if (group, size, method) == ("people", 8, "HMTL w/o SSHs"):
                (folder / "summary.json").write_text('{"val_mae_mean": 1.0, "con')  # half-written
                continue
            value, faces = mae[method] + seed + (size == 4), 10693 // size if isinstance(size, int) else 8113
            (folder / "summary.json").write_text(json.dumps(
                {"val_mae_mean": value, "train_images": faces, **{f"val_mae_{a}": value for a in ANGLES},
                 "baseline_mae_mean": 14.0 + seed, "baseline_mae_pitch": 16.0,
                 "config": config(*flags, "--seed", str(seed))}))
            written.append(value / 4)
            (folder / "eval_aflw2000.json").write_text(json.dumps(  # another test set
                {"val_mae_mean": value + 10, "val_mae_mean_se": value / 4, "val_images": 95}))
    done = subprocess.run([sys.executable, str(REPO / "reproduce.py"), "scarcity", str(tmp_path), "--report",
                           "--seeds", "2", "--middle-seeds", "1", "--ablation-seeds", "1", "--runs", str(tmp_path / "runs"),
                           "--out", str(tmp_path / "results"), "--aflw2000", "A"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "results" / "scarcity.md").read_text()
    assert "| paper | 4 | 2673 | 5.00 (n 1) | 6.00 (n 1) | 7.00 (n 1) | +20% | 14.00 | 15.00 | 16.00 |" in table  # 1 seed
    assert "| paper | 1 | 10693 | 4.50 ± 0.50 (n 2) | 5.50 ± 0.50 (n 2) | 6.50 ± 0.50 (n 2) | +22% | 14.50 ± 0.50 | " \
        "14.50 ± 0.50 |" in table
    assert "| paper | 4 | 2673 | 5.00 (n 1) | – (n 0) | 7.00 (n 1) | – | 14.00 |" in table  # people: neither counts
    assert "| paper | 8 | 1336 | 4.00 (n 1) | 5.00 (n 1) | – (n 0) | +25% | 14.00 |" in table
    assert "Pitch MAE (°): 4 people: SL 5.00, HMTL –, the training mean 16.00; 8 people: SL 4.00, HMTL 5.00" in table
    assert f"its 95 faces has a standard error over the faces of 1.00-1.75° (median {np.median(written):.2f}°)" in table
    assert "01: -10.0, 02: +20.0" in table  # each person's own zero of pitch
    assert (tmp_path / "results" / "scarcity.png").stat().st_size > 10_000 and table in done.stdout
