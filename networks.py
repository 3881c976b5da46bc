"""The ML-VAE networks: encoder with style and class heads, decoder, latent classifier, pixel judge,
factor probes.

Every network takes the image shape (channels, height, width), MNIST's (1, 28, 28) by default. The MLP's
architecture and state_dict keys are the reference implementation's, so its published weights load
strict: `Encoder(10, 10).load_state_dict(torch.load(path, weights_only=True))`.

    encoder: x(C*H*W) -> Linear 500 -> tanh -> {style_mu, style_logvar, class_mu, class_logvar} (Linear 500 -> dim)
    decoder: cat(style, class) -> Linear 500 -> tanh -> Linear C*H*W -> sigmoid

`--arch conv` swaps in the cycle-consistent VAE's MNIST networks (Jha et al., ECCV 2018; code
ananyahjha93/cycle-consistent-vae, networks.py) with ML-VAE's four Gaussian heads kept:

    encoder: x(1x28x28) -> [Conv 5x5 s2 p1 -> InstanceNorm -> ReLU] x3 (16, 32, 64 ch: 13, 6, 2 px)
             -> 256 -> {style_mu, style_logvar, class_mu, class_logvar} (Linear 256 -> dim)
    decoder: style -> Linear 256, class -> Linear 256 (each LeakyReLU 0.2) -> cat -> 128x2x2
             -> [ConvT 4x4 s2 -> InstanceNorm -> LeakyReLU 0.2] x2 (32, 16 ch: 6, 14 px)
             -> ConvT 4x4 s2 p1 (1 ch: 28 px) -> sigmoid

On C channels the first convolution reads C and the last writes C. At H = W = 4 * 2^k pixels (8, 16,
32, 64, ...) `--arch conv` is instead a DCGAN-style stack (Radford et al., ICLR 2016) down to 4x4,
with the same norms and activations and DCGAN's N(0, 0.02) initialisation:

    encoder: [Conv 4x4 s2 p1 -> InstanceNorm -> ReLU] x (k+1) (32, 64, 128, 256, 256, ... ch) -> T x 4 x 4
             -> {four heads} (Linear 16T -> dim)
    decoder: style -> Linear 8T, class -> Linear 8T (each LeakyReLU 0.2) -> cat -> T x 4 x 4
             -> [ConvT 4x4 s2 p1 -> InstanceNorm -> LeakyReLU 0.2] x k -> ConvT 4x4 s2 p1 (C ch) -> sigmoid
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ImageShape = tuple[int, int, int]  # (channels, height, width)
MNIST_SHAPE: ImageShape = (1, 28, 28)
PIXELS = 28 * 28  # MNIST's pixels: the reference divides its loss by batch * PIXELS
HIDDEN = 500
LIKELIHOODS = ("mse", "bernoulli", "gaussian")
ARCHS = ("mlp", "conv")
DCGAN_WIDTH, DCGAN_MAX_WIDTH, DCGAN_TOP = 32, 256, 4  # first layer's channels, the cap, the smallest map
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

    def __init__(self, style_dim: int, class_dim: int, shape: ImageShape = MNIST_SHAPE) -> None:
        super().__init__()
        self.shape = shape
        self.linear_model = nn.ModuleDict({"linear_1": nn.Linear(math.prod(shape), HIDDEN)})
        add_gaussian_heads(self, HIDDEN, style_dim, class_dim)
        init_reference_(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (style_mu, style_logvar, class_mu, class_logvar), each [B, dim]."""
        hidden = torch.tanh(self.linear_model["linear_1"](x.reshape(x.shape[0], -1)))
        heads = (self.style_mu, self.style_logvar, self.class_mu, self.class_logvar)
        # One matmul for the four heads is faster than four small ones; the state_dict keeps
        # the reference's four Linear layers.
        weight = torch.cat([head.weight for head in heads])
        bias = torch.cat([head.bias for head in heads])
        sizes = [head.out_features for head in heads]
        return tuple(F.linear(hidden, weight, bias).split(sizes, dim=1))


class Decoder(nn.Module):
    """p(x | style, class): per-pixel, per-channel means in [0, 1], plus a bounded log-variance for `gaussian`."""

    def __init__(self, style_dim: int, class_dim: int, likelihood: str = "mse", shape: ImageShape = MNIST_SHAPE
                 ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose from {LIKELIHOODS}")
        self.likelihood, self.shape = likelihood, shape
        self.linear_model = nn.ModuleDict({
            "linear_1": nn.Linear(style_dim + class_dim, HIDDEN),
            "linear_2": nn.Linear(HIDDEN, math.prod(shape)),
        })
        # An extra head, so the reference's keys stay untouched for the other likelihoods.
        self.pixel_logvar = nn.Linear(HIDDEN, math.prod(shape)) if likelihood == "gaussian" else None
        init_reference_(self)

    def hidden(self, style: torch.Tensor, class_: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear_model["linear_1"](torch.cat([style, class_], dim=1)))

    def logits(self, style: torch.Tensor, class_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pre-sigmoid pixel means [B, C*H*W] and, for `gaussian`, the pixel log-variances [B, C*H*W]."""
        hidden = self.hidden(style, class_)
        logvar = None
        if self.pixel_logvar is not None:
            logvar = PIXEL_LOGVAR_BOUND * torch.tanh(self.pixel_logvar(hidden) / PIXEL_LOGVAR_BOUND)
        return self.linear_model["linear_2"](hidden), logvar

    def forward(self, style: torch.Tensor, class_: torch.Tensor) -> torch.Tensor:
        """Return images [B, C, H, W] in [0, 1]."""
        logits, _ = self.logits(style, class_)
        return torch.sigmoid(logits).view(-1, *self.shape)


def init_cycle_vae_(module: nn.Module, std: float = 0.05) -> None:
    """The cycle-consistent VAE's initialisation: Conv2d and Linear weights N(0, std), biases 0; the
    transposed convolutions keep PyTorch's default, as there. DCGAN's stacks use std 0.02."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(layer.weight, 0.0, std)
            nn.init.zeros_(layer.bias)


def conv_block(in_channels: int, out_channels: int, kernel: int = 5, padding: int = 1) -> list[nn.Module]:
    # InstanceNorm normalises each image on its own, in training and in evaluation alike (the
    # cycle-consistent VAE tracks running statistics, which makes eval() compute another function).
    return [nn.Conv2d(in_channels, out_channels, kernel, stride=2, padding=padding),
            nn.InstanceNorm2d(out_channels), nn.ReLU(inplace=True)]


def deconv_block(in_channels: int, out_channels: int, padding: int = 0) -> list[nn.Module]:
    return [nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=padding),
            nn.InstanceNorm2d(out_channels), nn.LeakyReLU(0.2, inplace=True)]


def dcgan_widths(size: int) -> list[int]:
    """Channels after each stride-2 convolution from `size` pixels down to DCGAN_TOP: 32, 64, ... capped.
    ValueError unless size = DCGAN_TOP * 2^k with k >= 1."""
    steps = math.log2(size / DCGAN_TOP) if size > DCGAN_TOP else 0
    if steps < 1 or steps != int(steps):
        raise ValueError(f"--arch conv takes 28-pixel images or 4 * 2^k pixels (8, 16, 32, 64, 128, ...), not {size}; "
                         "pass --image-size with one of these, or --arch mlp")
    return [min(DCGAN_WIDTH * 2 ** i, DCGAN_MAX_WIDTH) for i in range(int(steps))]


def check_conv_shape(shape: ImageShape) -> None:
    """ValueError unless `--arch conv` has a stack for images of `shape`."""
    _, height, width = shape
    if height != width:
        raise ValueError(f"--arch conv takes square images, not {height}x{width}; pass --image-size")
    if height != 28:
        dcgan_widths(height)


def conv_stack(shape: ImageShape) -> tuple[nn.Sequential, int]:
    """The convolutional encoder's layers for images of `shape`, ending flattened, and their output width:
    the cycle-consistent VAE's (28 -> 13 -> 6 -> 2 pixels) for 28-pixel images, else a DCGAN-style stack
    down to 4x4. ValueError for a shape it has no stack for."""
    check_conv_shape(shape)
    channels, size, _ = shape
    widths = [16, 32, 64] if size == 28 else dcgan_widths(size)
    kernel, top = (5, 2) if size == 28 else (4, DCGAN_TOP)
    layers = (layer for c_in, c_out in zip([channels, *widths], widths) for layer in conv_block(c_in, c_out, kernel))
    return nn.Sequential(*layers, nn.Flatten()), widths[-1] * top * top


def conv_init_std(shape: ImageShape) -> float:
    """init_cycle_vae_'s std: the cycle-consistent VAE's for its 28-pixel stacks, DCGAN's for the others."""
    return 0.05 if shape[1] == 28 else 0.02


class ConvEncoder(nn.Module):
    """Encoder's interface on convolutions (conv_stack)."""

    def __init__(self, style_dim: int, class_dim: int, shape: ImageShape = MNIST_SHAPE) -> None:
        super().__init__()
        self.shape = shape
        self.conv_model, features = conv_stack(shape)
        add_gaussian_heads(self, features, style_dim, class_dim)
        init_cycle_vae_(self, conv_init_std(shape))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (style_mu, style_logvar, class_mu, class_logvar), each [B, dim]."""
        features = self.conv_model(x.reshape(x.shape[0], *self.shape))
        return (self.style_mu(features), self.style_logvar(features), self.class_mu(features),
                self.class_logvar(features))


class ConvDecoder(nn.Module):
    """Decoder's interface on transposed convolutions: the cycle-consistent VAE's (2 -> 6 -> 14 -> 28
    pixels) for 28-pixel images, else the mirror of ConvEncoder's DCGAN-style stack from 4x4."""

    def __init__(self, style_dim: int, class_dim: int, likelihood: str = "mse", shape: ImageShape = MNIST_SHAPE
                 ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose from {LIKELIHOODS}")
        if likelihood == "gaussian":
            raise ValueError("the conv decoder has no pixel log-variance head; use --likelihood mse or bernoulli")
        check_conv_shape(shape)
        self.likelihood, self.shape = likelihood, shape
        channels, size, _ = shape
        widths = [128, 32, 16] if size == 28 else dcgan_widths(size)[::-1]
        top = 2 if size == 28 else DCGAN_TOP
        self.code_map = (widths[0], top, top)
        # Each code fills half the first feature map. Built before the transposed convolutions, whose
        # default initialisation draws from the same random stream.
        self.style_input = nn.Linear(style_dim, widths[0] * top * top // 2)
        self.class_input = nn.Linear(class_dim, widths[0] * top * top // 2)
        padding = 0 if size == 28 else 1
        self.deconv_model = nn.Sequential(
            *(layer for c_in, c_out in zip(widths, widths[1:]) for layer in deconv_block(c_in, c_out, padding)),
            nn.ConvTranspose2d(widths[-1], channels, 4, stride=2, padding=1))
        init_cycle_vae_(self, conv_init_std(shape))

    def logits(self, style: torch.Tensor, class_: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Pre-sigmoid pixel means [B, C*H*W], and None (no pixel log-variance)."""
        codes = torch.cat([F.leaky_relu(self.style_input(style), 0.2),
                           F.leaky_relu(self.class_input(class_), 0.2)], dim=1)
        return self.deconv_model(codes.view(-1, *self.code_map)).flatten(1), None

    def forward(self, style: torch.Tensor, class_: torch.Tensor) -> torch.Tensor:
        """Return images [B, C, H, W] in [0, 1]."""
        logits, _ = self.logits(style, class_)
        return torch.sigmoid(logits).view(-1, *self.shape)


def build_networks(arch: str, style_dim: int, class_dim: int, likelihood: str = "mse",
                   shape: ImageShape = MNIST_SHAPE) -> tuple[nn.Module, nn.Module]:
    """The (encoder, decoder) pair of `arch` for images of `shape`: "mlp" (the reference's) or "conv"
    (the cycle-consistent VAE's at 28 pixels, DCGAN-style at 4 * 2^k pixels)."""
    if arch == "mlp":
        return Encoder(style_dim, class_dim, shape), Decoder(style_dim, class_dim, likelihood, shape)
    if arch == "conv":
        return ConvEncoder(style_dim, class_dim, shape), ConvDecoder(style_dim, class_dim, likelihood, shape)
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
    """A small CNN on images of `shape`, used to judge which digit (garment, group) a generated image shows."""

    def __init__(self, num_classes: int = 10, shape: ImageShape = MNIST_SHAPE) -> None:
        super().__init__()
        self.shape = channels, height, width = shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * (height // 4) * (width // 4), 128),
                                  nn.ReLU(inplace=True), nn.Dropout(0.25), nn.Linear(128, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images.reshape(-1, *self.shape)))


class FactorRegressor(nn.Module):
    """ConvEncoder's stack with one linear head of `outputs` values. Trained on an image's labelled factors,
    it measures what that encoder can read of them from one image (studies.factor_ceiling)."""

    def __init__(self, outputs: int, shape: ImageShape) -> None:
        super().__init__()
        self.shape = shape
        self.conv_model, features = conv_stack(shape)
        self.head = nn.Linear(features, outputs)
        init_cycle_vae_(self, conv_init_std(shape))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv_model(images.reshape(images.shape[0], *self.shape)))


class ProbeBank(nn.Module):
    """`count` independent MLP probes z -> 128 -> ReLU -> 128 -> ReLU -> `outputs`, one per target, run as
    batched matmuls: output [count, N, outputs]. No BatchNorm, so each probe's output for a row depends on
    that row alone, as a permutation-importance measurement needs."""

    def __init__(self, count: int, z_dim: int, outputs: int, hidden: int = 128) -> None:
        super().__init__()
        dims = [z_dim, hidden, hidden, outputs]
        # nn.Linear's default initialisation, one draw per probe.
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(count, fan_in, fan_out).uniform_(-1, 1) / math.sqrt(fan_in))
            for fan_in, fan_out in zip(dims, dims[1:]))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(count, 1, fan_out).uniform_(-1, 1) / math.sqrt(fan_in))
            for fan_in, fan_out in zip(dims, dims[1:]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z.expand(len(self.weights[0]), *z.shape)
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(bias, h, weight)
            if layer < len(self.weights) - 1:
                h = F.relu(h)
        return h
