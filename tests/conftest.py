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
