"""studies/factors.py: the probes' scores, identity retrieval, the fused sets, the importance matrix and DCI,
and the whole study on a tiny identities data set and model."""
import hashlib
import json
import math

import numpy as np
import pytest
import torch

import training
import utils
from networks import ProbeBank
from studies import factors, identities
from studies.identities import FACTORS


def test_probe_bank_probes_are_independent():
    bank = ProbeBank(3, 4, 2)
    z = torch.randn(5, 4)
    out = bank(z)
    with torch.no_grad():
        bank.weights[2][1].add_(1.0)  # change probe 1 only
    changed = bank(z)
    assert out.shape == (3, 5, 2)
    assert torch.equal(out[0], changed[0]) and torch.equal(out[2], changed[2])
    assert not torch.equal(out[1], changed[1])


def test_angles_become_cos_and_sin_columns():
    columns = {name: np.array([10.0, 20.0]) for name in FACTORS}
    columns["stroke_hue_deg"] = np.array([0.0, 90.0])
    targets, owners = factors.regression_targets(columns)
    assert owners.count("stroke_hue_deg") == 2 and owners.count("rotation_deg") == 1
    hue = [i for i, owner in enumerate(owners) if owner == "stroke_hue_deg"]
    assert torch.allclose(targets[:, hue], torch.tensor([[1.0, 0.0], [0.0, 1.0]]), atol=1e-6)


class Exact(torch.nn.Module):
    """A stand-in probe bank that returns given predictions: [count, N, 1] from [N, count]."""

    def __init__(self, predictions):
        super().__init__()
        self.predictions = predictions

    def forward(self, z):
        return self.predictions[z[:, 0].long()].T.unsqueeze(2)


def test_r2_pools_cos_and_sin_and_is_one_for_exact_predictions_and_zero_for_the_mean():
    targets = torch.randn(50, 3)
    owners = ["a", "b", "b"]
    rows = torch.arange(50.0).unsqueeze(1)
    exact = factors.factor_scores(Exact(targets), None, rows, targets, owners, None)
    assert exact == pytest.approx({"a": 1.0, "b": 1.0})
    mean = factors.factor_scores(Exact(targets.mean(0).expand(50, 3)), None, rows, targets, owners, None)
    assert mean == pytest.approx({"a": 0.0, "b": 0.0}, abs=1e-6)
    half = targets.clone()
    half[:, 2] = targets[:, 2].mean()  # the sin column predicted by its mean: b keeps cos's share of the variance
    sst = (targets - targets.mean(0)).pow(2).sum(0)
    expected = (sst[1] / (sst[1] + sst[2])).item()
    assert factors.factor_scores(Exact(half), None, rows, targets, owners, None)["b"] == pytest.approx(expected)


def test_retrieval_never_returns_the_query_itself():
    # Two renderings per identity; each identity's renderings lie far apart, and a query's own code is
    # nearest to itself: retrieval must look past it.
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    codes = torch.tensor([[0.0], [10.0], [0.1], [10.1], [20.0], [20.3]])
    singles = torch.arange(6).unsqueeze(1)
    found = factors.retrieval(codes, singles, codes, labels)
    # rows 0, 2: nearest other is the other identity's; 4 and 5 find each other; 1, 3 find each other's
    # identity's twin at 0.1: row 1 (10.0) -> row 3 (10.1, identity 1), a miss.
    assert found["top1"] == pytest.approx(2 / 6)
    assert found["top5"] == pytest.approx(1.0)


def test_retrieval_is_perfect_when_the_code_is_the_identity():
    labels = torch.arange(20).repeat_interleave(4)
    codes = labels.float().unsqueeze(1) * 5 + 0.01 * torch.randn(80, 1)
    sets = factors.disjoint_sets(labels, 2)
    queries, _ = utils.fused_posteriors(codes, torch.zeros_like(codes), sets)
    assert factors.retrieval(queries, sets, codes, labels) == {"top1": 1.0, "top5": 1.0}


def test_disjoint_sets_hold_whole_sets_of_one_group_each_row_once():
    labels = torch.tensor([1, 0, 1, 0, 1, 2, 1, 0, 1])  # group 1: 5 rows, group 0: 3, group 2: 1
    sets = factors.disjoint_sets(labels, 2)
    assert sets.shape == (3, 2)  # two sets from group 1, one from group 0, none from group 2
    assert all(len(set(labels[row].tolist())) == 1 for row in sets)
    assert len(set(sets.flatten().tolist())) == 6


def test_dci_is_one_for_a_diagonal_matrix_and_zero_for_a_uniform_one():
    assert factors.dci(torch.eye(4, dtype=torch.float64)) == pytest.approx((1.0, 1.0))
    assert factors.dci(torch.ones(4, 4, dtype=torch.float64)) == pytest.approx((0.0, 0.0), abs=1e-9)
    # one dimension holds two factors: disentanglement falls, completeness stays (each factor one dim)
    d, c = factors.dci(torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64))
    assert d == pytest.approx(0.0, abs=1e-9) and c == pytest.approx(1.0)


def test_permutation_importance_finds_the_one_dimension_a_factor_lives_in():
    torch.manual_seed(0)
    z = torch.randn(1000, 3)
    targets = z[:, 1:2].clone()
    digits = (z[:, 2] > 0).long()
    generator = torch.Generator().manual_seed(0)
    regress, classify = factors.fit_probes(z, targets, digits, iterations=250, batch_size=128, generator=generator,
                                           progress=False, desc="")
    owners = ["f"]
    importance = factors.permutation_importance(regress, classify, z, targets, owners, digits, generator)
    assert importance.shape == (3, 2)
    assert importance[:, 0].argmax() == 1 and importance[1, 0] > 0.5
    assert importance[:, 1].argmax() == 2 and importance[2, 1] > 0.2
    assert importance[0].max() < 0.05


@pytest.fixture(scope="module")
def identities_run(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("factors")
    data = identities.main(["--train-identities", "24", "--test-identities", "8", "--members", "4", "--data-dir",
                            str(tiny_data), "--out", str(root / "ids"), "--workers", "1", "--no-progress"])
    run = training.main(["--dataset", "folder", "--data-dir", str(data), "--cache-dir", str(root / "cache"),
                         "--arch", "conv", "--style-dim", "4", "--class-dim", "4", "--groups-per-batch", "4",
                         "--images-per-group", "4", "--epochs", "1", "--image-every", "0", "--no-progress",
                         "--checkpoint-dir", str(root / "ck"), "--log-dir", str(root / "runs"), "--run-name", "ids"])
    return run, root


def test_the_study_writes_every_score_of_every_code_and_protocol(identities_run, capsys):
    run, root = identities_run
    out = root / "factors.json"
    results = factors.main(["--checkpoint-dir", str(run), "--cache-dir", str(root / "cache"), "--iterations", "20",
                            "--fusion", "2", "--no-progress", "--json", str(out)])
    assert json.loads(out.read_text()) == results
    for name in ("encoder", "decoder"):  # so that a shipped result can be matched to the weights it measured
        assert results["model"][f"{name}_sha256"] == hashlib.sha256((run / f"{name}.pt").read_bytes()).hexdigest()
    for code in factors.CODES:
        for protocol in factors.PROTOCOLS:
            assert set(results["probes"][code][protocol]) == {*FACTORS, "digit"}
            assert set(results["retrieval"][code][protocol]["1"]) == {"top1", "top5"}
    assert set(results["fusion"]["means"]["2"]) == {"digit", "top1", "top5"}
    importance = results["importance"]
    assert np.array(importance["matrix"]).shape == (8, len(FACTORS) + 1)
    assert all(0.0 <= share <= 1.0 for share in importance["style_share"].values())
    assert "| style | means |" in capsys.readouterr().out


def test_a_model_of_other_data_is_refused_with_one_error_line(tiny_run, capsys):
    with pytest.raises(SystemExit) as stop:
        factors.main(["--checkpoint-dir", str(tiny_run), "--no-progress"])
    assert stop.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "studies.identities" in err[0]
