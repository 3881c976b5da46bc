"""The ML-VAE math as pure tensor functions (Bouchacourt, Tomioka, Nowozin, AAAI-18, arXiv 1705.08841).

Group evidence accumulation, the grouped and per-sample reparameterizations, the KL to N(0, I) and the
reconstruction losses. Nothing here owns state: devices and random generators are passed in.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


def group_index(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map arbitrary integer group ids [B] to (compact ids in [0, G) [B], group sizes [G])."""
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    return inverse, counts


def accumulate_group_evidence(class_mu: torch.Tensor, class_logvar: torch.Tensor,
                              groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse the class posteriors of each group into one Gaussian (a product of Gaussians, paper eq. 7).

    For a group g with members i: precision_g = sum_i exp(-logvar_i) and
    mu_g = sum_i mu_i exp(-logvar_i) / precision_g. Returns per-sample rows [B, D] holding the posterior
    (mean, log-variance) of each sample's group.

    The precisions are computed relative to the largest one in each group (a log-sum-exp), so the
    result stays finite for any log-variance; the shift is exact and carries no gradient.
    """
    inverse, counts = group_index(groups)
    num_groups, dim = counts.numel(), class_mu.shape[1]
    log_precision = -class_logvar
    index = inverse.unsqueeze(1).expand(-1, dim)
    shift = torch.full((num_groups, dim), -math.inf, dtype=class_mu.dtype, device=class_mu.device)
    shift = shift.scatter_reduce(0, index, log_precision.detach(), reduce="amax", include_self=True)
    weight = torch.exp(log_precision - shift[inverse])
    precision = torch.zeros_like(shift).index_add(0, inverse, weight)
    weighted_mu = torch.zeros_like(shift).index_add(0, inverse, weight * class_mu)
    group_mu = weighted_mu / precision
    group_logvar = -(torch.log(precision) + shift)
    return group_mu[inverse], group_logvar[inverse]


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, training: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + std * eps with one eps ~ N(0, I) per sample (Kingma & Welling 2014); `mu` in eval."""
    if not training:
        return mu
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + eps * torch.exp(0.5 * logvar)


def group_wise_reparameterize(mu: torch.Tensor, logvar: torch.Tensor, groups: torch.Tensor,
                              eps_std: float, training: bool = True,
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """z_i = mu_i + std_i * eps_g(i) with one eps_g ~ N(0, eps_std^2 I) per group, shared by its members.

    eps_std = 1 is the textbook sample; the reference found the decoder ignores the class code unless
    eps_std is small (0.1). Returns `mu` when not training.
    """
    if not training:
        return mu
    inverse, counts = group_index(groups)
    eps = torch.randn((counts.numel(), mu.shape[1]), generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + eps_std * eps[inverse] * torch.exp(0.5 * logvar)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row [B] (Kingma & Welling 2014, appendix B):
    -1/2 * sum_d (1 + logvar - mu^2 - exp(logvar))."""
    return -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def class_kl_divergence(group_mu: torch.Tensor, group_logvar: torch.Tensor, groups: torch.Tensor,
                        per_sample: bool = False) -> torch.Tensor:
    """Summed KL of the accumulated class posteriors, given as per-sample rows [B, D].

    The paper counts it once per group (each row weighted by 1/group size); the reference counts it
    once per member (`per_sample=True`), which pulls large groups harder towards the prior.
    """
    kl = kl_divergence(group_mu, group_logvar)
    if per_sample:
        return kl.sum()
    inverse, counts = group_index(groups)
    return (kl / counts[inverse].to(kl.dtype)).sum()


def reconstruction_loss(x: torch.Tensor, logits: torch.Tensor, pixel_logvar: torch.Tensor | None,
                        likelihood: str) -> torch.Tensor:
    """Summed negative log-likelihood of images x [B, 784] in [0, 1] given decoder logits [B, 784].

    mse: sum (sigmoid(logits) - x)^2, the reference's fixed-variance loss.
    bernoulli: summed binary cross-entropy.
    gaussian: sum 1/2 (log 2 pi + logvar + (x - sigmoid(logits))^2 / exp(logvar)), with the decoder's
    learned per-pixel log-variance (the paper's first author's corrected fork).
    """
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    squared_error = (torch.sigmoid(logits) - x).pow(2)
    if likelihood == "mse":
        return squared_error.sum()
    if likelihood == "gaussian":
        return 0.5 * torch.sum(LOG_2PI + pixel_logvar + squared_error * torch.exp(-pixel_logvar))
    raise ValueError(f"unknown likelihood {likelihood!r}")


def atomic_save(obj: object, path: str | Path) -> None:
    """torch.save to a temporary file, then rename: a crash mid-save never leaves a broken file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def pick_device(name: str = "auto") -> torch.device:
    """'auto' means CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
