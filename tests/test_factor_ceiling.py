"""studies/factor_ceiling.py: the supervised regressor learns the factors it is given, the study writes
every factor's score, and data without factors is refused."""
import json

import pytest
import torch

from studies import factor_ceiling, identities
from studies.factors import regression_targets, split_with_factors, standardise
from studies.identities import FACTORS

import data_loader


@pytest.fixture(scope="module")
def identities_data(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("ceiling")
    data = identities.main(["--train-identities", "24", "--test-identities", "8", "--members", "4", "--data-dir",
                            str(tiny_data), "--out", str(root / "ids"), "--workers", "1", "--no-progress"])
    return data, root / "cache"


def test_the_regressor_fits_the_factors_of_its_train_renderings(identities_data):
    data, cache = identities_data
    spec = data_loader.DataSpec.from_settings({"dataset": "folder", "data_dir": str(data), "cache_dir": str(cache)})
    images, _, factors = split_with_factors(spec, data, "train", "cpu", False)
    targets, owners = regression_targets(factors)
    (targets,) = standardise(targets)
    digits = torch.tensor(factors["digit"])
    torch.manual_seed(0)
    model = factor_ceiling.train_regressor(images, targets, digits, epochs=40, batch_size=16, lr=3e-3,
                                           generator=torch.Generator().manual_seed(0), progress=False)
    scores = factor_ceiling.regressor_scores(model.eval(), images, targets, owners, digits)
    assert set(scores) == {*FACTORS, "digit"}
    assert min(scores.values()) > 0.7, scores  # 96 renderings, 240 steps: it fits what it is shown


def test_the_study_scores_every_factor_on_the_test_identities(identities_data, tmp_path, capsys):
    data, cache = identities_data
    out = tmp_path / "ceiling.json"
    results = factor_ceiling.main(["--data-dir", str(data), "--cache-dir", str(cache), "--epochs", "1",
                                   "--batch-size", "32", "--no-progress", "--json", str(out)])
    assert json.loads(out.read_text()) == results
    assert set(results["scores"]) == set(results["train_scores"]) == {*FACTORS, "digit"}
    assert (results["train_renderings"], results["test_renderings"]) == (96, 32)
    assert results["command"].startswith("python -m studies.factor_ceiling --data-dir")
    assert "| rotation_deg |" in capsys.readouterr().out


@pytest.mark.parametrize("flags, words", [
    (["--dataset", "mnist"], "studies.identities"),
    (["--batch-size", "1000"], "--batch-size 1000"),
])
def test_bad_input_is_one_error_line(identities_data, capsys, flags, words):
    data, cache = identities_data
    with pytest.raises(SystemExit) as stop:
        factor_ceiling.main(["--data-dir", str(data), "--cache-dir", str(cache), "--no-progress", *flags])
    assert stop.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and words in err[0], err
