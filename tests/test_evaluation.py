"""evaluation.py: the per-label sampler, evidence sets and the latent-classifier recipe."""
import pytest
import torch

import evaluation


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


def planted_posteriors(n: int, signal: float, gen: torch.Generator):
    """Style means carry the label in their first coordinate; class means are pure noise."""
    labels = torch.randint(0, 10, (n,), generator=gen)
    style_mu = torch.randn(n, 4, generator=gen)
    style_mu[:, 0] += signal * labels
    tiny = torch.full((n, 4), -20.0)  # near-zero variance: samples equal the means
    return (style_mu, tiny, torch.randn(n, 4, generator=gen), tiny), labels


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
