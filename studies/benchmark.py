"""Time the ML-VAE training step against this machine's FLOP bound and against a per-sample-loop baseline.

The step timed is `training.train_step` itself, on MNIST batches indexed from a permutation as
`training.py` does. In the same run the script measures the machine's matmul throughput at the
network's own GEMM shapes and layouts (fp32 and bf16): the step's matmuls run in the step's order
give the fastest a step could be (the FLOP bound, with its FLOPs counted explicitly), and each matmul
run alone gives a stricter sum. It also times a baseline that accumulates group evidence and draws
the grouped noise the way the reference does: Python loops over the samples with per-group dicts.
The bounds and the steps are timed in short interleaved rounds and each keeps its fastest round, so
that on a shared machine they are compared under the same conditions.

    python benchmark.py --json benchmark.json               # the full table, CPU (and CUDA when present)
    python benchmark.py --precision bf16 --compile          # also time torch.compile'd steps
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable
from unittest import mock

import torch

import data_loader
import training
import utils
from networks import HIDDEN, PIXELS, Decoder, Encoder
from runs import script_parser

MNIST_TRAIN = 60000
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add = parser.add_argument
    add("--batch-size", type=int, default=256, help="images per training step")
    add("--steps", type=int, default=200, help="timed training steps per configuration, spread over the rounds")
    add("--warmup", type=int, default=20, help="untimed steps first (allocator, oneDNN and autotuning caches)")
    add("--rounds", type=int, default=40,
        help="rounds of measurement; each round times the bound and every configuration once, and each "
             "one's fastest round is kept, as timeit does")
    add("--bound-calls", type=int, default=2, help="repeats of the step's matmuls per round, for the FLOP bound")
    add("--baseline-steps", type=int, default=20, help="timed steps of the slow loop baseline")
    add("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
        help="precisions of our step to time (bf16 = autocast, as training.py --precision bf16)")
    add("--compile", action="store_true", help="also time each precision with training.py --compile")
    add("--device", default="all", help="all (the CPU, plus CUDA when present), cpu, cuda or cuda:N")
    add("--threads", type=int, default=None, help="CPU threads (default: torch's choice, one per core)")
    add("--data-dir", default="data", help="folder holding MNIST/raw/ IDX files")
    add("--json", type=Path, default=None, help="also write the results here")
    return parser


# ---- the network's FLOPs -------------------------------------------------------------------------

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


def step_gemms(batch: int, style_dim: int, class_dim: int) -> list[tuple[str, int, int, int, bool, bool]]:
    """Every matmul of a forward+backward step, in the order a step runs them, as
    (name, m, k, n, first operand transposed, second operand transposed).

    For y = x W^T with x [B, in] and the weight stored [out, in] (the reference's layout): forward
    x @ W^T (m=B, k=in, n=out) reads W through a transposed view, as nn.Linear does; input gradient
    dy @ W (m=B, k=out, n=in); weight gradient dy^T @ x (m=out, k=B, n=in) reads dy through a transposed
    view, as autograd does. Biases, activations and the loss are O(B * width) and left out of the bound.
    """
    layers = linear_layers(style_dim, class_dim)
    gemms = [(f"{name} forward", batch, fan_in, fan_out, False, True) for name, fan_in, fan_out, _ in layers]
    for name, fan_in, fan_out, input_grad in reversed(layers):
        if input_grad:
            gemms.append((f"{name} grad input", batch, fan_out, fan_in, False, False))
        gemms.append((f"{name} grad weight", fan_out, batch, fan_in, True, False))
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


def gemm_bound_timers(batch: int, style_dim: int, class_dim: int, dtype: torch.dtype, device: torch.device,
                      calls: int) -> dict[str, Callable[[], float]]:
    """Two timers of the step's FLOP bound, at the matmuls' own shapes, memory layouts and dtype.

    "sequence": the step's matmuls one after another in the step's order, and nothing else: the
    fastest a step could run. "alone": each matmul repeated back to back on its own, the times summed.
    A matmul measures faster repeated than between other matmuls, so this sum is lower than what a
    step, which runs each once, can reach. Each timer call returns seconds per step from `calls` repeats.
    """
    generator = torch.Generator(device=device).manual_seed(0)

    def operand(rows: int, cols: int, transposed: bool) -> torch.Tensor:
        shape = (cols, rows) if transposed else (rows, cols)
        t = torch.randn(shape, generator=generator, device=device).to(dtype)
        return t.t() if transposed else t

    products = []
    for _, m, k, n, a_transposed, b_transposed in step_gemms(batch, style_dim, class_dim):
        a, b = operand(m, k, a_transposed), operand(k, n, b_transposed)
        product = functools.partial(torch.mm, a, b, out=torch.empty(m, n, device=device, dtype=dtype))
        product()  # warm-up: the library picks and caches its kernel on the first call
        products.append(product)

    def sequence() -> None:
        for product in products:
            product()

    return {"sequence": lambda: seconds_per_call(sequence, device, calls),
            "alone": lambda: sum(seconds_per_call(product, device, calls) for product in products)}


# ---- the reference-style loop baseline -----------------------------------------------------------

def loop_accumulate_group_evidence(class_mu: torch.Tensor, class_logvar: torch.Tensor, groups: torch.Tensor,
                                   index: object = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Group evidence accumulation as the reference does it: one Python iteration per sample.

    precision_g = sum_i 1 / exp(logvar_i) and mu_g = sum_i mu_i / exp(logvar_i) / precision_g, kept in
    dicts keyed by label; a second loop gives each sample its group's posterior. `index` is taken
    only to match utils.accumulate_group_evidence's signature: the dicts replace it.
    """
    labels = groups.tolist()
    precision, weighted_mu = {}, {}
    for i, label in enumerate(labels):
        sample_precision = 1.0 / torch.exp(class_logvar[i])
        if label in precision:
            precision[label] = precision[label] + sample_precision
            weighted_mu[label] = weighted_mu[label] + class_mu[i] * sample_precision
        else:
            precision[label] = sample_precision
            weighted_mu[label] = class_mu[i] * sample_precision
    group_mu, group_logvar = [], []
    for label in labels:
        group_mu.append(weighted_mu[label] / precision[label])
        group_logvar.append(torch.log(1.0 / precision[label]))
    return torch.stack(group_mu), torch.stack(group_logvar)


def loop_group_noise(groups: torch.Tensor, dim: int, generator: torch.Generator | None = None,
                     device: torch.device | None = None) -> dict[int, torch.Tensor]:
    """One eps ~ N(0, I) per label, drawn one label at a time."""
    return {label: torch.randn(dim, generator=generator, device=device) for label in sorted(set(groups.tolist()))}


def loop_assign_group_noise(mu: torch.Tensor, logvar: torch.Tensor, groups: torch.Tensor, eps_std: float,
                            noise: dict[int, torch.Tensor]) -> torch.Tensor:
    """z_i = mu_i + eps_std * noise[label_i] * std_i, one Python iteration per sample."""
    rows = [mu[i] + eps_std * noise[label] * torch.exp(0.5 * logvar[i]) for i, label in enumerate(groups.tolist())]
    return torch.stack(rows)


def loop_group_wise_reparameterize(mu: torch.Tensor, logvar: torch.Tensor, groups: torch.Tensor,
                                   eps_std: float, generator: torch.Generator | None = None,
                                   index: object = None) -> torch.Tensor:
    """The grouped reparameterization with the reference's loops: noise per label, then per sample.

    `index` is taken only to match utils.group_wise_reparameterize's signature.
    """
    noise = loop_group_noise(groups, mu.shape[1], generator, mu.device)
    return loop_assign_group_noise(mu, logvar, groups, eps_std, noise)


@contextmanager
def loop_baseline():
    """Run training.compute_losses with its
    two grouped operations replaced by their loop versions.

    Everything else (networks, reconstruction loss, Adam) stays the real training step.
    """
    with mock.patch.multiple(utils, accumulate_group_evidence=loop_accumulate_group_evidence,
                                group_wise_reparameterize=loop_group_wise_reparameterize):
        yield


# ---- timing the training step --------------------------------------------------------------------

def step_args(batch: int, precision: str, device: torch.device, compile_: bool) -> argparse.Namespace:
    """training.py's own defaults for everything but batch, precision, device and compile."""
    with tempfile.TemporaryDirectory() as scratch:
        # parse_args refuses an existing run folder; nothing is ever saved into this empty one.
        flags = ["--batch-size", str(batch), "--precision", precision, "--device", str(device),
                 "--checkpoint-dir", scratch, "--run-name", "benchmark"]
        return training.parse_args(flags + ["--compile"] * compile_)


def training_step_timer(images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace, warmup: int,
                        calls: int) -> tuple[Callable[[], float], float]:
    """A timer of `calls` training.train_step calls, on batches indexed from a permutation as
    training.train does, and the seconds its `warmup` untimed steps took (compilation included)."""
    device = args.device
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    encoder = Encoder(args.style_dim, args.class_dim).to(device)
    decoder = Decoder(args.style_dim, args.class_dim, args.likelihood).to(device)
    optimizer = training.make_optimizer(encoder, decoder, args)
    loss_fn = torch.compile(training.compute_losses) if args.compile else training.compute_losses
    perm = torch.randperm(len(images), generator=generator, device=device)
    batches = len(images) // args.batch_size
    position = 0

    def one_step() -> None:
        nonlocal position
        index = perm[position * args.batch_size:(position + 1) * args.batch_size]
        position = (position + 1) % batches
        training.train_step(encoder, decoder, optimizer, images.index_select(0, index),
                            labels.index_select(0, index), args, generator, loss_fn)

    warmup_s = seconds_per_call(one_step, device, warmup) * warmup if warmup > 0 else 0.0
    return lambda: seconds_per_call(one_step, device, calls), warmup_s


def step_row(name: str, seconds: list[float], batch: int, **fields) -> dict:
    """A table row from a configuration's per-round seconds per step (the fastest round counts)."""
    best = min(seconds)
    return {"name": name, "ms_per_step": 1e3 * best, "ms_per_step_median": 1e3 * statistics.median(seconds),
            "images_per_s": batch / best, "s_per_epoch": (MNIST_TRAIN // batch) * best, **fields}


def benchmark_device(device: torch.device, options: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    images, labels = data_loader.load_split(options.data_dir, "train", device=device)
    images = images.reshape(len(images), PIXELS)
    defaults = step_args(options.batch_size, "fp32", device, False)
    flops = step_flops(options.batch_size, defaults.style_dim, defaults.class_dim)
    # The fp32 bound is always measured: the loop baseline runs in fp32.
    dtypes = {precision: DTYPES[precision] for precision in ("fp32", *options.precision)}
    timers = {}
    for precision, dtype in dtypes.items():
        bound_timers = gemm_bound_timers(options.batch_size, defaults.style_dim, defaults.class_dim, dtype, device,
                                         options.bound_calls)
        timers.update({f"bound {precision} {kind}": timer for kind, timer in bound_timers.items()})
    configurations, warmups = {}, {}
    calls = max(options.steps // options.rounds, 1)
    for precision in options.precision:
        for compile_ in (False, True) if options.compile else (False,):
            name = f"ML-VAE step, {precision}" + " + compile" * compile_
            args = step_args(options.batch_size, precision, device, compile_)
            timers[name], warmups[name] = training_step_timer(images, labels, args, options.warmup, calls)
            configurations[name] = {"precision": precision, "compile": compile_}
    measured = fastest_in_rounds(timers, options.rounds)
    bounds = {}
    for precision, dtype in dtypes.items():
        sequence, alone = (measured[f"bound {precision} {kind}"] for kind in ("sequence", "alone"))
        bounds[precision] = {"dtype": str(dtype).removeprefix("torch."), "device": str(device), "step_flops": flops,
                             "bound_ms": 1e3 * min(sequence), "bound_ms_median": 1e3 * statistics.median(sequence),
                             "gflops": flops / min(sequence) / 1e9,
                             "alone_ms": 1e3 * min(alone), "alone_ms_median": 1e3 * statistics.median(alone),
                             "alone_gflops": flops / min(alone) / 1e9}
    rows = [step_row(name, measured[name], options.batch_size, warmup_s=warmups[name], **fields)
            for name, fields in configurations.items()]
    with loop_baseline():
        args = step_args(options.batch_size, "fp32", device, False)
        # One round of a few steps suffices: its time is Python, and each of its steps costs ~0.1 s.
        timer, warmup_s = training_step_timer(images, labels, args, min(options.warmup, 3), options.baseline_steps)
        rows.append(step_row("loop baseline, fp32", [timer()], options.batch_size, warmup_s=warmup_s,
                             precision="fp32", compile=False))
    baseline_ms = rows[-1]["ms_per_step"]
    for row in rows:
        row.update(device=str(device), gflops=flops / (row["ms_per_step"] / 1e3) / 1e9,
                   share_of_bound=bounds[row["precision"]]["bound_ms"] / row["ms_per_step"],
                   share_of_alone=bounds[row["precision"]]["alone_ms"] / row["ms_per_step"],
                   speedup_over_loops=baseline_ms / row["ms_per_step"])
    return rows, list(bounds.values())


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
    return [torch.device(name)]


def format_table(rows: list[dict], bounds: list[dict]) -> str:
    lines = [f"{'device':7} {'configuration':30} {'ms/step':>8} {'images/s':>9} {'s/epoch':>8} "
             f"{'GFLOP/s':>8} {'of bound':>8} {'of alone':>8} {'vs loops':>8} {'warm-up s':>9}"]
    for row in rows:
        lines.append(f"{row['device']:7} {row['name']:30} {row['ms_per_step']:8.2f} {row['images_per_s']:9.0f} "
                     f"{row['s_per_epoch']:8.2f} {row['gflops']:8.1f} {row['share_of_bound']:8.0%} "
                     f"{row['share_of_alone']:8.0%} {row['speedup_over_loops']:7.1f}x {row['warmup_s']:9.1f}")
    for bound in bounds:
        for kind, ms, gflops in (("in sequence", "bound_ms", "gflops"), ("alone", "alone_ms", "alone_gflops")):
            name = f"{bound['dtype']} matmuls {kind}"
            lines.append(f"{bound['device']:7} {name:30} {bound[ms]:8.2f} {'':9} {'':8} {bound[gflops]:8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    options = parser.parse_args(argv)
    for flag in ("batch_size", "steps", "rounds", "bound_calls", "baseline_steps"):
        if getattr(options, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    torch.set_float32_matmul_precision("high")  # as training.main does: TF32 matmuls on GPUs that have them
    defaults = step_args(options.batch_size, "fp32", torch.device("cpu"), False)
    flops = step_flops(options.batch_size, defaults.style_dim, defaults.class_dim)
    results = {"rows": [], "bounds": [], "batch_size": options.batch_size, "step_flops": flops,
               "machine": {"cpu": cpu_name(), "cpu_bf16_units": cpu_bf16_units(), "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                           "load_average_at_start": os.getloadavg(),
                           "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    for device in devices(options.device):
        rows, bounds = benchmark_device(device, options)
        results["rows"] += rows
        results["bounds"] += bounds
    results["machine"]["load_average_at_end"] = os.getloadavg()
    print(f"{results['machine']['cpu']}, bf16 units: {', '.join(results['machine']['cpu_bf16_units']) or 'none'}")
    print(f"batch {options.batch_size}, {flops / 1e9:.3f} GFLOP per step (forward + backward matmuls), "
          f"{results['machine']['torch_threads']} CPU threads, load average "
          f"{results['machine']['load_average_at_start'][0]:.1f} at start")
    print(format_table(results["rows"], results["bounds"]))
    load = results["machine"]["load_average_at_start"][0]  # at the end it counts this benchmark's own threads
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"note: load average {load:.1f} on {os.cpu_count()} cores: other processes share the CPU, so the "
              "times are slower than on a quiet machine; the ratios (of bound, vs loops) were taken under the "
              "same load. Try --threads 1 on a busy machine.")
    if "bf16" in options.precision and not results["machine"]["cpu_bf16_units"] and cpuinfo_field("flags"):
        print(f"note: {results['machine']['cpu']} has no bf16 matrix units (amx_bf16, avx512_bf16): its bf16 "
              "matmuls are emulated, so --precision bf16 is slower than fp32 on this CPU.")
    if options.json is not None:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
