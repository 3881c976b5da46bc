"""The ML-VAE math: evidence accumulation, grouped reparameterization, losses."""
import math

import pytest
import torch

from utils import (accumulate_group_evidence, class_kl_divergence, group_index, group_wise_reparameterize,
                   kl_divergence, latent_layer, num_training_groups, reconstruction_loss, training_groups)


def naive_product_of_gaussians(mu, logvar, groups):
    """Loop over groups with the textbook formula, in float64."""
    mu, var = mu.double(), logvar.double().exp()
    out_mu, out_logvar = torch.empty_like(mu), torch.empty_like(mu)
    for g in groups.unique():
        members = groups == g
        precision = (1.0 / var[members]).sum(0)
        out_mu[members] = (mu[members] / var[members]).sum(0) / precision
        out_logvar[members] = -precision.log()
    return out_mu, out_logvar


@pytest.mark.parametrize("num_groups", [1, 3, 10, 64])
def test_accumulation_equals_naive_product_of_gaussians(num_groups):
    gen = torch.Generator().manual_seed(num_groups)
    mu, logvar = torch.randn(64, 7, generator=gen), 2 * torch.randn(64, 7, generator=gen)
    groups = torch.randint(0, num_groups, (64,), generator=gen)
    got_mu, got_logvar = accumulate_group_evidence(mu, logvar, groups)
    want_mu, want_logvar = naive_product_of_gaussians(mu, logvar, groups)
    torch.testing.assert_close(got_mu.double(), want_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_logvar.double(), want_logvar, rtol=1e-5, atol=1e-5)


def test_fixed_size_index_with_empty_groups_equals_the_naive_product_and_keeps_gradients_finite():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(64, 7, generator=gen, requires_grad=True)
    logvar = (2 * torch.randn(64, 7, generator=gen)).requires_grad_()
    groups = torch.randint(0, 5, (64,), generator=gen) * 2  # ids 0, 2, 4, 6, 8 of [0, 12): 7 groups empty
    index = group_index(groups, num_groups=12)
    assert index[1].tolist() == torch.bincount(groups, minlength=12).tolist()
    got_mu, got_logvar = accumulate_group_evidence(mu, logvar, groups, index)
    want_mu, want_logvar = naive_product_of_gaussians(mu, logvar, groups)
    torch.testing.assert_close(got_mu.double(), want_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_logvar.double(), want_logvar, rtol=1e-5, atol=1e-5)
    (got_mu.sum() + got_logvar.sum() + class_kl_divergence(got_mu, got_logvar, groups, index=index)).backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(logvar.grad).all()


def test_empty_groups_of_a_fixed_size_index_change_no_value_and_no_gradient_of_the_others():
    gen = torch.Generator().manual_seed(1)
    groups = torch.randint(0, 5, (256,), generator=gen) * 2  # 5 of the 10 slots empty
    results = []
    for index in (group_index(groups), group_index(groups, num_groups=10)):  # compact: no empty slot
        mu = torch.randn(256, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
        logvar = (3 * torch.randn(256, 7, generator=torch.Generator().manual_seed(2))).requires_grad_()
        group_mu, group_logvar = accumulate_group_evidence(mu, logvar, groups, index)
        loss = (group_mu * torch.arange(7.0)).sum() + group_logvar.pow(2).sum()
        results.append((group_mu, group_logvar, *torch.autograd.grad(loss, [mu, logvar])))
    assert all(torch.equal(compact, fixed) for compact, fixed in zip(*results))  # bitwise


def test_empty_groups_compute_no_nan_under_anomaly_detection():
    mu = torch.randn(6, 3, requires_grad=True)
    logvar = torch.randn(6, 3, requires_grad=True)
    groups = torch.tensor([0, 0, 3, 3, 3, 7])
    index = group_index(groups, num_groups=10)
    with torch.autograd.detect_anomaly():
        _, _, _, class_kl = latent_layer(torch.zeros(6, 2), torch.zeros(6, 2), mu, logvar, groups, 0.1, index=index,
                                         noise=(torch.randn(6, 2), torch.randn(10, 3)))
        class_kl.backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(logvar.grad).all() and mu.grad.abs().sum() > 0


def test_given_noise_is_the_noise_used():
    mu, logvar = torch.zeros(4, 3), torch.zeros(4, 3)
    eps = torch.randn(6, 3)
    z = group_wise_reparameterize(mu, logvar, torch.tensor([5, 5, 0, 2]), 0.5, index=group_index(
        torch.tensor([5, 5, 0, 2]), num_groups=6), eps=eps)
    torch.testing.assert_close(z, 0.5 * eps[[5, 5, 0, 2]])


def test_group_of_one_gives_its_own_posterior_back():
    mu, logvar = torch.randn(5, 4), torch.randn(5, 4)
    got_mu, got_logvar = accumulate_group_evidence(mu, logvar, torch.arange(5) * 7)
    torch.testing.assert_close(got_mu, mu)
    torch.testing.assert_close(got_logvar, logvar)


def test_accumulation_is_finite_for_extreme_logvars():
    logvar = torch.tensor([[-30.0, 30.0], [30.0, -30.0], [-30.0, -30.0], [30.0, 30.0]])
    mu = torch.tensor([[1.0, -2.0], [3.0, 4.0], [-5.0, 6.0], [7.0, 8.0]])
    group_mu, group_logvar = accumulate_group_evidence(mu, logvar, torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(group_mu).all() and torch.isfinite(group_logvar).all()
    # The precise member dominates: its mean wins.
    torch.testing.assert_close(group_mu[0], torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(group_logvar[2], torch.tensor([-30.0, -30.0]))


def test_gradients_reach_class_mu_and_logvar():
    mu = torch.randn(8, 3, requires_grad=True)
    logvar = torch.randn(8, 3, requires_grad=True)
    group_mu, group_logvar = accumulate_group_evidence(mu, logvar, torch.tensor([0, 0, 0, 1, 1, 2, 2, 2]))
    (group_mu.square().sum() + group_logvar.sum()).backward()
    assert mu.grad.abs().sum() > 0 and logvar.grad.abs().sum() > 0


def test_grouped_noise_is_shared_inside_a_group_and_differs_across_groups():
    mu, logvar = torch.zeros(6, 4), torch.zeros(6, 4)
    groups = torch.tensor([3, 3, 5, 5, 5, 9])
    z = group_wise_reparameterize(mu, logvar, groups, eps_std=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z[0], z[1])
    torch.testing.assert_close(z[2], z[4])
    assert not torch.allclose(z[0], z[2]) and not torch.allclose(z[2], z[5])


def test_grouped_noise_scales_with_each_members_std():
    mu, logvar = torch.zeros(2, 3), torch.log(torch.tensor([[1.0] * 3, [4.0] * 3]))
    z = group_wise_reparameterize(mu, logvar, torch.tensor([0, 0]), eps_std=0.5,
                                  generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z[1], 2 * z[0])


@pytest.mark.parametrize("eps_std", [0.1, 1.0])
def test_grouped_noise_has_the_asked_std(eps_std):
    n = 20000  # groups; the sample std of n normals has std eps_std / sqrt(2n) ~ 0.005 * eps_std
    z = group_wise_reparameterize(torch.zeros(n, 1), torch.zeros(n, 1), torch.arange(n), eps_std,
                                  generator=torch.Generator().manual_seed(2))
    assert abs(z.std().item() - eps_std) < 6 * eps_std / math.sqrt(2 * n)
    assert abs(z.mean().item()) < 6 * eps_std / math.sqrt(n)


def test_grouped_reparameterize_returns_mu_when_not_training():
    mu = torch.randn(4, 2)
    assert group_wise_reparameterize(mu, torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]), 0.1,
                                     training=False) is mu


def test_kl_is_zero_at_the_prior_and_matches_the_closed_form():
    assert kl_divergence(torch.zeros(3, 5), torch.zeros(3, 5)).abs().max() == 0
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    want = 0.5 * 1.0 + 0.5 * (2.0 - 1.0 - math.log(2.0))
    torch.testing.assert_close(kl_divergence(mu, logvar), torch.tensor([want]))


def test_class_kl_once_per_group_versus_once_per_member():
    mu, logvar = torch.ones(5, 2), torch.zeros(5, 2)  # KL of each row = 1
    groups = torch.tensor([0, 0, 0, 1, 1])
    assert class_kl_divergence(mu, logvar, groups).item() == pytest.approx(2.0)
    assert class_kl_divergence(mu, logvar, groups, per_sample=True).item() == pytest.approx(5.0)


def test_reconstruction_losses():
    x = torch.tensor([[0.0, 1.0, 0.5]])
    logits = torch.zeros(1, 3)  # sigmoid = 0.5
    assert reconstruction_loss(x, logits, None, "mse").item() == pytest.approx(0.5)
    assert reconstruction_loss(x, logits, None, "bernoulli").item() == pytest.approx(3 * math.log(2))
    gaussian = reconstruction_loss(x, logits, torch.zeros(1, 3), "gaussian").item()
    assert gaussian == pytest.approx(0.5 * (3 * math.log(2 * math.pi) + 0.5))


def test_latent_layer_stays_finite_for_extreme_log_variances():
    mu = torch.zeros(4, 2, requires_grad=True)
    logvar = torch.tensor([[-200.0, 200.0], [200.0, -200.0], [-200.0, -200.0], [200.0, 200.0]], requires_grad=True)
    outputs = latent_layer(mu, torch.zeros(4, 2), mu, logvar, torch.tensor([0, 0, 1, 1]), 0.1,
                           generator=torch.Generator().manual_seed(0))
    sum(out.sum() for out in outputs[:2]).backward()
    assert all(torch.isfinite(out).all() for out in outputs[:2]) and torch.isfinite(logvar.grad).all()


def test_latent_layer_passes_gradcheck():
    gen = torch.Generator().manual_seed(0)
    posteriors = tuple(torch.randn(12, 2, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(4))
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 4])
    # A fixed noise draw per call, so that the function gradcheck differentiates is deterministic.
    assert torch.autograd.gradcheck(
        lambda *p: latent_layer(*p, groups, 0.5, generator=torch.Generator().manual_seed(2)), posteriors)


def test_training_groups_split_each_label_into_groups_of_at_most_the_size():
    labels = torch.tensor([3, 1, 3, 3, 1, 0, 3, 3])
    assert torch.equal(training_groups(labels), labels)
    groups = training_groups(labels, 2)
    members = {int(g): (labels[groups == g].unique().tolist(), int((groups == g).sum())) for g in groups.unique()}
    assert sorted(members.values()) == [([0], 1), ([1], 2), ([3], 1), ([3], 2), ([3], 2)]
    assert groups[0] == groups[2] and groups[3] == groups[6]  # batch order within a label
    assert groups.max() < num_training_groups(4, len(labels), 2)  # ids fit the fixed-size index
