"""Shared test fixtures: the repository root on sys.path and the paths to ../shared."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
REFERENCE_CHECKPOINTS = SHARED / "reference" / "checkpoints"


@pytest.fixture
def reference_checkpoints() -> Path:
    if not (REFERENCE_CHECKPOINTS / "encoder_0.1_var_reparam").is_file():
        pytest.skip(f"the reference's published weights are not at {REFERENCE_CHECKPOINTS}")
    return REFERENCE_CHECKPOINTS


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder (encoder.pt, decoder.pt, log.csv, args.json) trained for one short epoch, shared by
    the tests of the evaluation scripts."""
    import training

    root = tmp_path_factory.mktemp("tiny")
    return training.main(["--num-train", "512", "--batch-size", "64", "--epochs", "1", "--style-dim", "6",
                          "--class-dim", "4", "--eps-std", "0.5", "--checkpoint-dir", str(root / "ck"),
                          "--log-dir", str(root / "runs"), "--run-name", "tiny", "--no-progress"])
