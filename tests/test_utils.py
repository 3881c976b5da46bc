"""The ML-VAE math: evidence accumulation, grouped reparameterization, losses."""
import argparse
import math

import pytest
import torch

from utils import (ModelLoadError, accumulate_group_evidence, add_model_arguments, atomic_save,
                   class_kl_divergence, group_wise_reparameterize, kl_divergence, latent_layer, load_models,
                   reconstruction_loss, training_groups)


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


@pytest.mark.parametrize("class_kl_per_sample", [False, True])
@pytest.mark.parametrize("detach_class_posterior", [False, True])
def test_fused_latent_layer_matches_the_composed_one_in_values_gradients_and_noise(class_kl_per_sample,
                                                                                    detach_class_posterior):
    gen = torch.Generator().manual_seed(0)
    posteriors = [torch.randn(40, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    groups = torch.randint(0, 6, (40,), generator=gen) * 5  # ids need not be compact
    results = []
    for fused in (False, True):
        outputs = latent_layer(*posteriors, groups, 0.3, class_kl_per_sample, detach_class_posterior,
                               generator=torch.Generator().manual_seed(1), fused=fused)
        weights = [torch.randn(out.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
                   for k, out in enumerate(outputs)]
        loss = sum((out * weight).sum() for out, weight in zip(outputs, weights))
        grads = torch.autograd.grad(loss, posteriors, allow_unused=True)
        results.append((outputs, [torch.zeros_like(p) if g is None else g for p, g in zip(posteriors, grads)]))
    (composed, composed_grads), (fused, fused_grads) = results
    for want, got in zip(list(composed) + composed_grads, list(fused) + fused_grads):
        torch.testing.assert_close(got, want)
    assert (fused_grads[2] == 0).all() == detach_class_posterior


def test_fused_latent_layer_stays_finite_for_extreme_log_variances():
    mu = torch.zeros(4, 2, requires_grad=True)
    logvar = torch.tensor([[-200.0, 200.0], [200.0, -200.0], [-200.0, -200.0], [200.0, 200.0]], requires_grad=True)
    outputs = latent_layer(mu, torch.zeros(4, 2), mu, logvar, torch.tensor([0, 0, 1, 1]), 0.1,
                           generator=torch.Generator().manual_seed(0))
    sum(out.sum() for out in outputs[:2]).backward()
    assert all(torch.isfinite(out).all() for out in outputs[:2]) and torch.isfinite(logvar.grad).all()


def test_fused_latent_layer_passes_gradcheck():
    gen = torch.Generator().manual_seed(0)
    posteriors = tuple(torch.randn(12, 2, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(4))
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 4])
    # A fixed noise draw per call, so that the function gradcheck differentiates is deterministic.
    assert torch.autograd.gradcheck(
        lambda *p: latent_layer(*p, groups, 0.5, generator=torch.Generator().manual_seed(2)), posteriors)


def test_mse_loss_and_its_written_out_gradient_match_autograd():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.rand(6, 5, generator=gen, dtype=torch.float64)
    loss = reconstruction_loss(x, logits, None, "mse")
    plain = (torch.sigmoid(logits) - x).pow(2).sum()
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(plain, logits)[0])
    assert torch.autograd.gradcheck(lambda t: reconstruction_loss(x, t, None, "mse"), (logits,))


def test_atomic_save_leaves_no_temporary_file(tmp_path):
    atomic_save({"a": torch.ones(2)}, tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    assert torch.load(tmp_path / "x.pt", weights_only=True)["a"].sum() == 2


def model_args(*flags):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser.parse_args(list(flags))


def test_load_models_takes_the_settings_from_args_json(tiny_run):
    _, decoder, settings = load_models(model_args("--checkpoint-dir", str(tiny_run)), torch.device("cpu"))
    assert (settings.style_dim, settings.class_dim, settings.eps_std) == (6, 4, 0.5)
    assert settings.name == "tiny" and not decoder.training


def test_load_models_lets_a_flag_override_args_json(tiny_run):
    _, _, settings = load_models(model_args("--checkpoint-dir", str(tiny_run), "--eps-std", "1"), torch.device("cpu"))
    assert settings.eps_std == 1


def test_load_models_names_the_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path / "e.pt")):
        load_models(model_args("--encoder", str(tmp_path / "e.pt")), torch.device("cpu"))


def test_load_models_reports_the_dims_a_mismatched_file_holds(tiny_run):
    with pytest.raises(ModelLoadError, match="style dim 6, class dim 4"):
        load_models(model_args("--checkpoint-dir", str(tiny_run), "--style-dim", "3"), torch.device("cpu"))


def test_reference_weights_load_strict(reference_checkpoints):
    args = model_args("--encoder", str(reference_checkpoints / "encoder_1_var_reparam"),
                      "--decoder", str(reference_checkpoints / "decoder_1_var_reparam"))
    _, _, settings = load_models(args, torch.device("cpu"))
    assert settings.name == "encoder_1_var_reparam"


def test_training_groups_split_each_label_into_groups_of_at_most_the_size():
    labels = torch.tensor([3, 1, 3, 3, 1, 0, 3, 3])
    assert torch.equal(training_groups(labels), labels)
    groups = training_groups(labels, 2)
    members = {int(g): (labels[groups == g].unique().tolist(), int((groups == g).sum())) for g in groups.unique()}
    assert sorted(members.values()) == [([0], 1), ([1], 2), ([3], 1), ([3], 2), ([3], 2)]
    assert groups[0] == groups[2] and groups[3] == groups[6]  # batch order within a label
