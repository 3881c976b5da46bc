"""README.md, results/ and make_results.sh agree: the headline tables are what studies.aggregate makes of
results/eval_*.json, each shipped run's evaluation measured the weights shipped now, and every file
under results/ is one that make_results.sh writes."""
import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, REFERENCE_CHECKPOINTS
from studies import aggregate

RESULTS = ROOT / "results"
# Written by make_results.sh's commands under their default names, not named in the script itself.
WRITTEN_BY_DEFAULT = {"headline.md", "anchors.md", "evaluations.md", "sweep_validation.json", "sweep_conv.json"}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def headline() -> str:
    return aggregate.headline_tables(aggregate.load_evaluations(RESULTS))


def test_readme_headline_block_is_generated_from_the_result_files(headline):
    block = aggregate.block_between((ROOT / "README.md").read_text())
    assert block == headline, "README.md's headline block is stale: run `python -m studies.aggregate`"


def test_headline_file_is_generated_from_the_result_files(headline):
    assert (RESULTS / "headline.md").read_text() == headline, "run `python -m studies.aggregate`"


def test_anchors_table_and_its_docs_block_are_generated_from_the_result_files():
    anchors = aggregate.anchors_table(aggregate.load_evaluations(RESULTS))
    doc = (ROOT / "docs" / "reference.md").read_text()
    assert aggregate.block_between(doc, aggregate.ANCHORS_START, aggregate.ANCHORS_END) == anchors, \
        "docs/reference.md's anchors block is stale: run `python -m studies.aggregate`"
    assert (RESULTS / "anchors.md").read_text() == anchors, "run `python -m studies.aggregate`"


def test_every_shipped_run_is_evaluated_on_its_current_weights():
    runs = sorted(path.parent for path in (ROOT / "checkpoints").glob("*/encoder.pt"))
    assert runs
    for run in runs:
        # As make_results.sh does: the identities runs are measured by studies.factors, the others by evaluate.
        study, prefix = ("factors", "factors") if run.name.startswith("identities_") else ("evaluate", "eval")
        path = RESULTS / f"{prefix}_{run.name}.json"
        command = f"python -m studies.{study} --checkpoint-dir {run.relative_to(ROOT)} --json results/{path.name}"
        assert path.is_file(), f"no {path.name}: run `{command}`"
        model = json.loads(path.read_text())["model"]
        assert model.get("encoder_sha256") == sha256(run / "encoder.pt"), f"{path.name} measured other weights"
        assert model.get("decoder_sha256") == sha256(run / "decoder.pt"), f"{path.name} measured other weights"


def test_reference_evaluations_measured_the_published_weights():
    if not (REFERENCE_CHECKPOINTS / "encoder_0.1_var_reparam").is_file():
        pytest.skip(f"the reference's published weights are not at {REFERENCE_CHECKPOINTS}")
    for eps in ("0.1", "1"):
        model = json.loads((RESULTS / f"eval_reference_eps{eps}.json").read_text())["model"]
        assert model["encoder_sha256"] == sha256(REFERENCE_CHECKPOINTS / f"encoder_{eps}_var_reparam")
        assert model["eps_std"] == float(eps)


def make_results_outputs() -> list[re.Pattern]:
    """The paths under results/ that make_results.sh names, each shell variable read as a wildcard."""
    script = (ROOT / "make_results.sh").read_text()
    names = re.findall(r"results/([\w.${}\-]+)", script)
    return [re.compile(".+".join(map(re.escape, re.split(r"\$\{?\w+\}?", name))) + "$") for name in names]


def shipped_results() -> list[str]:
    """Names of the files under results/ that git tracks (every file there outside a git checkout)."""
    try:
        listed = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return sorted(path.name for path in RESULTS.iterdir())
    return sorted(Path(line).name for line in listed.stdout.splitlines())


def test_every_shipped_file_under_results_is_written_by_make_results():
    patterns = make_results_outputs()
    stray = [name for name in shipped_results() if name not in WRITTEN_BY_DEFAULT
             and not any(pattern.match(name) for pattern in patterns)]
    assert not stray, f"make_results.sh does not write {stray}: write them there or remove them"


def test_the_outputs_pattern_reads_shell_variables_as_wildcards():
    patterns = make_results_outputs()
    assert any(pattern.match("eval_mlvae_eps0.1_seed1.json") for pattern in patterns)
    assert not any(pattern.match("swap_score_mlvae_eps0.1.json") for pattern in patterns)
