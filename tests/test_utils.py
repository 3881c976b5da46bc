"""The ML-VAE math: evidence accumulation, grouped reparameterization, losses."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from conftest import naive_product_of_gaussians, prior_kl
from utils import (accumulate_group_evidence, class_kl_divergence, fused_means, fused_posteriors, group_index,
                   group_wise_reparameterize, kl_divergence, latent_layer, num_training_groups,
                   reconstruction_loss, reparameterize, training_groups)


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


def test_samples_spread_with_the_posterior_std():
    n = 20000  # the sample std of n normals is within 6 / sqrt(2n) ~ 3% of the std, but for 1 in 10^9
    logvar = torch.tensor([-6.0, -1.0, 0.0, 1.5, 4.0]).expand(n, 5)
    z = reparameterize(torch.full((n, 5), 3.0), logvar, generator=torch.Generator().manual_seed(0))
    std = torch.exp(0.5 * logvar[0])
    assert ((z.std(0) / std - 1).abs() < 6 / math.sqrt(2 * n)).all()
    assert ((z.mean(0) - 3.0).abs() < 6 * std / math.sqrt(n)).all()


def test_reparameterize_returns_mu_when_not_training():
    mu = torch.randn(4, 2)
    assert reparameterize(mu, torch.zeros(4, 2), training=False) is mu


@pytest.mark.parametrize("eps_std", [0.1, 1.0])
def test_grouped_samples_are_one_noise_per_group_times_eps_std_and_each_members_std(eps_std):
    num_groups = 10000
    gen = torch.Generator().manual_seed(3)
    groups = torch.arange(num_groups).repeat_interleave(3)  # three members a group
    # Columns of different log-variances; each member of a group shifted by its own offset.
    logvar = torch.tensor([-4.0, -1.0, 0.0, 2.0], dtype=torch.float64) + torch.tensor(
        [0.0, 1.0, -2.0], dtype=torch.float64).repeat(num_groups).unsqueeze(1)
    mu = torch.randn(len(groups), 4, generator=gen, dtype=torch.float64)
    z = group_wise_reparameterize(mu, logvar, groups, eps_std, generator=gen)
    noise = ((z - mu) / (eps_std * torch.exp(0.5 * logvar))).view(num_groups, 3, 4)  # what each member drew
    torch.testing.assert_close(noise[:, 1], noise[:, 0])
    torch.testing.assert_close(noise[:, 2], noise[:, 0])
    assert ((noise[:, 0].std(0) - 1).abs() < 6 / math.sqrt(2 * num_groups)).all()
    assert (noise[:, 0].mean(0).abs() < 6 / math.sqrt(num_groups)).all()


def test_kl_equals_torch_distributions_for_any_posterior():
    gen = torch.Generator().manual_seed(4)
    mu = 3 * torch.randn(50, 6, generator=gen, dtype=torch.float64)
    logvar = 2 * torch.randn(50, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(kl_divergence(mu, logvar), prior_kl(mu, logvar))


def test_reconstruction_losses_are_the_summed_negative_log_likelihoods():
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(4, 784, generator=gen, dtype=torch.float64)
    logits = 3 * torch.randn(4, 784, generator=gen, dtype=torch.float64)
    pixel_logvar = 2 * torch.randn(4, 784, generator=gen, dtype=torch.float64)
    mean = torch.sigmoid(logits)
    torch.testing.assert_close(reconstruction_loss(x, logits, None, "mse"), F.mse_loss(mean, x, reduction="sum"))
    bernoulli = -(x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)).sum()
    torch.testing.assert_close(reconstruction_loss(x, logits, None, "bernoulli"), bernoulli)
    gaussian = -Normal(mean, torch.exp(0.5 * pixel_logvar)).log_prob(x).sum()
    torch.testing.assert_close(reconstruction_loss(x, logits, pixel_logvar, "gaussian"), gaussian)


@pytest.mark.parametrize("per_sample", [False, True])
def test_latent_layer_samples_and_kls_come_from_the_accumulated_class_posterior(per_sample):
    gen = torch.Generator().manual_seed(6)
    style_mu, style_logvar = (torch.randn(12, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    class_mu, class_logvar = (torch.randn(12, 2, generator=gen, dtype=torch.float64) for _ in range(2))
    groups = torch.tensor([4, 4, 4, 0, 0, 7, 2, 2, 2, 2, 9, 9])
    noise = torch.randn(12, 3, generator=gen, dtype=torch.float64), torch.randn(10, 2, generator=gen,
                                                                               dtype=torch.float64)
    style_z, class_z, style_kl, class_kl = latent_layer(
        style_mu, style_logvar, class_mu, class_logvar, groups, 0.3, class_kl_per_sample=per_sample,
        index=group_index(groups, num_groups=10), noise=noise)
    group_mu, group_logvar = naive_product_of_gaussians(class_mu, class_logvar, groups)
    torch.testing.assert_close(style_z, style_mu + noise[0] * torch.exp(0.5 * style_logvar))
    torch.testing.assert_close(class_z, group_mu + 0.3 * noise[1][groups] * torch.exp(0.5 * group_logvar))
    torch.testing.assert_close(style_kl, prior_kl(style_mu, style_logvar).sum())
    row_kl = prior_kl(group_mu, group_logvar)
    first_of_each_group = [int((groups == g).nonzero()[0]) for g in groups.unique()]
    torch.testing.assert_close(class_kl, row_kl.sum() if per_sample else row_kl[first_of_each_group].sum())


@pytest.mark.parametrize("batch,size", [(6, 4), (64, 3), (50, 7), (16, 16), (9, 1)])
def test_training_groups_hold_one_label_each_and_fit_the_fixed_index(batch, size):
    gen = torch.Generator().manual_seed(batch)
    # Most images of one label: the split that crowds the id space most.
    skewed = torch.tensor([0.6] + [0.4 / 9] * 9)
    for labels in (torch.tensor([0] * (batch - 1) + [1]), torch.multinomial(skewed, batch, True, generator=gen)):
        groups = training_groups(labels, size)
        for g in groups.unique():
            members = labels[groups == g]
            assert len(members.unique()) == 1 and len(members) <= size
        for label, count in zip(*labels.unique(return_counts=True)):
            assert len(groups[labels == label].unique()) == math.ceil(int(count) / size)
        assert groups.min() >= 0 and groups.max() < num_training_groups(10, batch, size)


def test_fused_means_are_the_product_of_gaussians_over_each_row_of_members():
    gen = torch.Generator().manual_seed(7)
    mu, logvar = torch.randn(20, 3, generator=gen), torch.randn(20, 3, generator=gen)
    members = torch.stack([torch.randperm(20, generator=gen)[:4] for _ in range(6)])
    want = torch.stack([naive_product_of_gaussians(mu[row], logvar[row], torch.zeros(4))[0][0] for row in members])
    torch.testing.assert_close(fused_means(mu, logvar, members).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("detach", [False, True])
def test_detached_class_posterior_passes_no_gradient_to_the_class_heads(detach):
    gen = torch.Generator().manual_seed(8)
    posteriors = [torch.randn(6, 2, generator=gen, requires_grad=True) for _ in range(4)]
    outputs = latent_layer(*posteriors, torch.tensor([0, 0, 1, 1, 1, 2]), 0.5, detach_class_posterior=detach,
                           generator=gen)
    sum(out.square().sum() for out in outputs).backward()
    assert all(p.grad.abs().sum() > 0 for p in posteriors[:2])  # the style posterior always learns
    for p in posteriors[2:]:
        assert (p.grad is None) if detach else p.grad.abs().sum() > 0


def test_fused_posteriors_are_the_product_of_gaussians():
    mu = torch.tensor([[0.0], [2.0], [5.0]])
    logvar = torch.log(torch.tensor([[1.0], [1.0], [4.0]]))
    mean, fused_logvar = fused_posteriors(mu, logvar, torch.tensor([[0, 1], [0, 2]]))
    assert mean[:, 0].tolist() == pytest.approx([1.0, (0.0 + 5.0 / 4) / 1.25])
    assert torch.exp(fused_logvar)[:, 0].tolist() == pytest.approx([0.5, 1 / 1.25])
