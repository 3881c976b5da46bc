"""studies/aggregate.py: seeds grouped, mean ± sample std, each cell read from its own number, the README
block rewritten and checked, the group-size figure's seed means."""
import itertools
import json
import statistics

import matplotlib.pyplot as plt
import pytest

import studies.group_size
from studies import aggregate


def fake_evaluation(run: str, accuracy: float, iterations: int = 5000) -> dict:
    """An evaluation in studies.evaluate's schema whose every accuracy is `accuracy`."""
    four = dict.fromkeys(("style_train", "style_test", "class_train", "class_test"), accuracy)
    protocol = {"no_evidence": four, "with_evidence": four}
    swap = dict.fromkeys(("content_transfer", "style_leak", "reconstruction_ceiling"), accuracy)
    sizes = [1, 2, 4, 8, 16, 32]
    # Through JSON, as load_evaluations reads the files: no two keys share one dict, so that a test can change
    # one number alone (deepcopy would keep the sharing).
    return json.loads(json.dumps({
        "run": run, "training_args": {"seed": 0}, "evaluation": {"classifier_iterations": iterations},
        "model": {"style_dim": 16, "class_dim": 16},
        "latent_classifier": {"sampled": protocol, "means": protocol},
        "group_size": {"group_sizes": sizes, **dict.fromkeys(("logistic", "knn", "mlp"), [accuracy] * len(sizes))},
        "swap_score": {"no_evidence": swap, "with_evidence": swap},
        "test_loss": {"posterior_means": accuracy / 1000, "sampled": accuracy / 1000},
    }))


def rows_of(table: str, run: str) -> list[str]:
    lines = table.splitlines()
    return [line for line in lines if line.startswith(f"| `{run}` |")]


def test_seeds_share_a_row_with_their_mean_and_sample_std():
    runs = [fake_evaluation("mlvae_eps0.1", 50.0), fake_evaluation("mlvae_eps0.1_seed1", 52.0),
            fake_evaluation("mlvae_eps0.1_seed2", 54.0)]
    table = aggregate.headline_tables(runs)
    rows = rows_of(table, "mlvae_eps0.1")
    assert len(rows) == 3  # one row in each of the three tables
    codes, fused, swap = rows
    assert codes == "| `mlvae_eps0.1` | 3 | no |" + " 52.0 ± 2.0 |" * 4
    assert fused == "| `mlvae_eps0.1` | 3 |" + " 52.0 ± 2.0 |" * 5 + " 0.0520 ± 0.0020 |" * 2
    assert swap == "| `mlvae_eps0.1` | 3 | no |" + " 52.0 ± 2.0 |" * 3
    assert "|  |  | yes |" + " 52.0 ± 2.0 |" * 4 in table


def test_a_single_seed_shows_its_value_alone_and_configurations_keep_the_headline_order():
    runs = [fake_evaluation("reference_eps0.1", 70.25), fake_evaluation("mlvae_eps0.1", 50.0),
            fake_evaluation("mlvae_eps0.1_fashion-mnist", 80.0)]
    table = aggregate.headline_tables(runs)
    assert rows_of(table, "reference_eps0.1")[0] == "| `reference_eps0.1` | 1 | no |" + " 70.2 |" * 4
    assert table.index("`mlvae_eps0.1`") < table.index("`reference_eps0.1`")
    assert "fashion-mnist" not in table  # not a headline configuration
    assert "mlvae_eps0.1_fashion-mnist" in aggregate.evaluations_table(runs)


def test_configuration_strips_only_a_trailing_seed_suffix():
    assert aggregate.configuration("mlvae_eps0.1_stylekl4_seed12") == "mlvae_eps0.1_stylekl4"
    assert aggregate.configuration("mlvae_eps0.1") == "mlvae_eps0.1"
    assert aggregate.configuration("seed1_run") == "seed1_run"


def test_evaluations_with_different_classifier_steps_are_refused(tmp_path):
    for name, steps in (("a", 5000), ("b", 20000)):
        (tmp_path / f"eval_{name}.json").write_text(json.dumps(fake_evaluation(name, 50.0, steps)))
    with pytest.raises(ValueError, match="different classifier steps"):
        aggregate.load_evaluations(tmp_path)


@pytest.fixture
def results_and_readme(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for run, accuracy in (("mlvae_eps0.1", 50.0), ("mlvae_eps0.1_seed1", 52.0)):
        (results / f"eval_{run}.json").write_text(json.dumps(fake_evaluation(run, accuracy)))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n{aggregate.START}\nold table\n{aggregate.END}\n\n## after\n")
    doc = tmp_path / "reference.md"
    doc.write_text(f"# anchors\n\n{aggregate.ANCHORS_START}\nold anchors\n{aggregate.ANCHORS_END}\n")
    flags = ["--results-dir", str(results), "--readme", str(readme), "--anchors-doc", str(doc),
             "--figure", str(tmp_path / "k.png")]
    return results, readme, flags


def test_main_rewrites_only_the_block_between_the_markers(results_and_readme):
    results, readme, flags = results_and_readme
    block = aggregate.main(flags)
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n") and text.endswith(f"{aggregate.END}\n\n## after\n")
    assert "old table" not in text and aggregate.block_between(text) == block
    assert (results / "headline.md").read_text() == block
    assert "51.0 ± 1.4" in block
    anchors = (results / "anchors.md").read_text()
    doc = (readme.parent / "reference.md").read_text()
    assert "old anchors" not in doc and aggregate.block_between(doc, aggregate.ANCHORS_START, aggregate.ANCHORS_END) == anchors


def test_anchors_table_puts_each_protocol_of_our_runs_beside_the_published_rows():
    runs = [fake_evaluation("mlvae_conv16_eps0.1", 40.0), fake_evaluation("mlvae_eps0.1", 50.0),
            fake_evaluation("mlvae_eps0.1_seed1", 52.0), fake_evaluation("mlvae_eps0.1_fashion-mnist", 9.0)]
    runs[0]["latent_classifier"]["means"]["no_evidence"]["style_test"] = 12.5
    table = aggregate.anchors_table(runs)
    assert rows_of(table, "mlvae_eps0.1") == [
        "| `mlvae_eps0.1` | MLP | 16/16 | 2 | sampled latents (the reference's protocol) |" + " 51.00 ± 1.41 |" * 2,
        "| `mlvae_eps0.1` | MLP | 16/16 | 2 | posterior means |" + " 51.00 ± 1.41 |" * 2]
    assert rows_of(table, "mlvae_conv16_eps0.1")[1] == "| `mlvae_conv16_eps0.1` | conv | 16/16 | 1 | posterior means | 12.50 | 40.00 |"
    assert table.index("`mlvae_eps0.1`") < table.index("`mlvae_conv16_eps0.1`") < table.index("cycle-consistent VAE (Jha")
    assert "| 17.56 | 98.35 |" in table and "fashion" not in table


def test_check_passes_on_fresh_files_and_fails_when_a_result_changes(results_and_readme):
    results, readme, flags = results_and_readme
    aggregate.main(flags)
    aggregate.main(flags + ["--check"])
    (results / "eval_mlvae_eps0.1_seed1.json").write_text(json.dumps(fake_evaluation("mlvae_eps0.1_seed1", 60.0)))
    with pytest.raises(SystemExit, match="out of date"):
        aggregate.main(flags + ["--check"])


def test_readme_without_markers_is_an_error(results_and_readme):
    _, readme, flags = results_and_readme
    readme.write_text("# title\n")
    with pytest.raises(SystemExit, match="headline:start"):
        aggregate.main(flags)


SIZES = [1, 2, 4, 8, 16, 32]
ACCURACIES = ("style_train", "style_test", "class_train", "class_test")
SWAP_SCORES = ("content_transfer", "style_leak", "reconstruction_ceiling")


def numbered_evaluation(run: str, shift: float) -> dict:
    """An evaluation in studies.evaluate's schema whose every number differs from every other (then + shift):
    a table cell that reads the wrong one shows it."""
    number = itertools.count(10.0, 3.0)
    evaluation = fake_evaluation(run, 0.0)
    evaluation["latent_classifier"] = {
        latents: {evidence: {key: next(number) + shift for key in ACCURACIES} for evidence in aggregate.EVIDENCE}
        for latents in ("sampled", "means")}
    probes = {probe: [next(number) + shift for _ in SIZES] for probe in ("logistic", "knn", "mlp")}
    evaluation["group_size"] = {"group_sizes": SIZES, **probes}
    evaluation["swap_score"] = {evidence: {key: next(number) + shift for key in SWAP_SCORES}
                                for evidence in aggregate.EVIDENCE}
    evaluation["test_loss"] = {"posterior_means": 0.0123 + shift / 1000, "sampled": 0.0456 + shift / 1000}
    return evaluation


def seed_cell(runs: list[dict], path: tuple, digits: int = 1) -> str:
    values = []
    for run in runs:
        node = run
        for key in path:
            node = node[key]
        values.append(node)
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def test_each_headline_cell_is_the_seed_mean_of_its_own_number():
    runs = [numbered_evaluation("mlvae_eps0.1", 0.0), numbered_evaluation("mlvae_eps0.1_seed1", 2.0)]
    lines = aggregate.headline_tables(runs).splitlines()
    for evidence, shown_as in aggregate.EVIDENCE.items():
        codes = [seed_cell(runs, ("latent_classifier", latents, evidence, f"{code}_test"))
                 for code in ("style", "class") for latents in ("sampled", "means")]
        swap = [seed_cell(runs, ("swap_score", evidence, key)) for key in SWAP_SCORES]
        first = "| `mlvae_eps0.1` | 2 |" if evidence == "no_evidence" else "|  |  |"
        assert f"{first} {shown_as} | " + " | ".join(codes) + " |" in lines
        assert f"{first} {shown_as} | " + " | ".join(swap) + " |" in lines
    fused = [seed_cell(runs, ("group_size", "mlp", SIZES.index(k))) for k in aggregate.HEADLINE_K]
    losses = [seed_cell(runs, ("test_loss", key), 4) for key in ("posterior_means", "sampled")]
    assert "| `mlvae_eps0.1` | 2 | " + " | ".join(fused + losses) + " |" in lines


def test_each_anchors_cell_is_the_seed_mean_of_its_own_number():
    runs = [numbered_evaluation("mlvae_eps0.1", 0.0), numbered_evaluation("mlvae_eps0.1_seed1", 2.0)]
    lines = aggregate.anchors_table(runs).splitlines()
    for latents, protocol in aggregate.PROTOCOLS:
        codes = [seed_cell(runs, ("latent_classifier", latents, "no_evidence", f"{code}_test"), 2)
                 for code in ("style", "class")]
        assert f"| `mlvae_eps0.1` | MLP | 16/16 | 2 | {protocol} | " + " | ".join(codes) + " |" in lines


def test_group_size_figure_plots_each_probes_seed_mean_at_each_k(tmp_path, monkeypatch):
    runs = [numbered_evaluation("mlvae_eps0.1", shift) for shift in (0.0, 1.0, 5.0)]
    runs += [numbered_evaluation("reference_eps0.1", 0.0)]
    figures = []

    def keep_figure(fig, out, dpi):
        figures.append(fig)
        plt.close(fig)  # its lines stay readable

    monkeypatch.setattr(studies.group_size, "save_figure", keep_figure)
    aggregate.plot_group_size(aggregate.group_seeds(runs), tmp_path / "k.png")
    lines = {line.get_label(): line for line in figures[0].axes[0].lines}
    assert len(lines) == 2 * 3
    for name, seeds in (("mlvae_eps0.1", runs[:3]), ("reference_eps0.1", runs[3:])):
        for probe in ("logistic", "knn", "mlp"):
            line = lines[f"{name} (n={len(seeds)}) ({probe})"]
            assert list(line.get_xdata()) == SIZES
            want = [statistics.mean(run["group_size"][probe][i] for run in seeds) for i in range(len(SIZES))]
            assert list(line.get_ydata()) == pytest.approx(want)


def fake_factors(run: str, shift: float) -> dict:
    """A studies.factors result in its schema; every number distinct, offset by `shift`."""
    counter = itertools.count()
    number = lambda: round(0.001 * next(counter) + shift, 6)  # noqa: E731
    names = [*aggregate.FACTOR_NAMES, "digit"]
    protocols = ("means", "sampled")
    return {"run": run,
            "probes": {code: {p: {name: number() for name in names} for p in protocols} for code in ("style", "class")},
            "retrieval": {code: {p: {"1": {"top1": number(), "top5": number()}} for p in protocols}
                          for code in ("style", "class")},
            "fusion": {p: {k: {"digit": number(), "top1": number(), "top5": number()} for k in ("2", "4")}
                       for p in protocols},
            "importance": {"style_share": {name: number() for name in names}, "disentanglement": number(),
                           "completeness": number()}}


def test_factors_tables_give_each_cell_the_seed_mean_of_its_own_number(tmp_path, results_and_readme):
    results, _, flags = results_and_readme
    runs = [fake_factors("identities_mlvae", 0.1), fake_factors("identities_mlvae_seed1", 0.3)]
    for run in runs:
        (results / f"factors_{run['run']}.json").write_text(json.dumps(run))
    aggregate.main(flags)
    table = (results / "factors.md").read_text()
    style, class_, fused, shares = table.split("**")[1::2]
    assert style.startswith("The style code") and fused.startswith("The class code fused")
    rows = rows_of(table, "identities_mlvae")

    def cell(values, digits):
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    class_means = [run["probes"]["class"]["means"] for run in runs]
    found = [run["retrieval"]["class"]["means"]["1"] for run in runs]
    expected = ("| `identities_mlvae` | 2 | means | "
                + " | ".join(cell([p[f] for p in class_means], 3) for f in aggregate.FACTOR_NAMES)
                + f" | {cell([100 * p['digit'] for p in class_means], 1)} | "
                + f"{cell([100 * f['top1'] for f in found], 1)} | {cell([100 * f['top5'] for f in found], 1)} |")
    assert expected in rows[2:4] and rows.index(expected) == 3  # the class table's means row
    fused_row = [run["fusion"]["sampled"]["4"] for run in runs]
    assert (f"| `identities_mlvae` | 2 | sampled | 4 | {cell([100 * s['digit'] for s in fused_row], 1)} | "
            f"{cell([100 * s['top1'] for s in fused_row], 1)} | {cell([100 * s['top5'] for s in fused_row], 1)} |"
            in rows)
    share = [run["importance"]["style_share"]["scale"] for run in runs]
    assert rows[-1].split(" | ")[3] == cell(share, 2)
    aggregate.main(flags + ["--check"])
    (results / "factors_identities_mlvae_seed1.json").write_text(json.dumps(fake_factors("identities_mlvae_seed1", 0.5)))
    with pytest.raises(SystemExit, match="factors.md"):
        aggregate.main(flags + ["--check"])


def test_factors_tables_open_with_the_ceiling_when_its_file_exists(tmp_path, results_and_readme):
    results, _, flags = results_and_readme
    (results / "factors_identities_mlvae.json").write_text(json.dumps(fake_factors("identities_mlvae", 0.1)))
    scores = {name: 0.5 + i / 100 for i, name in enumerate([*aggregate.FACTOR_NAMES, "digit"])}
    ceiling = {"command": "python -m studies.factor_ceiling --json x.json", "scores": scores,
               "train_scores": {name: 0.9 for name in scores}}
    (results / "factor_ceiling.json").write_text(json.dumps(ceiling))
    aggregate.main(flags)
    table = (results / "factors.md").read_text()
    assert table.split("**")[1] == "What one rendering shows"
    assert "`python -m studies.factor_ceiling --json x.json`" in table
    assert "| test (unseen identities) | 0.500 | 0.510 | 0.520 | 0.530 | 0.540 | 0.550 | 56.0 |" in table
    assert "| train (fitted) | 0.900 | 0.900 | 0.900 | 0.900 | 0.900 | 0.900 | 90.0 |" in table
    aggregate.main(flags + ["--check"])
    (results / "factor_ceiling.json").write_text(json.dumps({**ceiling, "scores": {**scores, "scale": 0.9}}))
    with pytest.raises(SystemExit, match="factors.md"):
        aggregate.main(flags + ["--check"])
