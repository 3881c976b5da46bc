"""Test-time evidence: evidence sets are drawn correctly, more evidence helps where it must, and each probe
learns from the training codes and is scored on codes fused over K test images."""
import torch
from torch import nn

from evaluation import draw_evidence_sets
from studies.group_size import PROBES, accuracy_by_group_size
from utils import fused_means


def test_evidence_sets_hold_the_query_and_distinct_others_of_its_label():
    labels = torch.arange(10).repeat(30)
    members = draw_evidence_sets(labels, 8, torch.Generator().manual_seed(0))
    assert members.shape == (300, 8)
    assert torch.equal(members[:, 0], torch.arange(300))
    assert (labels[members] == labels.unsqueeze(1)).all()
    assert all(len(set(row.tolist())) == 8 for row in members)


def test_accuracy_grows_with_the_number_of_fused_images_on_noisy_codes():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(200)
    mu = 2.0 * torch.eye(10)[labels] + 1.5 * torch.randn(len(labels), 10, generator=gen)
    logvar = torch.zeros_like(mu)
    accuracies = []
    for k in (1, 2, 4, 8, 16, 32):
        z = fused_means(mu, logvar, draw_evidence_sets(labels, k, gen))
        accuracies.append((z.argmax(1) == labels).float().mean().item())
    assert accuracies == sorted(accuracies)
    assert accuracies[0] < 0.6 and accuracies[-1] > 0.99


def test_fused_mean_weights_the_precise_member():
    mu = torch.tensor([[0.0], [10.0]])
    logvar = torch.log(torch.tensor([[1.0], [1e-4]]))
    z = fused_means(mu, logvar, torch.tensor([[0, 1]]))
    assert abs(z.item() - 10.0) < 0.01


def test_validation_split_of_a_model_that_trained_on_all_images_of_its_classes_is_refused(start_script):
    run = "checkpoints/mlvae_eps0.1_classes01234567"  # all train images of digits 0-7, validation ones included
    process = start_script("studies.group_size", "--checkpoint-dir", run, "--split", "validation",
                           "--group-sizes", "1")
    assert process.wait() == 2
    [line] = process.stderr.splitlines()
    assert line.startswith(f"error: --split validation: {run} trained on mnist train images of --classes "
                           "0 1 2 3 4 5 6 7 up to index") and "--split test" in line, line


class CodeAsLogits(nn.Module):
    """A stand-in for the trained MLP probe: it labels a code by its largest coordinate."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z


def codes(labels: torch.Tensor, noise: float, gen: torch.Generator, shift: int = 0) -> torch.Tensor:
    """Class codes: 2 at coordinate (label + shift) % 10, plus Gaussian noise of std `noise`."""
    return 2.0 * torch.eye(10)[(labels + shift) % 10] + noise * torch.randn(len(labels), 10, generator=gen)


def test_every_probes_accuracy_grows_with_the_number_of_fused_test_images():
    gen = torch.Generator().manual_seed(1)
    train_y, test_y = torch.arange(10).repeat(100), torch.arange(10).repeat(100)
    test_mu = codes(test_y, 1.5, gen)
    accuracies = accuracy_by_group_size(codes(train_y, 0.5, gen), train_y, test_mu, torch.zeros_like(test_mu), test_y,
                                        CodeAsLogits(), [1, 4, 16], gen)
    for probe in PROBES:
        assert accuracies[probe] == sorted(accuracies[probe])
        assert accuracies[probe][0] < 70 and accuracies[probe][-1] > 95


def test_the_sklearn_probes_are_fitted_on_the_training_codes():
    # The training codes put each digit one coordinate further than the test codes do: a probe fitted on them
    # names the previous digit on every test image.
    gen = torch.Generator().manual_seed(2)
    train_y, test_y = torch.arange(10).repeat(100), torch.arange(10).repeat(100)
    test_mu = codes(test_y, 0.3, gen)
    accuracies = accuracy_by_group_size(codes(train_y, 0.3, gen, shift=1), train_y, test_mu, torch.zeros_like(test_mu),
                                        test_y, CodeAsLogits(), [1, 8], gen)
    assert max(accuracies["logistic"] + accuracies["knn"]) < 5
    assert min(accuracies["mlp"]) > 95  # the given MLP probe scores the test codes as they are
