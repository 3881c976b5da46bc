"""evaluation.py: the per-label sampler, evidence sets and the latent-classifier recipe."""
import math
from pathlib import Path

import pytest
import torch

import data_loader
import evaluation
from conftest import naive_product_of_gaussians


def test_evidence_latents_are_shared_within_a_batch_and_digit_only():
    posteriors = tuple(torch.randn(8, 3) for _ in range(4))
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    order = torch.arange(8)
    _, class_z = evaluation.classifier_latents(posteriors, labels, order, 4, True, 0.1, True,
                                               torch.Generator().manual_seed(0))
    assert torch.equal(class_z[0], class_z[1]) and torch.equal(class_z[2], class_z[3])
    assert not torch.equal(class_z[0], class_z[2])  # another digit
    assert not torch.equal(class_z[0], class_z[4])  # the same digit in the next batch


def test_means_are_the_posterior_means_and_samples_are_not():
    posteriors = tuple(torch.randn(8, 3) for _ in range(4))
    labels, order = torch.arange(8) % 2, torch.arange(8)
    style, class_ = evaluation.classifier_latents(posteriors, labels, order, 4, False, 0.1, False, torch.Generator())
    assert torch.equal(style, posteriors[0]) and torch.equal(class_, posteriors[2])
    style, _ = evaluation.classifier_latents(posteriors, labels, order, 4, False, 0.1, True, torch.Generator())
    assert not torch.equal(style, posteriors[0])


def planted_posteriors(n: int, signal: float, gen: torch.Generator, class_signal: float = 0.0):
    """Style means carry the label in their first coordinate; class means carry it with `class_signal`
    (default 0: pure noise)."""
    labels = torch.randint(0, 10, (n,), generator=gen)
    style_mu = torch.randn(n, 4, generator=gen)
    style_mu[:, 0] += signal * labels
    class_mu = torch.randn(n, 4, generator=gen)
    class_mu[:, 1] += class_signal * labels
    tiny = torch.full((n, 4), -20.0)  # near-zero variance: samples equal the means
    return (style_mu, tiny, class_mu, tiny), labels


def test_classifier_reads_a_planted_signal_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    train, train_labels = planted_posteriors(4096, 6.0, gen)
    test, test_labels = planted_posteriors(1024, 6.0, gen)
    protocol = dict(batch_size=128, evidence=False, eps_std=0.1, sampled=True, generator=gen)
    models = evaluation.train_latent_classifiers(train, train_labels, iterations=600, lr=1e-3, progress=False,
                                                 **protocol)
    style, class_ = evaluation.latent_accuracies(models, test, test_labels, **protocol)
    assert style > 90.0
    assert class_ < 20.0


def test_classifier_protocol_scores_each_split_against_its_own_labels():
    gen = torch.Generator().manual_seed(1)
    train = planted_posteriors(2048, 6.0, gen, class_signal=6.0)
    test_posteriors, test_labels = planted_posteriors(512, 6.0, gen, class_signal=6.0)
    # The test labels name the digit after the one the latents carry: a classifier that reads the latents is
    # right on the train split and wrong on the test split, whichever code it reads.
    accuracies, _ = evaluation.classifier_protocol(train, (test_posteriors, (test_labels + 1) % 10), sampled=True,
                                                   evidence=False, eps_std=0.1, iterations=400, lr=1e-3,
                                                   progress=False)
    assert accuracies["style_train"] > 90 and accuracies["class_train"] > 90
    assert accuracies["style_test"] < 10 and accuracies["class_test"] < 10


def split_posteriors(n: int, gen: torch.Generator):
    """Random posteriors in float64, log-variances in [-3, 1]."""
    mu, logvar = (torch.randn(n, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    return mu, logvar - 1, torch.randn(n, 3, generator=gen, dtype=torch.float64), logvar - 1


def test_evidence_means_are_the_product_of_gaussians_over_each_batch_and_digit():
    gen = torch.Generator().manual_seed(2)
    posteriors = split_posteriors(48, gen)
    labels, order = torch.randint(0, 4, (48,), generator=gen), torch.randperm(48, generator=gen)
    style, class_ = evaluation.classifier_latents(posteriors, labels, order, 8, True, 0.1, False, gen)
    batch_and_digit = (torch.arange(48) // 8) * 100 + labels[order]
    want, _ = naive_product_of_gaussians(posteriors[2][order], posteriors[3][order], batch_and_digit)
    torch.testing.assert_close(class_, want)
    torch.testing.assert_close(style, posteriors[0][order])


@pytest.mark.parametrize("eps_std", [0.3, 1.0])
def test_evidence_samples_spread_with_eps_std_times_the_group_std(eps_std):
    n = 8192  # batches of 4 rows: two digits of two rows each
    gen = torch.Generator().manual_seed(3)
    posteriors = split_posteriors(n, gen)
    labels, order = (torch.arange(n) // 2) % 10, torch.arange(n)
    style, class_ = evaluation.classifier_latents(posteriors, labels, order, 4, True, eps_std, True, gen)
    # The product of each pair's two Gaussians, in closed form.
    precision = torch.exp(-posteriors[3]).view(n // 2, 2, 3)
    pair_mu = (posteriors[2].view(n // 2, 2, 3) * precision).sum(1) / precision.sum(1)
    group_mu, group_logvar = pair_mu.repeat_interleave(2, 0), -precision.sum(1).log().repeat_interleave(2, 0)
    class_noise = ((class_ - group_mu) / (eps_std * torch.exp(0.5 * group_logvar))).view(n // 2, 2, 3)
    torch.testing.assert_close(class_noise[:, 1], class_noise[:, 0])  # one noise vector a group
    style_noise = (style - posteriors[0]) / torch.exp(0.5 * posteriors[1])
    tolerance = 6 / math.sqrt(n)  # 6 sigma of the sample std of n / 2 normals
    for noise in (class_noise[:, 0], style_noise):
        assert ((noise.std(0) - 1).abs() < tolerance).all() and (noise.mean(0).abs() < 2 * tolerance).all()


def test_sample_per_label_draws_distinct_images_of_each_label():
    labels = torch.arange(100) % 5
    picks = evaluation.sample_per_label(labels, [1, 3], 4, trials=6, generator=torch.Generator().manual_seed(0))
    assert picks.shape == (6, 2, 4)
    assert (labels[picks[:, 0]] == 1).all() and (labels[picks[:, 1]] == 3).all()
    assert all(len(set(row.tolist())) == 4 for row in picks.flatten(0, 1))
    first = evaluation.sample_per_label(labels, [2], 2)
    assert first.flatten().tolist() == [2, 7]


def test_sample_per_label_refuses_more_images_than_a_label_has():
    with pytest.raises(ValueError, match="label 1"):
        evaluation.sample_per_label(torch.tensor([0, 0, 1]), [1], 2, generator=torch.Generator())


def test_the_default_pixel_classifier_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(evaluation.default_judge_path(data_loader.DataSpec())).is_file()  # the shipped MNIST judge
    folder = evaluation.default_judge_path(data_loader.DataSpec("folder", str(tmp_path / "faces")))
    assert Path(folder).is_absolute() and Path(folder).name == "pixel_classifier_folder_faces.pt"
