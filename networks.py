"""The ML-VAE networks for 28x28 images: encoder with style and class heads, decoder, latent classifier.

Architecture and state_dict keys are the reference implementation's, so its published weights load
strict: `Encoder(10, 10).load_state_dict(torch.load(path, weights_only=True))`.

    encoder: x(784) -> Linear 500 -> tanh -> {style_mu, style_logvar, class_mu, class_logvar} (Linear 500 -> dim)
    decoder: cat(style, class) -> Linear 500 -> tanh -> Linear 784 -> sigmoid

`--arch conv` swaps in the cycle-consistent VAE's MNIST networks (Jha et al., ECCV 2018; code
ananyahjha93/cycle-consistent-vae, networks.py) with ML-VAE's four Gaussian heads kept:

    encoder: x(1x28x28) -> [Conv 5x5 s2 p1 -> InstanceNorm -> ReLU] x3 (16, 32, 64 ch: 13, 6, 2 px)
             -> 256 -> {style_mu, style_logvar, class_mu, class_logvar} (Linear 256 -> dim)
    decoder: style -> Linear 256, class -> Linear 256 (each LeakyReLU 0.2) -> cat -> 128x2x2
             -> [ConvT 4x4 s2 -> InstanceNorm -> LeakyReLU 0.2] x2 (32, 16 ch: 6, 14 px)
             -> ConvT 4x4 s2 p1 (1 ch: 28 px) -> sigmoid
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PIXELS = 28 * 28
HIDDEN = 500
LIKELIHOODS = ("mse", "bernoulli", "gaussian")
ARCHS = ("mlp", "conv")
CONV_FEATURES = 64 * 2 * 2  # the conv encoder's features, and each code's width in the conv decoder
# The learned per-pixel log-variance of the gaussian likelihood is squashed into [-BOUND, BOUND].
PIXEL_LOGVAR_BOUND = 5.0


def init_reference_(module: nn.Module) -> None:
    """The reference's initialisation: every Linear weight N(0, 0.05), every bias 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, 0.05)
            nn.init.zeros_(layer.bias)


def add_gaussian_heads(encoder: nn.Module, features: int, style_dim: int, class_dim: int) -> None:
    """The four posterior heads (Linear features -> dim), under the reference's state_dict names."""
    encoder.style_mu = nn.Linear(features, style_dim)
    encoder.style_logvar = nn.Linear(features, style_dim)
    encoder.class_mu = nn.Linear(features, class_dim)
    encoder.class_logvar = nn.Linear(features, class_dim)


class Encoder(nn.Module):
    """q(style | x) and q(class | x): diagonal Gaussians given by their means and log-variances."""

    def __init__(self, style_dim: int, class_dim: int) -> None:
        super().__init__()
        self.linear_model = nn.ModuleDict({"linear_1": nn.Linear(PIXELS, HIDDEN)})
        add_gaussian_heads(self, HIDDEN, style_dim, class_dim)
        init_reference_(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (style_mu, style_logvar, class_mu, class_logvar), each [B, dim]."""
        hidden = torch.tanh(self.linear_model["linear_1"](x.reshape(x.shape[0], PIXELS)))
        heads = (self.style_mu, self.style_logvar, self.class_mu, self.class_logvar)
        # One matmul for the four heads is faster than four small ones; the state_dict keeps
        # the reference's four Linear layers.
        weight = torch.cat([head.weight for head in heads])
        bias = torch.cat([head.bias for head in heads])
        sizes = [head.out_features for head in heads]
        return tuple(F.linear(hidden, weight, bias).split(sizes, dim=1))


class Decoder(nn.Module):
    """p(x | style, class): per-pixel means in [0, 1], plus a bounded log-variance for `gaussian`."""

    def __init__(self, style_dim: int, class_dim: int, likelihood: str = "mse") -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose from {LIKELIHOODS}")
        self.likelihood = likelihood
        self.linear_model = nn.ModuleDict({
            "linear_1": nn.Linear(style_dim + class_dim, HIDDEN),
            "linear_2": nn.Linear(HIDDEN, PIXELS),
        })
        # An extra head, so the reference's keys stay untouched for the other likelihoods.
        self.pixel_logvar = nn.Linear(HIDDEN, PIXELS) if likelihood == "gaussian" else None
        init_reference_(self)

    def hidden(self, style: torch.Tensor, class_: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear_model["linear_1"](torch.cat([style, class_], dim=1)))

    def logits(self, style: torch.Tensor, class_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pre-sigmoid pixel means [B, 784] and, for `gaussian`, the pixel log-variances [B, 784]."""
        hidden = self.hidden(style, class_)
        logvar = None
        if self.pixel_logvar is not None:
            logvar = PIXEL_LOGVAR_BOUND * torch.tanh(self.pixel_logvar(hidden) / PIXEL_LOGVAR_BOUND)
        return self.linear_model["linear_2"](hidden), logvar

    def forward(self, style: torch.Tensor, class_: torch.Tensor) -> torch.Tensor:
        """Return images [B, 1, 28, 28] in [0, 1]."""
        logits, _ = self.logits(style, class_)
        return torch.sigmoid(logits).view(-1, 1, 28, 28)


def init_cycle_vae_(module: nn.Module) -> None:
    """The cycle-consistent VAE's initialisation: Conv2d and Linear weights N(0, 0.05), biases 0;
    the transposed convolutions keep PyTorch's default, as there."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(layer.weight, 0.0, 0.05)
            nn.init.zeros_(layer.bias)


def conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    # InstanceNorm normalises each image on its own, in training and in evaluation alike (the
    # cycle-consistent VAE tracks running statistics, which makes eval() compute another function).
    return [nn.Conv2d(in_channels, out_channels, 5, stride=2, padding=1), nn.InstanceNorm2d(out_channels),
            nn.ReLU(inplace=True)]


def deconv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2), nn.InstanceNorm2d(out_channels),
            nn.LeakyReLU(0.2, inplace=True)]


class ConvEncoder(nn.Module):
    """Encoder's interface on the cycle-consistent VAE's convolutions: 28 -> 13 -> 6 -> 2 pixels."""

    def __init__(self, style_dim: int, class_dim: int) -> None:
        super().__init__()
        self.conv_model = nn.Sequential(*conv_block(1, 16), *conv_block(16, 32), *conv_block(32, 64),
                                        nn.Flatten())
        add_gaussian_heads(self, CONV_FEATURES, style_dim, class_dim)
        init_cycle_vae_(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (style_mu, style_logvar, class_mu, class_logvar), each [B, dim]."""
        features = self.conv_model(x.reshape(x.shape[0], 1, 28, 28))
        return (self.style_mu(features), self.style_logvar(features), self.class_mu(features),
                self.class_logvar(features))


class ConvDecoder(nn.Module):
    """Decoder's interface on the cycle-consistent VAE's transposed convolutions: 2 -> 6 -> 14 -> 28 pixels."""

    def __init__(self, style_dim: int, class_dim: int, likelihood: str = "mse") -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose from {LIKELIHOODS}")
        if likelihood == "gaussian":
            raise ValueError("the conv decoder has no pixel log-variance head; use --likelihood mse or bernoulli")
        self.likelihood = likelihood
        self.style_input = nn.Linear(style_dim, CONV_FEATURES)
        self.class_input = nn.Linear(class_dim, CONV_FEATURES)
        self.deconv_model = nn.Sequential(*deconv_block(128, 32), *deconv_block(32, 16),
                                          nn.ConvTranspose2d(16, 1, 4, stride=2, padding=1))
        init_cycle_vae_(self)

    def logits(self, style: torch.Tensor, class_: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Pre-sigmoid pixel means [B, 784], and None (no pixel log-variance)."""
        codes = torch.cat([F.leaky_relu(self.style_input(style), 0.2),
                           F.leaky_relu(self.class_input(class_), 0.2)], dim=1)
        return self.deconv_model(codes.view(-1, 128, 2, 2)).flatten(1), None

    def forward(self, style: torch.Tensor, class_: torch.Tensor) -> torch.Tensor:
        """Return images [B, 1, 28, 28] in [0, 1]."""
        logits, _ = self.logits(style, class_)
        return torch.sigmoid(logits).view(-1, 1, 28, 28)


def build_networks(arch: str, style_dim: int, class_dim: int,
                   likelihood: str = "mse") -> tuple[nn.Module, nn.Module]:
    """The (encoder, decoder) pair of `arch`: "mlp" (the reference's) or "conv" (the cycle-consistent VAE's)."""
    if arch == "mlp":
        return Encoder(style_dim, class_dim), Decoder(style_dim, class_dim, likelihood)
    if arch == "conv":
        return ConvEncoder(style_dim, class_dim), ConvDecoder(style_dim, class_dim, likelihood)
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


class Classifier(nn.Module):
    """The reference's latent-space classifier: z -> 256 -> BN -> LeakyReLU(0.2), twice -> logits."""

    def __init__(self, z_dim: int, num_classes: int = 10) -> None:
        super().__init__()
        self.fc_model = nn.Sequential(
            nn.Linear(z_dim, 256), nn.BatchNorm1d(256), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(256, 256), nn.BatchNorm1d(256), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc_model(z)


class PixelClassifier(nn.Module):
    """A small CNN on 28x28 images, used to judge what digit (or garment) a generated image shows."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 7 * 7, 128),
                                  nn.ReLU(inplace=True), nn.Dropout(0.25), nn.Linear(128, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images.reshape(-1, 1, 28, 28)))
