"""Time training.py's step, eager and compiled, in fp32 and bf16, against this machine's FLOP bound.

The step timed is `training.train_step` itself, on MNIST batches indexed from a permutation as
`training.py` does; with `--compile` the compiled steps go through `training.compile_step`, as
`training.py --compile` does. In the same run the script measures:
- the FLOP bound: the step's matmuls alone, one after another in the step's order, at the network's
  shapes and memory layouts, in fp32 and bf16 (the fastest a step could be, its FLOPs counted);
- each compiled step's compile time (its first call, with Inductor's caches off) and its graphs and
  graph breaks (`torch._dynamo.explain`);
- where a step's time goes: a profile split into matmuls, other kernels, Adam and the rest;
- the busy-neighbour ratio: the eager step beside a busy process (`python -c "while True: pass"`),
  with the threads `training.py` picks and with one per CPU, each against one thread.
The bound and the steps are timed in short interleaved rounds and each keeps its fastest round, so
that on a shared machine they are compared under the same conditions.

    python -m studies.benchmark --compile --json out/benchmark.json   # the full table, CPU (and CUDA when present)
    python -m studies.benchmark --precision fp32                      # the eager fp32 step only (10 s here)
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile

import data_loader
import training
from networks import HIDDEN, PIXELS, build_networks
from runs import (POSITIVE_INT, check_writable, idle_threads, pick_device, pick_threads, reports_errors,
                  repository_path, script_parser, set_float32_precision, write_text_atomic)

MNIST_TRAIN = 60000
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add = parser.add_argument
    add("--batch-size", type=POSITIVE_INT, default=256, help="images per training step")
    add("--steps", type=POSITIVE_INT, default=200,
        help="timed training steps per configuration, spread over the rounds")
    add("--warmup", type=POSITIVE_INT, default=20,
        help="untimed steps first (compilation, allocator, oneDNN caches); the first one is the compile time")
    add("--rounds", type=POSITIVE_INT, default=40,
        help="rounds of measurement; each round times the bound and every configuration once, and each "
             "one's fastest round is kept, as timeit does")
    add("--bound-calls", type=POSITIVE_INT, default=2, help="repeats of the step's matmuls per round, for the bound")
    add("--precision", nargs="+", choices=tuple(DTYPES), default=list(DTYPES),
        help="precisions of the step to time (bf16 = autocast, as training.py --precision bf16)")
    add("--compile", action="store_true",
        help="also time each precision through training.py --compile (each compiles in 10-20 s here)")
    add("--profile-steps", type=int, default=20, help="steps profiled for the time split (0: no split)")
    add("--busy-rounds", type=int, default=10,
        help="rounds of the busy-neighbour measurement (0: none); it runs on the CPU only")
    add("--device", default="all", help="all (the CPU, plus CUDA when present), cpu, cuda or cuda:N")
    add("--threads", type=POSITIVE_INT, default=None,
        help="CPU threads (default: as training.py picks them, one per CPU idle at the start)")
    add("--data-dir", default=repository_path("data"), help="folder holding MNIST/raw/ IDX files")
    add("--json", type=Path, default=None, help="also write the results here")
    return parser


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


def gemm_bound_timer(batch: int, style_dim: int, class_dim: int, dtype: torch.dtype, device: torch.device,
                     calls: int) -> Callable[[], float]:
    """A timer of the step's FLOP bound: the step's matmuls one after another in the step's order, at
    their own shapes, memory layouts and dtype, and nothing else. Each call returns seconds per step
    from `calls` repeats."""
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

    return lambda: seconds_per_call(sequence, device, calls)


# ---- the training step ---------------------------------------------------------------------------

def step_args(batch: int, precision: str, device: torch.device, compile_: bool) -> argparse.Namespace:
    """training.py's own defaults for everything but batch, precision, device and compile."""
    args = training.build_parser().parse_args(["--batch-size", str(batch), "--precision", precision]
                                              + ["--compile"] * compile_)
    args.device = device
    return args


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
    warmup_s = first_s + seconds_per_call(runner.step, runner.args.device, warmup - 1) * (warmup - 1)
    return lambda: seconds_per_call(runner.step, runner.args.device, calls), first_s, warmup_s


def kernel_kind(name: str) -> str:
    """The part of a step a profiled op belongs to."""
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        return "matmuls"
    if "adam" in name:
        return "Adam"
    if name.startswith("aten::"):
        return "other kernels"
    if "CompiledFxGraph" in name or "Torch-Compiled Region" in name:
        return "compiled kernels"  # Inductor's generated kernels: element-wise, reductions and Adam fused
    return "other"


def step_split(runner: StepRunner, steps: int) -> dict:
    """Milliseconds per step of its matmuls, Adam, its other kernels (or Inductor's fused kernels) and the
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


def step_row(name: str, seconds: list[float], batch: int, **fields) -> dict:
    """A table row from a configuration's per-round seconds per step (the fastest round counts)."""
    best = min(seconds)
    return {"name": name, "ms_per_step": 1e3 * best, "ms_per_step_median": 1e3 * statistics.median(seconds),
            "images_per_s": batch / best, "s_per_epoch": (MNIST_TRAIN // batch) * best, **fields}


def benchmark_device(device: torch.device, options: argparse.Namespace) -> tuple[list[dict], list[dict], dict]:
    """(rows of the step configurations, the FLOP bounds, the time split) on `device`."""
    split = data_loader.idx_split(options.data_dir, "train")
    defaults = step_args(options.batch_size, "fp32", device, False)
    flops = step_flops(options.batch_size, defaults.style_dim, defaults.class_dim)
    calls = max(options.steps // options.rounds, 1)
    runners, fields = {}, {}
    for precision in options.precision:
        for compile_ in (False, True) if options.compile else (False,):
            name = ("compiled" if compile_ else "eager") + f" {precision}"
            runners[name] = StepRunner(split, step_args(options.batch_size, precision, device, compile_))
            fields[name] = {"precision": precision, "compile": compile_}
    for name, runner in runners.items():  # explain() resets Dynamo: before any compiled step runs
        if runner.args.compile:
            fields[name].update(runner.explain())
    timers = {f"bound {precision}": gemm_bound_timer(options.batch_size, defaults.style_dim, defaults.class_dim,
                                                     DTYPES[precision], device, options.bound_calls)
              for precision in options.precision}
    for name, runner in runners.items():
        timers[name], first_s, warmup_s = step_timer(runner, options.warmup, calls)
        fields[name].update(first_step_s=first_s, warmup_s=warmup_s)
    measured = fastest_in_rounds(timers, options.rounds)
    bounds = {precision: {"dtype": precision, "device": str(device), "step_flops": flops,
                          "bound_ms": 1e3 * min(measured[f"bound {precision}"]),
                          "bound_ms_median": 1e3 * statistics.median(measured[f"bound {precision}"]),
                          "gflops": flops / min(measured[f"bound {precision}"]) / 1e9}
              for precision in options.precision}
    rows = []
    for name, extra in fields.items():
        row = step_row(name, measured[name], options.batch_size, device=str(device), **extra)
        steady_s = row["ms_per_step"] / 1e3
        row.update(gflops=flops / steady_s / 1e9,
                   share_of_bound=bounds[row["precision"]]["bound_ms"] / row["ms_per_step"])
        if row["compile"]:
            row["compile_s"] = row["first_step_s"] - steady_s
        rows.append(row)
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


def format_report(results: dict) -> str:
    """The results as Markdown tables."""
    machine = results["machine"]
    lines = [f"{machine['cpu']} (bf16 units: {', '.join(machine['cpu_bf16_units']) or 'none'}), "
             f"{machine['torch_threads']} CPU threads ({machine['threads_because']}), torch {machine['torch']}, "
             f"load average {machine['load_average_at_start'][0]:.2f} at start; "
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
    for device, split in results["split"].items():
        kinds = sorted({kind for parts in split.values() for kind in parts})
        lines += ["", f"Where a step's time goes on {device} (ms per step, profiled):", "",
                  "| step | " + " | ".join(kinds) + " |", "| --- |" + " --- |" * len(kinds)]
        for name, parts in split.items():
            lines.append(f"| {name} | " + " | ".join(f"{parts.get(kind, 0.0):.2f}" for kind in kinds) + " |")
    busy = results.get("busy_neighbour")
    if busy:
        lines += ["", f"Beside one busy process: training.py picks {busy['picked_threads']} thread(s) "
                      f"({busy['picked_because']}).", "",
                  "| threads | ms/step | speed vs 1 thread |", "| --- | --- | --- |"]
        for threads, ms in busy["ms_per_step"].items():
            lines.append(f"| {threads} | {ms:.2f} | {busy['ms_per_step']['1'] / ms:.2f}x |")
    return "\n".join(lines)


@reports_errors
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    options = parser.parse_args(argv)
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
    defaults = step_args(options.batch_size, "fp32", torch.device("cpu"), False)
    results = {"rows": [], "bounds": [], "split": {}, "batch_size": options.batch_size,
               "step_flops": step_flops(options.batch_size, defaults.style_dim, defaults.class_dim),
               "machine": {"cpu": cpu_name(), "cpu_bf16_units": cpu_bf16_units(), "cpu_count": os.cpu_count(),
                           "torch_threads": threads, "threads_because": why, "torch": torch.__version__,
                           "load_average_at_start": os.getloadavg(),
                           "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    for device in devices(options.device):
        with torch._inductor.config.patch(force_disable_caches=True):  # the compile time of a first compile
            rows, bounds, split = benchmark_device(device, options)
        results["rows"] += rows
        results["bounds"] += bounds
        results["split"][str(device)] = split
    if options.busy_rounds > 0 and options.device in ("all", "cpu"):
        results["busy_neighbour"] = busy_neighbour(options)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    report = format_report(results)
    print(report)
    if "bf16" in options.precision and not results["machine"]["cpu_bf16_units"] and cpuinfo_field("flags"):
        print(f"note: {results['machine']['cpu']} has no bf16 matrix units (amx_bf16, avx512_bf16): its bf16 "
              "matmuls are emulated, so --precision bf16 is slower than fp32 on this CPU.")
    if options.json is not None:
        write_text_atomic(options.json, json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
