"""Test-time evidence: evidence sets are drawn correctly and more evidence helps where it must."""
import torch

from evaluation import draw_evidence_sets
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
