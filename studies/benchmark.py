"""Time training.py's step, eager and compiled, in fp32 and bf16, against this machine's FLOP bound.

The step timed is `training.train_step` itself, on MNIST batches indexed from a permutation as
`training.py` does; with `--compile` the compiled steps go through `training.compile_step`, as
`training.py --compile` does. In the same run the script measures:
- the FLOP bound: the step's matmuls alone, one after another in the step's order, at the network's
  shapes and memory layouts, in fp32 and bf16 (the fastest a step could be, its FLOPs counted);
- each compiled step's compile time (its first call, with Inductor's caches off) and its graphs and
  graph breaks (`torch._dynamo.explain`);
- where a step's time goes: a profile split into matmuls, convolutions, other kernels, Adam and the
  rest;
- the busy-neighbour ratio: the eager step beside a busy process (`python -c "while True: pass"`),
  with the threads `training.py` picks and with one per CPU, each against one thread.
The bound and the steps are timed in short interleaved rounds and each keeps its fastest round, so
that on a shared machine they are compared under the same conditions.

`--arch conv` times the conv step instead (networks.build_networks at each of `--image-sizes` and
`--channels`), on random uint8 images (64 groups) in group-balanced batches of G groups of 8 images,
as training.py batches folder data, against its own FLOP bound: every convolution, transposed
convolution and matmul of the step (forward, input gradient and weight gradient), run one after
another at the step's shapes with the library's own kernels (F.conv2d, F.conv_transpose2d,
aten.convolution_backward, torch.mm).

    python -m studies.benchmark --compile --json out/benchmark.json   # the full table, CPU (and CUDA when present)
    python -m studies.benchmark --precision fp32                      # the eager fp32 step only (10 s here)
    python -m studies.benchmark --arch conv --precision fp32 --json out/bench_conv.json   # 28, 32, 64 px; 1, 3 ch
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch._inductor.config
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import data_loader
import training
from networks import ARCHS, HIDDEN, PIXELS, build_networks, check_conv_shape
from runs import (NONNEGATIVE_INT, POSITIVE_INT, check_writable, idle_threads, pick_device, pick_threads,
                  reports_errors, repository_path, script_parser, set_float32_precision, write_text_atomic)

MNIST_TRAIN = 60000
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONV_SIZES, CONV_CHANNELS = [28, 32, 64], [1, 3]
SYNTHETIC_GROUPS = 64  # groups of the conv step's random images; each holds half a batch of images
# Defaults of the timing flags per --arch: a conv step at 64 px takes seconds on a CPU, an MLP step milliseconds.
ARCH_DEFAULTS = {"mlp": {"steps": 200, "warmup": 20, "rounds": 40, "bound_calls": 2, "profile_steps": 20,
                         "busy_rounds": 10},
                 "conv": {"steps": 10, "warmup": 2, "rounds": 5, "bound_calls": 1, "profile_steps": 0,
                          "busy_rounds": 0}}


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add = parser.add_argument
    add("--arch", choices=ARCHS, default="mlp",
        help="the step to time: mlp (the reference's networks on MNIST) or conv (on random images of each "
             "--image-sizes and --channels)")
    add("--image-sizes", type=POSITIVE_INT, nargs="+", default=argparse.SUPPRESS,
        help=f"--arch conv: image sizes in pixels, 28 or 4 * 2^k (default: {' '.join(map(str, CONV_SIZES))})")
    add("--channels", type=POSITIVE_INT, nargs="+", choices=CONV_CHANNELS, default=argparse.SUPPRESS,
        help=f"--arch conv: image channels (default: {' '.join(map(str, CONV_CHANNELS))})")
    add("--batch-size", type=POSITIVE_INT, default=256,
        help="images per training step (--arch conv: G groups of 8 images, so a multiple of 8)")
    add("--steps", type=POSITIVE_INT, default=argparse.SUPPRESS,
        help="timed training steps per configuration, spread over the rounds (default: 200 for mlp, 10 for conv)")
    add("--warmup", type=POSITIVE_INT, default=argparse.SUPPRESS,
        help="untimed steps first (compilation, allocator, oneDNN caches); the first one is the compile time "
             "(default: 20 for mlp, 2 for conv)")
    add("--rounds", type=POSITIVE_INT, default=argparse.SUPPRESS,
        help="rounds of measurement; each round times the bound and every configuration once, and each "
             "one's fastest round is kept, as timeit does (default: 40 for mlp, 5 for conv)")
    add("--bound-calls", type=POSITIVE_INT, default=argparse.SUPPRESS,
        help="repeats of the step's matmuls (and convolutions) per round, for the bound (default: 2 for mlp, "
             "1 for conv)")
    add("--precision", nargs="+", choices=tuple(DTYPES), default=list(DTYPES),
        help="precisions of the step to time (bf16 = autocast, as training.py --precision bf16)")
    add("--compile", action="store_true",
        help="also time each precision through training.py --compile (each compiles in 10-20 s here for mlp, "
             "in minutes for conv)")
    add("--profile-steps", type=NONNEGATIVE_INT, default=argparse.SUPPRESS,
        help="steps profiled for the time split (0: no split; default: 20 for mlp, 0 for conv)")
    add("--busy-rounds", type=NONNEGATIVE_INT, default=argparse.SUPPRESS,
        help="rounds of the busy-neighbour measurement (0: none); it runs the MLP step on the CPU only "
             "(default: 10 for mlp, 0 for conv)")
    add("--device", default="all", help="all (the CPU, plus CUDA when present), cpu, cuda or cuda:N")
    add("--threads", type=POSITIVE_INT, default=None,
        help="CPU threads (default: as training.py picks them, one per CPU idle at the start)")
    add("--data-dir", default=repository_path("data"), help="folder holding MNIST/raw/ IDX files (--arch mlp)")
    add("--json", type=Path, default=None, help="also write the results here")
    return parser


def settle_options(parser: argparse.ArgumentParser, options: argparse.Namespace) -> None:
    """Fill the flags not given (argparse.SUPPRESS leaves them out) with their --arch's defaults, and check
    the conv flags."""
    if options.arch == "mlp" and {"image_sizes", "channels"} & vars(options).keys():
        parser.error("--image-sizes and --channels choose the conv step's images; add --arch conv")
    if options.arch == "conv":
        if getattr(options, "busy_rounds", 0):
            parser.error("--busy-rounds measures the MLP step beside a busy process; leave it out with --arch conv")
        if options.batch_size % training.DEFAULT_IMAGES_PER_GROUP:
            parser.error(f"--batch-size {options.batch_size}: the conv step's batches hold groups of "
                         f"{training.DEFAULT_IMAGES_PER_GROUP} images; pass a multiple of "
                         f"{training.DEFAULT_IMAGES_PER_GROUP}")
        options.image_sizes = getattr(options, "image_sizes", CONV_SIZES)
        options.channels = getattr(options, "channels", CONV_CHANNELS)
        for size in options.image_sizes:
            try:
                check_conv_shape((1, size, size))
            except ValueError:
                parser.error(f"--image-sizes {size}: --arch conv has stacks for 28 px and 4 * 2^k px "
                             "(8, 16, 32, 64, 128, ...); pass sizes among these")
    for key, value in ARCH_DEFAULTS[options.arch].items():
        setattr(options, key, getattr(options, key, value))


# ---- the network's FLOPs and the FLOP bound ------------------------------------------------------

def linear_layers(style_dim: int, class_dim: int) -> list[tuple[str, int, int, bool]]:
    """(name, in, out, needs its input's gradient) for every Linear of one training step, in order.

    The encoder's four heads run as one matmul (networks.Encoder.forward), so they count as one layer.
    The pixels are the only input that needs no gradient.
    """
    latent = style_dim + class_dim
    return [("encoder.linear_1", PIXELS, HIDDEN, False),
            ("encoder.heads", HIDDEN, 2 * latent, True),
            ("decoder.linear_1", latent, HIDDEN, True),
            ("decoder.linear_2", HIDDEN, PIXELS, True)]


Gemm = tuple[str, int, int, int, bool, bool]  # (name, m, k, n, first operand transposed, second transposed)


def linear_gemm(name: str, batch: int, fan_in: int, fan_out: int, pass_: str) -> Gemm:
    """The matmul of one pass ("forward", "grad input" or "grad weight") of a Linear y = x W^T, with x
    [batch, fan_in] and the weight stored [fan_out, fan_in] (PyTorch's layout).

    Forward x @ W^T (m=B, k=in, n=out) reads W through a transposed view, as nn.Linear does; input
    gradient dy @ W (m=B, k=out, n=in); weight gradient dy^T @ x (m=out, k=B, n=in) reads dy through a
    transposed view, as autograd does.
    """
    shapes = {"forward": (batch, fan_in, fan_out, False, True), "grad input": (batch, fan_out, fan_in, False, False),
              "grad weight": (fan_out, batch, fan_in, True, False)}
    return (f"{name} {pass_}", *shapes[pass_])


def step_gemms(batch: int, style_dim: int, class_dim: int) -> list[Gemm]:
    """Every matmul of a forward+backward MLP step, in the order a step runs them (linear_gemm).
    Biases, activations and the loss are O(B * width) and left out of the bound."""
    layers = linear_layers(style_dim, class_dim)
    gemms = [linear_gemm(name, batch, fan_in, fan_out, "forward") for name, fan_in, fan_out, _ in layers]
    for name, fan_in, fan_out, input_grad in reversed(layers):
        if input_grad:
            gemms.append(linear_gemm(name, batch, fan_in, fan_out, "grad input"))
        gemms.append(linear_gemm(name, batch, fan_in, fan_out, "grad weight"))
    return gemms


def step_flops(batch: int, style_dim: int, class_dim: int) -> int:
    """Multiply-adds x 2 of one training step's matmuls (forward and backward)."""
    return sum(2 * m * k * n for _, m, k, n, _, _ in step_gemms(batch, style_dim, class_dim))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Mean wall-clock seconds of `calls` back-to-back calls of `fn`."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def fastest_in_rounds(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every timer once per round, for `rounds` rounds; returns each timer's measurements.

    Interleaving matters on a shared machine: the bound and every configuration meet the same quiet
    and busy spells, so the fastest of each (as timeit keeps) are taken under comparable conditions.
    """
    measured = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            measured[name].append(timer())
    return measured


def gemm_product(gemm: Gemm, dtype: torch.dtype, device: torch.device, generator: torch.Generator
                 ) -> Callable[[], torch.Tensor]:
    """One matmul of a step at its shape, memory layout and dtype, writing into a tensor of its own."""
    _, m, k, n, a_transposed, b_transposed = gemm

    def operand(rows: int, cols: int, transposed: bool) -> torch.Tensor:
        shape = (cols, rows) if transposed else (rows, cols)
        t = torch.randn(shape, generator=generator, device=device).to(dtype)
        return t.t() if transposed else t

    a, b = operand(m, k, a_transposed), operand(k, n, b_transposed)
    return functools.partial(torch.mm, a, b, out=torch.empty(m, n, device=device, dtype=dtype))


def sequence_timer(kernels: list[Callable[[], object]], device: torch.device, calls: int) -> Callable[[], float]:
    """A timer of `kernels` run one after another; each call returns seconds per sequence from `calls`
    repeats. Each kernel runs once first: the library picks and caches its algorithm on the first call."""
    for kernel in kernels:
        kernel()

    def sequence() -> None:
        for kernel in kernels:
            kernel()

    return lambda: seconds_per_call(sequence, device, calls)


def gemm_bound_timer(batch: int, style_dim: int, class_dim: int, dtype: torch.dtype, device: torch.device,
                     calls: int) -> Callable[[], float]:
    """A timer of the MLP step's FLOP bound: the step's matmuls one after another in the step's order, at
    their own shapes, memory layouts and dtype, and nothing else. Each call returns seconds per step
    from `calls` repeats."""
    generator = torch.Generator(device=device).manual_seed(0)
    products = [gemm_product(gemm, dtype, device, generator) for gemm in step_gemms(batch, style_dim, class_dim)]
    return sequence_timer(products, device, calls)


# ---- the conv step's FLOPs and its FLOP bound ----------------------------------------------------

@dataclass(frozen=True)
class Layer:
    """One Conv2d, ConvTranspose2d or Linear of a training step, at the step's batch size."""

    name: str
    kind: str  # "conv", "conv transposed" or "linear"
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]  # as the module stores it: [out, in, k, k], [in, out, k, k], [out, in]
    output_shape: tuple[int, ...]
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    output_padding: tuple[int, ...] = (0, 0)
    input_grad: bool = True  # False for the pixels, the one input no gradient flows into


def layer_kind(module: nn.Module) -> str | None:
    """The Layer kind of a module, or None for a module the bound leaves out."""
    if isinstance(module, nn.ConvTranspose2d):
        return "conv transposed"
    if isinstance(module, nn.Conv2d):
        return "conv"
    return "linear" if isinstance(module, nn.Linear) else None


def step_layers(encoder: nn.Module, decoder: nn.Module, batch: int) -> list[Layer]:
    """Every Conv2d, ConvTranspose2d and Linear of a conv training step in the order its forward pass
    runs them, at batch size `batch`: recorded by hooks on one forward pass of one image, encoder then
    decoder, as training.compute_losses runs them."""
    layers = []

    def recorder(name: str, module: nn.Module):
        def record(_, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            convolution = {} if isinstance(module, nn.Linear) else {
                "stride": module.stride, "padding": module.padding, "output_padding": module.output_padding}
            layers.append(Layer(name, layer_kind(module), (batch, *x.shape[1:]), tuple(module.weight.shape),
                                (batch, *output.shape[1:]), input_grad=x.requires_grad, **convolution))
        return record

    handles = [module.register_forward_hook(recorder(f"{prefix}.{name}", module))
               for prefix, network in (("encoder", encoder), ("decoder", decoder))
               for name, module in network.named_modules() if layer_kind(module) is not None]
    try:
        style_mu, _, class_mu, _ = encoder(torch.zeros(1, *encoder.shape))
        decoder.logits(style_mu, class_mu)
    finally:
        for handle in handles:
            handle.remove()
    return layers


def layer_macs(layer: Layer) -> int:
    """Multiply-adds of a layer's forward pass, every kernel tap counted (those on the padding too, as
    torch.utils.flop_counter counts them). Its input gradient and its weight gradient take as many.

    Linear: B * in * out. Conv: B * out pixels * C_out * C_in * k * k. Transposed conv (weight
    [C_in, C_out, k, k]): B * in pixels * C_in * C_out * k * k, each input pixel spread over k x k outputs.
    """
    if layer.kind == "linear":
        return math.prod(layer.input_shape) * layer.weight_shape[0]
    # Each pixel of the output (of the input, when transposed) meets the weight's other three dimensions.
    pixels = layer.input_shape if layer.kind == "conv transposed" else layer.output_shape
    return math.prod(pixels) * math.prod(layer.weight_shape[1:])


def conv_step_passes(layers: list[Layer]) -> list[tuple[Layer, str]]:
    """Every pass of every layer of a training step in the order the step runs them: the forward
    passes, then backward from the last layer, each layer's input gradient (unless its input is the
    pixels) and weight gradient. Biases, norms, activations, the loss and Adam are O(activations) and
    left out of the bound."""
    passes = [(layer, "forward") for layer in layers]
    for layer in reversed(layers):
        passes += [(layer, "grad input")] * layer.input_grad + [(layer, "grad weight")]
    return passes


def conv_step_flops(layers: list[Layer]) -> int:
    """Multiply-adds x 2 of one conv training step's convolutions and matmuls (forward and backward)."""
    return sum(2 * layer_macs(layer) for layer, _ in conv_step_passes(layers))


def layer_kernel(layer: Layer, pass_: str, dtype: torch.dtype, device: torch.device, generator: torch.Generator
                 ) -> Callable[[], object]:
    """One pass of one layer, by the library kernel the step runs it with: torch.mm for a Linear (as
    linear_gemm lays it out), F.conv2d or F.conv_transpose2d forward, and aten.convolution_backward
    (autograd's kernel for both, one gradient at a time) for the gradients."""
    batch = layer.input_shape[0]
    if layer.kind == "linear":
        fan_out, fan_in = layer.weight_shape
        return gemm_product(linear_gemm(layer.name, batch, fan_in, fan_out, pass_), dtype, device, generator)
    x, weight, dy = (torch.randn(shape, generator=generator, device=device).to(dtype)
                     for shape in (layer.input_shape, layer.weight_shape, layer.output_shape))
    transposed = layer.kind == "conv transposed"
    if pass_ == "forward":
        convolution = F.conv_transpose2d if transposed else F.conv2d
        extra = {"output_padding": layer.output_padding} if transposed else {}
        return functools.partial(convolution, x, weight, None, stride=layer.stride, padding=layer.padding, **extra)
    mask = [pass_ == "grad input", pass_ == "grad weight", False]
    return functools.partial(torch.ops.aten.convolution_backward, dy, x, weight, None, layer.stride,
                             layer.padding, [1, 1], transposed, layer.output_padding, 1, mask)


def conv_bound_timer(layers: list[Layer], dtype: torch.dtype, device: torch.device, calls: int
                     ) -> Callable[[], float]:
    """A timer of the conv step's FLOP bound: every pass of its convolutions, transposed convolutions and
    matmuls one after another in the step's order (conv_step_passes), at their own shapes and dtype,
    and nothing else. Each call returns seconds per step from `calls` repeats."""
    generator = torch.Generator(device=device).manual_seed(0)
    kernels = [layer_kernel(layer, pass_, dtype, device, generator) for layer, pass_ in conv_step_passes(layers)]
    return sequence_timer(kernels, device, calls)


# ---- the training step ---------------------------------------------------------------------------

def step_args(batch: int, precision: str, device: torch.device, compile_: bool, flags: tuple[str, ...] = ()
              ) -> argparse.Namespace:
    """training.py's own defaults for everything but batch, precision, device, compile and `flags`."""
    args = training.build_parser().parse_args(["--batch-size", str(batch), "--precision", precision, *flags]
                                              + ["--compile"] * compile_)
    args.device = device
    return args


def conv_step_args(batch: int, precision: str, device: torch.device, compile_: bool) -> argparse.Namespace:
    """step_args of --arch conv in group-balanced batches of batch / 8 groups of 8 images, training.py's
    batches of folder data."""
    images_per_group = training.DEFAULT_IMAGES_PER_GROUP
    return step_args(batch, precision, device, compile_,
                     ("--arch", "conv", "--groups-per-batch", str(batch // images_per_group),
                      "--images-per-group", str(images_per_group)))


def synthetic_rows(batch: int) -> int:
    """Rows of synthetic_split: SYNTHETIC_GROUPS groups of half a batch each, rounded up to whole blocks of
    training.DEFAULT_IMAGES_PER_GROUP, so that an epoch holds at least 32 group-balanced batches."""
    block = training.DEFAULT_IMAGES_PER_GROUP
    return SYNTHETIC_GROUPS * block * math.ceil(batch / (2 * block))


def synthetic_split(shape: tuple[int, int, int], batch: int, seed: int = 0) -> data_loader.ImageSplit:
    """synthetic_rows(batch) random uint8 images of `shape` in SYNTHETIC_GROUPS groups of equal size (row i
    in group i mod SYNTHETIC_GROUPS). A step's cost does not depend on what its pixels show."""
    rows = synthetic_rows(batch)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (rows, *shape), generator=generator, dtype=torch.uint8)
    return data_loader.ImageSplit(images, torch.arange(rows) % SYNTHETIC_GROUPS,
                                  [f"group_{group}" for group in range(SYNTHETIC_GROUPS)])


class StepRunner:
    """training.py's model, optimizer and batches for `args`; `step()` runs one training.train_step."""

    def __init__(self, split: data_loader.ImageSplit, args: argparse.Namespace) -> None:
        self.args = args
        torch.manual_seed(args.seed)
        self.generator = torch.Generator(device=args.device).manual_seed(args.seed)
        self.encoder, self.decoder = (net.to(args.device) for net in build_networks(
            args.arch, args.style_dim, args.class_dim, args.likelihood, tuple(split.images.shape[1:])))
        self.optimizer = training.make_optimizer(self.encoder, self.decoder, args)
        self.step_fn = (training.compile_step(self.optimizer, args.device) if args.compile
                        else training.optimization_step)
        self.batches = data_loader.Batches(split, args.batch_size, args.device, args.groups_per_batch,
                                           args.images_per_group, args.group_size)
        self.order = self.batches.epoch_order(self.generator)
        self.position = 0

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batches.batch(self.order, self.position)
        self.position = (self.position + 1) % self.batches.steps_per_epoch
        return batch

    def step(self) -> torch.Tensor:
        x, groups = self.batch()
        return training.train_step(self.encoder, self.decoder, self.optimizer, x, groups, self.batches.num_groups,
                                   self.args, self.generator, self.step_fn)

    def explain(self) -> dict:
        """Graphs and graph breaks of the step (torch._dynamo.explain, which resets Dynamo's caches)."""
        x, groups = self.batch()
        noise = (torch.randn(len(x), self.args.style_dim, device=x.device),
                 torch.randn(self.batches.num_groups, self.args.class_dim, device=x.device))
        explained = torch._dynamo.explain(training.optimization_step)(
            self.encoder, self.decoder, self.optimizer, x, groups, noise, self.args)
        return {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
                "ops": explained.op_count}


def step_timer(runner: StepRunner, warmup: int, calls: int) -> tuple[Callable[[], float], float, float]:
    """A timer of `calls` steps of `runner`, the seconds of its first step (compilation included) and
    of its `warmup` untimed steps."""
    first_s = seconds_per_call(runner.step, runner.args.device, 1)
    rest = warmup - 1
    warmup_s = first_s + (seconds_per_call(runner.step, runner.args.device, rest) * rest if rest else 0.0)
    return lambda: seconds_per_call(runner.step, runner.args.device, calls), first_s, warmup_s


def kernel_kind(name: str) -> str:
    """The part of a step a profiled op belongs to."""
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        return "matmuls"
    if name.startswith("aten::") and "conv" in name:
        return "convolutions"  # oneDNN's (mkldnn_convolution...) or PyTorch's own (slow_conv2d, slow_conv_transpose2d)
    if "adam" in name:
        return "Adam"
    if name.startswith("aten::"):
        return "other kernels"
    if "CompiledFxGraph" in name or "Torch-Compiled Region" in name:
        return "compiled kernels"  # Inductor's generated kernels: element-wise, reductions and Adam fused
    return "other"


def step_split(runner: StepRunner, steps: int) -> dict:
    """Milliseconds per step of its matmuls, convolutions, Adam, its other kernels (or Inductor's fused kernels) and the
    rest (Python, dispatch and launch overhead: the wall time no kernel accounts for), from the
    profiler's self time per op; the profiler's own cost lands in the rest."""
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        start = time.perf_counter()
        for _ in range(steps):
            runner.step()
        synchronize(runner.args.device)
        wall = time.perf_counter() - start
    split = defaultdict(float)
    for event in profiled.key_averages():
        kind = kernel_kind(event.key)
        if kind != "other":
            split[kind] += event.self_cpu_time_total / 1e6  # microseconds to seconds
    split["overhead and the rest"] = wall - sum(split.values())
    return {kind: 1e3 * seconds / steps for kind, seconds in split.items()}


def timed_row(name: str, seconds: list[float], batch: int, **fields) -> dict:
    """A table row from a configuration's per-round seconds per step (the fastest round counts)."""
    best = min(seconds)
    return {"name": name, "ms_per_step": 1e3 * best, "ms_per_step_median": 1e3 * statistics.median(seconds),
            "images_per_s": batch / best, **fields}


def step_row(name: str, seconds: list[float], batch: int, **fields) -> dict:
    """timed_row with the seconds of an MNIST epoch at the fastest round's rate."""
    return timed_row(name, seconds, batch, s_per_epoch=(MNIST_TRAIN // batch) * min(seconds), **fields)


def against_bound(row: dict, flops: int, bound_ms: float) -> dict:
    """`row` with its GFLOP/s, its share of the bound and, for a compiled step, its compile time (the first
    step's time less a steady step's)."""
    steady_s = row["ms_per_step"] / 1e3
    row.update(gflops=flops / steady_s / 1e9, share_of_bound=bound_ms / row["ms_per_step"])
    if row["compile"]:
        row["compile_s"] = row["first_step_s"] - steady_s
    return row


def bound_entry(seconds: list[float], flops: int, batch: int, **fields) -> dict:
    """A FLOP bound's fastest and median round, its GFLOP/s and images/s."""
    best = min(seconds)
    return {**fields, "step_flops": flops, "bound_ms": 1e3 * best, "bound_ms_median": 1e3 * statistics.median(seconds),
            "gflops": flops / best / 1e9, "images_per_s": batch / best}


def explain_compiled(runners: dict[str, StepRunner], fields: dict[str, dict]) -> None:
    """Add each compiled runner's graphs and breaks to its fields; explain() resets Dynamo, so this runs
    before any compiled step does."""
    for name, runner in runners.items():
        if runner.args.compile:
            fields[name].update(runner.explain())


def measure_in_rounds(runners: dict[str, StepRunner], fields: dict[str, dict], timers: dict[str, Callable[[], float]],
                      options: argparse.Namespace) -> dict[str, list[float]]:
    """Warm every runner up (its first step's and its warm-up's seconds go to its fields), then time the
    bounds in `timers` and every runner in the same interleaved rounds; returns each one's seconds per step."""
    calls = max(options.steps // options.rounds, 1)
    timers = dict(timers)
    for name, runner in runners.items():
        timers[name], first_s, warmup_s = step_timer(runner, options.warmup, calls)
        fields[name].update(first_step_s=first_s, warmup_s=warmup_s)
    return fastest_in_rounds(timers, options.rounds)


def benchmark_device(device: torch.device, options: argparse.Namespace) -> tuple[list[dict], list[dict], dict]:
    """(rows of the step configurations, the FLOP bounds, the time split) on `device`."""
    split = data_loader.idx_split(options.data_dir, "train")
    defaults = step_args(options.batch_size, "fp32", device, False)
    flops = step_flops(options.batch_size, defaults.style_dim, defaults.class_dim)
    runners, fields = {}, {}
    for precision in options.precision:
        for compile_ in (False, True) if options.compile else (False,):
            name = ("compiled" if compile_ else "eager") + f" {precision}"
            runners[name] = StepRunner(split, step_args(options.batch_size, precision, device, compile_))
            fields[name] = {"precision": precision, "compile": compile_}
    explain_compiled(runners, fields)
    timers = {f"bound {precision}": gemm_bound_timer(options.batch_size, defaults.style_dim, defaults.class_dim,
                                                     DTYPES[precision], device, options.bound_calls)
              for precision in options.precision}
    measured = measure_in_rounds(runners, fields, timers, options)
    bounds = {precision: {"dtype": precision, "device": str(device), "step_flops": flops,
                          "bound_ms": 1e3 * min(measured[f"bound {precision}"]),
                          "bound_ms_median": 1e3 * statistics.median(measured[f"bound {precision}"]),
                          "gflops": flops / min(measured[f"bound {precision}"]) / 1e9}
              for precision in options.precision}
    rows = []
    for name, extra in fields.items():
        row = step_row(name, measured[name], options.batch_size, device=str(device), **extra)
        rows.append(against_bound(row, flops, bounds[row["precision"]]["bound_ms"]))
    split = {name: step_split(runner, options.profile_steps) for name, runner in runners.items()
             if options.profile_steps > 0}
    return rows, list(bounds.values()), split


def conv_layers(shape: tuple[int, int, int], batch: int, style_dim: int, class_dim: int) -> list[Layer]:
    """step_layers of the conv networks for images of `shape` (built on the CPU, for their shapes alone)."""
    return step_layers(*build_networks("conv", style_dim, class_dim, "mse", shape), batch)


def benchmark_conv_device(device: torch.device, options: argparse.Namespace
                          ) -> tuple[list[dict], list[dict], dict]:
    """(rows of the conv step at every image size, channel count and configuration, their FLOP bounds,
    the time split) on `device`: every bound and step is timed in the same interleaved rounds."""
    defaults = conv_step_args(options.batch_size, "fp32", device, False)
    runners, fields, timers, images = {}, {}, {}, {}
    for size in options.image_sizes:
        for channels in options.channels:
            image, shape = f"{size}px C={channels}", (channels, size, size)
            layers = conv_layers(shape, options.batch_size, defaults.style_dim, defaults.class_dim)
            images[image] = {"image": image, "image_size": size, "channels": channels,
                             "flops": conv_step_flops(layers)}
            split = synthetic_split(shape, options.batch_size)
            for precision in options.precision:
                timers[f"{image} bound {precision}"] = conv_bound_timer(layers, DTYPES[precision], device,
                                                                        options.bound_calls)
                for compile_ in (False, True) if options.compile else (False,):
                    name = f"{image} {'compiled' if compile_ else 'eager'} {precision}"
                    runners[name] = StepRunner(split, conv_step_args(options.batch_size, precision, device, compile_))
                    fields[name] = {"image": image, "image_size": size, "channels": channels,
                                    "precision": precision, "compile": compile_}
    explain_compiled(runners, fields)
    measured = measure_in_rounds(runners, fields, timers, options)
    bounds = {(image, precision): bound_entry(measured[f"{image} bound {precision}"], about["flops"],
                                              options.batch_size, image=image, image_size=about["image_size"],
                                              channels=about["channels"], dtype=precision, device=str(device))
              for image, about in images.items() for precision in options.precision}
    rows = []
    for name, extra in fields.items():
        row = timed_row(name, measured[name], options.batch_size, device=str(device), **extra)
        bound = bounds[row["image"], row["precision"]]
        rows.append(against_bound(row, bound["step_flops"], bound["bound_ms"]))
    split = {name: step_split(runner, options.profile_steps) for name, runner in runners.items()
             if options.profile_steps > 0}
    return rows, list(bounds.values()), split


def busy_neighbour(options: argparse.Namespace) -> dict:
    """The eager fp32 CPU step beside one busy process, with the threads training.py picks by default
    (asked while the neighbour runs), with one per CPU (torch's default on a machine without
    hyper-threads) and with one; speeds relative to one thread."""
    runner = StepRunner(data_loader.idx_split(options.data_dir, "train"),
                        step_args(options.batch_size, "fp32", torch.device("cpu"), False))
    for _ in range(options.warmup):
        runner.step()
    previous = torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0))
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)  # let it settle on a core
        picked, why = idle_threads()
        calls = max(options.steps // options.rounds, 1)

        def timer(threads: int) -> Callable[[], float]:
            def timed() -> float:
                torch.set_num_threads(threads)
                runner.step()  # the first step after a change of threads wakes OpenMP's pool
                return seconds_per_call(runner.step, runner.args.device, calls)
            return timed

        counts = sorted({1, picked, cpus})
        measured = fastest_in_rounds({threads: timer(threads) for threads in counts}, options.busy_rounds)
    finally:
        neighbour.kill()
        neighbour.wait()
        torch.set_num_threads(previous)
    ms = {threads: 1e3 * min(seconds) for threads, seconds in measured.items()}
    return {"picked_threads": picked, "picked_because": why, "cpus": cpus,
            "ms_per_step": {str(threads): value for threads, value in ms.items()},
            "picked_vs_one_thread": ms[1] / ms[picked], "all_cpus_vs_one_thread": ms[1] / ms[cpus]}


# ---- the machine and the report ------------------------------------------------------------------

def cpuinfo_field(name: str) -> str | None:
    """The first value of a /proc/cpuinfo field, or None off Linux."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    values = [line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == name]
    return values[0] if values else None


def cpu_name() -> str:
    """The CPU's model name where Linux tells it (platform.processor() only says x86_64)."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_bf16_units() -> list[str]:
    """The CPU's bf16 matrix instructions (AMX, AVX512-BF16); without them bf16 matmuls are emulated."""
    flags = (cpuinfo_field("flags") or "").split()
    return [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags]


def devices(name: str) -> list[torch.device]:
    if name == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [pick_device(name)]


def machine_line(machine: dict) -> str:
    """The CPU, its threads, torch and the load average at the start of the run."""
    return (f"{machine['cpu']} (bf16 units: {', '.join(machine['cpu_bf16_units']) or 'none'}), "
            f"{machine['torch_threads']} CPU threads ({machine['threads_because']}), torch {machine['torch']}, "
            f"load average {machine['load_average_at_start'][0]:.2f} at start")


def split_tables(splits: dict) -> list[str]:
    """The profiled time split of each device's steps, as Markdown tables (none without --profile-steps)."""
    lines = []
    for device, split in ((device, split) for device, split in splits.items() if split):
        kinds = sorted({kind for parts in split.values() for kind in parts})
        lines += ["", f"Where a step's time goes on {device} (ms per step, profiled):", "",
                  "| step | " + " | ".join(kinds) + " |", "| --- |" + " --- |" * len(kinds)]
        for name, parts in split.items():
            lines.append(f"| {name} | " + " | ".join(f"{parts.get(kind, 0.0):.2f}" for kind in kinds) + " |")
    return lines


def format_report(results: dict) -> str:
    """The results as Markdown tables."""
    lines = [f"{machine_line(results['machine'])}; "
             f"batch {results['batch_size']}, {results['step_flops'] / 1e9:.3f} GFLOP per step", "",
             "| device | step | ms/step | s/epoch | GFLOP/s | of the bound | compile s | graphs | breaks |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results["rows"]:
        compiled = (f"{row['compile_s']:.0f} | {row['graphs']} | {row['graph_breaks']}" if row["compile"]
                    else "- | - | -")
        lines.append(f"| {row['device']} | {row['name']} | {row['ms_per_step']:.2f} | {row['s_per_epoch']:.2f} | "
                     f"{row['gflops']:.1f} | {row['share_of_bound']:.0%} | {compiled} |")
    for bound in results["bounds"]:
        epoch_s = bound["bound_ms"] * (MNIST_TRAIN // results["batch_size"]) / 1e3
        lines.append(f"| {bound['device']} | FLOP bound {bound['dtype']} (matmuls in sequence) | "
                     f"{bound['bound_ms']:.2f} | {epoch_s:.2f} | {bound['gflops']:.1f} | 100% | | | |")
    lines += split_tables(results["split"])
    busy = results.get("busy_neighbour")
    if busy:
        lines += ["", f"Beside one busy process: training.py picks {busy['picked_threads']} thread(s) "
                      f"({busy['picked_because']}).", "",
                  "| threads | ms/step | speed vs 1 thread |", "| --- | --- | --- |"]
        for threads, ms in busy["ms_per_step"].items():
            lines.append(f"| {threads} | {ms:.2f} | {busy['ms_per_step']['1'] / ms:.2f}x |")
    return "\n".join(lines)


def format_conv_report(results: dict) -> str:
    """The conv results as a Markdown table: each step beside its FLOP bound at the same image shape."""
    batches = results["batches"]
    lines = [f"{machine_line(results['machine'])}; conv step, batch {results['batch_size']} "
             f"({batches['groups_per_batch']} groups x {batches['images_per_group']} images) of random uint8 "
             f"images in {batches['groups']} groups", "",
             "| device | image | step | images/s | ms/step | GFLOP/s | of the bound | bound ms | GFLOP per step "
             "| compile s | graphs | breaks |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    bounds = {(bound["device"], bound["image"], bound["dtype"]): bound for bound in results["bounds"]}
    for row in results["rows"]:
        bound = bounds[row["device"], row["image"], row["precision"]]
        compiled = (f"{row['compile_s']:.0f} | {row['graphs']} | {row['graph_breaks']}" if row["compile"]
                    else "- | - | -")
        step = row["name"][len(row["image"]) + 1:]
        lines.append(f"| {row['device']} | {row['image']} | {step} | {row['images_per_s']:.0f} | "
                     f"{row['ms_per_step']:.1f} | {row['gflops']:.1f} | {row['share_of_bound']:.0%} | "
                     f"{bound['bound_ms']:.1f} | {bound['step_flops'] / 1e9:.2f} | {compiled} |")
    return "\n".join(lines + split_tables(results["split"]))


def machine_info(threads: int, why: str) -> dict:
    """The CPU, its bf16 units, the threads and why, torch, CUDA and the load average at the start."""
    return {"cpu": cpu_name(), "cpu_bf16_units": cpu_bf16_units(), "cpu_count": os.cpu_count(),
            "torch_threads": threads, "threads_because": why, "torch": torch.__version__,
            "load_average_at_start": os.getloadavg(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def on_each_device(results: dict, options: argparse.Namespace, benchmark: Callable) -> dict:
    """`results` with the rows, bounds and time split of `benchmark` (benchmark_device or
    benchmark_conv_device) on every device asked for."""
    for device in devices(options.device):
        with torch._inductor.config.patch(force_disable_caches=True):  # the compile time of a first compile
            rows, bounds, split = benchmark(device, options)
        results["rows"] += rows
        results["bounds"] += bounds
        results["split"][str(device)] = split
    return results


def mlp_results(options: argparse.Namespace, machine: dict) -> dict:
    """The MLP step's rows, bounds, time split and busy-neighbour ratio."""
    defaults = step_args(options.batch_size, "fp32", torch.device("cpu"), False)
    results = on_each_device({"rows": [], "bounds": [], "split": {}, "batch_size": options.batch_size,
                              "step_flops": step_flops(options.batch_size, defaults.style_dim, defaults.class_dim),
                              "machine": machine}, options, benchmark_device)
    if options.busy_rounds > 0 and options.device in ("all", "cpu"):
        results["busy_neighbour"] = busy_neighbour(options)
    return results


def conv_results(options: argparse.Namespace, machine: dict) -> dict:
    """The conv step's rows, bounds and time split at every image size and channel count."""
    images_per_group = training.DEFAULT_IMAGES_PER_GROUP
    return on_each_device({"arch": "conv", "rows": [], "bounds": [], "split": {}, "batch_size": options.batch_size,
                           "batches": {"groups_per_batch": options.batch_size // images_per_group,
                                       "images_per_group": images_per_group, "groups": SYNTHETIC_GROUPS,
                                       "images": synthetic_rows(options.batch_size)},
                           "machine": machine}, options, benchmark_conv_device)


@reports_errors
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    options = parser.parse_args(argv)
    settle_options(parser, options)
    if options.device != "all":
        try:
            pick_device(options.device)
        except ValueError as error:
            parser.error(f"--device: {error}")
    if options.json is not None:
        check_writable(options.json, "--json")
    threads, why = pick_threads(options.threads)
    torch.set_num_threads(threads)
    set_float32_precision("fp32")  # as training.py runs by default: strict fp32 matmuls (bf16 autocasts the networks)
    machine = machine_info(threads, why)
    results = mlp_results(options, machine) if options.arch == "mlp" else conv_results(options, machine)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    report = format_report(results) if options.arch == "mlp" else format_conv_report(results)
    print(report)
    if "bf16" in options.precision and not results["machine"]["cpu_bf16_units"] and cpuinfo_field("flags"):
        kernels = "matmuls" if options.arch == "mlp" else "matmuls and convolutions"
        print(f"note: {results['machine']['cpu']} has no bf16 matrix units (amx_bf16, avx512_bf16): its bf16 "
              f"{kernels} are emulated, so --precision bf16 is slower than fp32 on this CPU.")
    if options.json is not None:
        write_text_atomic(options.json, json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
