import os
import sys
from pathlib import Path

import pytest

import hmtl

REPO = Path(__file__).resolve().parent.parent
# The real AFLW2000 sample lies beside the repository in the project's workspace; tests that need
# it skip where it is absent.
AFLW_SAMPLE = REPO.parent / "shared" / "data" / "aflw2000-sample"


def tiny_args(tmp_path, *extra, out="run"):
    """Command-line flags for a run that trains in seconds on a CPU."""
    return ["--arch", "resnet18", "--img-size", "32", "--batch-size", "32", "--synthetic-train", "192",
            "--synthetic-val", "64", "--epochs", "2", "--milestones", "100", "--workers", "0", "--device", "cpu",
            "--cache", str(tmp_path.parent / "cache"), "--out", str(tmp_path / out), *extra]


def config(*flags):
    """The full config hmtl.py resolves from these flags."""
    return hmtl.resolve_config(vars(hmtl.get_args_parser().parse_args(list(flags))))


def expected_amp():
    """What --amp auto picks on this CPU, as the code decides it (the tests may force either way)."""
    return "bf16" if hmtl.cpu_has_bf16() else "off"


@pytest.fixture
def aflw_sample():
    if not AFLW_SAMPLE.is_dir():
        pytest.skip(f"the AFLW2000 sample is not at {AFLW_SAMPLE}")
    return AFLW_SAMPLE


def run_cli(*args, env=None, **kw):
    import subprocess
    return subprocess.run([sys.executable, str(REPO / "hmtl.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)
