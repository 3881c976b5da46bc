"""The ML-VAE math as pure tensor functions (Bouchacourt, Tomioka, Nowozin, AAAI-18, arXiv 1705.08841).

Group evidence accumulation (a product of Gaussians), the grouped and the per-sample
reparameterizations, the KL to N(0, I) and the reconstruction likelihoods. Only torch is imported;
nothing here owns state: devices and random generators are passed in.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)

# (group id per sample in [0, G) [B], group sizes [G]), as returned by group_index.
GroupIndex = tuple[torch.Tensor, torch.Tensor]


def group_index(groups: torch.Tensor, num_groups: int | None = None) -> GroupIndex:
    """Map integer group ids [B] to (ids in [0, G) [B], group sizes [G]).

    Arbitrary ids are made compact by torch.unique, whose output size depends on the data. With
    `num_groups`, the ids must already lie in [0, num_groups): the index then has a fixed size G =
    num_groups, an empty group has size 0 and is never read, and no device sync is needed, so that a
    compiled training step is one graph. The grouped functions below take the result as `index=`, so
    a training step groups its batch once.
    """
    if num_groups is None:
        _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
        return inverse, counts
    counts = torch.zeros(num_groups, dtype=groups.dtype, device=groups.device)
    return groups, counts.index_add(0, groups, torch.ones_like(groups))


def rank_within_groups(labels: torch.Tensor) -> torch.Tensor:
    """Each row's position [N] among the rows of its label, in row order (0 for a label's first row)."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels), device=labels.device) - starts[labels[order]]
    return rank


def training_groups(labels: torch.Tensor, group_size: int | None = None, batch_size: int | None = None
                    ) -> torch.Tensor:
    """Group ids [B] of a batch: one group per label (the paper), or with `group_size`, each label's
    images split in batch order into groups of at most `group_size`. The ids lie in
    [0, num_training_groups(num_classes, B, group_size)) for labels in [0, num_classes).

    With `batch_size` (and no `group_size`) the rows are consecutive batches of that size, as an
    evaluation lays a whole split out: one group per (batch, label), so that evidence accumulated over
    the split equals accumulating batch by batch, grouped by label, without a loop over batches.
    """
    if batch_size is not None:
        if group_size is not None:
            raise ValueError("training_groups takes batch_size or group_size, not both")
        batch = torch.arange(len(labels), device=labels.device) // batch_size
        return batch * (int(labels.max()) + 1) + labels
    if group_size is None:
        return labels
    return labels * math.ceil(len(labels) / group_size) + rank_within_groups(labels) // group_size


def num_training_groups(num_classes: int, batch_size: int, group_size: int | None = None) -> int:
    """How many group ids training_groups can give a batch: the size of its fixed group index."""
    return num_classes if group_size is None else num_classes * math.ceil(batch_size / group_size)


def accumulate_group_evidence(class_mu: torch.Tensor, class_logvar: torch.Tensor, groups: torch.Tensor,
                              index: GroupIndex | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse the class posteriors of each group into one Gaussian (a product of Gaussians, paper eq. 7).

    For a group g with members i: precision_g = sum_i exp(-logvar_i) and
    mu_g = sum_i mu_i exp(-logvar_i) / precision_g. Returns per-sample rows [B, D] holding the posterior
    (mean, log-variance) of each sample's group.

    An empty group of a fixed-size index (no member: no evidence) gets the prior N(0, I) in its own
    row, which no sample reads, so that every value and every gradient stays finite (0/0 and log 0
    otherwise) and torch.autograd.detect_anomaly() can watch a training step.
    """
    inverse, counts = group_index(groups) if index is None else index
    num_groups, dim = counts.numel(), class_mu.shape[1]
    empty = (counts == 0).unsqueeze(1)
    log_precision = -class_logvar
    # Subtracting each group's largest log-precision (a constant, hence detached) keeps exp() finite
    # for any log-variance: a log-sum-exp.
    shift = class_mu.new_full((num_groups, dim), -math.inf).scatter_reduce(
        0, inverse.unsqueeze(1).expand_as(class_mu), log_precision.detach(), reduce="amax").masked_fill(empty, 0.0)
    weight = torch.exp(log_precision - shift.index_select(0, inverse))
    precision = class_mu.new_zeros(num_groups, dim).index_add(0, inverse, weight).masked_fill(empty, 1.0)
    group_mu = class_mu.new_zeros(num_groups, dim).index_add(0, inverse, weight * class_mu) / precision
    group_logvar = -(torch.log(precision) + shift)
    return group_mu.index_select(0, inverse), group_logvar.index_select(0, inverse)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, training: bool = True,
                   generator: torch.Generator | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
    """z = mu + std * eps with one eps ~ N(0, I) per sample (Kingma & Welling 2014); `mu` in eval.

    `eps` [B, D] is drawn from `generator` unless given.
    """
    if not training:
        return mu
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + eps * torch.exp(0.5 * logvar)


def group_wise_reparameterize(mu: torch.Tensor, logvar: torch.Tensor, groups: torch.Tensor,
                              eps_std: float, training: bool = True,
                              generator: torch.Generator | None = None,
                              index: GroupIndex | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
    """z_i = mu_i + std_i * eps_std * eps_g(i) with one eps_g ~ N(0, I) per group, shared by its members.

    eps_std = 1 is the textbook sample; the reference found the decoder ignores the class code unless
    eps_std is small (0.1). `eps` [G, D] is drawn from `generator` unless given. Returns `mu` when not
    training.
    """
    if not training:
        return mu
    inverse, counts = group_index(groups) if index is None else index
    if eps is None:
        eps = torch.randn((counts.numel(), mu.shape[1]), generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + eps_std * eps.index_select(0, inverse) * torch.exp(0.5 * logvar)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row [B] (Kingma & Welling 2014, appendix B):
    -1/2 * sum_d (1 + logvar - mu^2 - exp(logvar))."""
    return -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def class_kl_divergence(group_mu: torch.Tensor, group_logvar: torch.Tensor, groups: torch.Tensor,
                        per_sample: bool = False, index: GroupIndex | None = None) -> torch.Tensor:
    """Summed KL of the accumulated class posteriors, given as per-sample rows [B, D].

    The paper counts it once per group (each row weighted by 1/group size); the reference counts it
    once per member (`per_sample=True`), which pulls large groups harder towards the prior.
    """
    kl = kl_divergence(group_mu, group_logvar)
    if per_sample:
        return kl.sum()
    inverse, counts = group_index(groups) if index is None else index
    return (kl / counts.index_select(0, inverse).to(kl.dtype)).sum()


def latent_layer(style_mu: torch.Tensor, style_logvar: torch.Tensor, class_mu: torch.Tensor,
                 class_logvar: torch.Tensor, groups: torch.Tensor, eps_std: float,
                 class_kl_per_sample: bool = False, detach_class_posterior: bool = False,
                 generator: torch.Generator | None = None, index: GroupIndex | None = None,
                 noise: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The latent layer of one training batch, from the encoder's posteriors to the decoder's codes:
    (style sample [B, S], its group's class sample [B, C], summed style KL, summed class KL).

    `detach_class_posterior` is the reference's departure from the paper: no gradient reaches the
    class heads. `noise` = (style eps [B, S], class eps [G, C]), standard normal, is drawn from
    `generator` (style first) unless given.
    """
    style_eps, class_eps = (None, None) if noise is None else noise
    index = group_index(groups) if index is None else index
    if detach_class_posterior:
        class_mu, class_logvar = class_mu.detach(), class_logvar.detach()
    group_mu, group_logvar = accumulate_group_evidence(class_mu, class_logvar, groups, index)
    style_z = reparameterize(style_mu, style_logvar, generator=generator, eps=style_eps)
    class_z = group_wise_reparameterize(group_mu, group_logvar, groups, eps_std, generator=generator, index=index,
                                        eps=class_eps)
    style_kl = kl_divergence(style_mu, style_logvar).sum()
    class_kl = class_kl_divergence(group_mu, group_logvar, groups, per_sample=class_kl_per_sample, index=index)
    return style_z, class_z, style_kl, class_kl


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


def fused_posteriors(mu: torch.Tensor, logvar: torch.Tensor, members: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log-variance) [N, D] of the product of Gaussians over each row of `members` [N, K] (row
    indices into mu and logvar), i.e. evidence accumulated over K images per query."""
    n, k = members.shape
    groups = torch.arange(n, device=mu.device).repeat_interleave(k)
    flat = members.reshape(-1)
    group_mu, group_logvar = accumulate_group_evidence(mu[flat], logvar[flat], groups)
    return group_mu.view(n, k, -1)[:, 0], group_logvar.view(n, k, -1)[:, 0]


def fused_means(mu: torch.Tensor, logvar: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Posterior mean [N, D] of the product of Gaussians over each row of `members` [N, K]."""
    return fused_posteriors(mu, logvar, members)[0]
