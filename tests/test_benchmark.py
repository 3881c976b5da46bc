"""benchmark.py: the bound runs the step's matmuls (and the conv step's convolutions), the rounds interleave,
the CLI reports every part."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from studies import benchmark


def test_rounds_interleave_the_timers_and_keep_every_measurement():
    calls = []
    timers = {name: (lambda name=name: calls.append(name) or len(calls)) for name in ("bound", "step")}
    measured = benchmark.fastest_in_rounds(timers, rounds=3)
    assert calls == ["bound", "step"] * 3
    assert measured == {"bound": [1, 3, 5], "step": [2, 4, 6]}


def test_the_bound_runs_the_steps_matmuls_in_its_order_and_layouts():
    gemms = benchmark.step_gemms(8, 10, 10)
    names = [name for name, *_ in gemms]
    assert names[:4] == ["encoder.linear_1 forward", "encoder.heads forward", "decoder.linear_1 forward",
                         "decoder.linear_2 forward"]
    assert names[4:6] == ["decoder.linear_2 grad input", "decoder.linear_2 grad weight"]
    assert names[-1] == "encoder.linear_1 grad weight" and "encoder.linear_1 grad input" not in names
    # nn.Linear reads its [out, in] weight transposed; autograd reads dy transposed for the weight gradient.
    assert all(b_t and not a_t for name, _, _, _, a_t, b_t in gemms if name.endswith("forward"))
    assert all(a_t and not b_t for name, _, _, _, a_t, b_t in gemms if name.endswith("grad weight"))
    assert benchmark.gemm_bound_timer(8, 10, 10, torch.float32, torch.device("cpu"), calls=1)() > 0


def test_flop_count_matches_the_networks_shapes():
    # Forward: 784*500 + 500*40 + 20*500 + 500*784 multiply-adds per image; backward twice that,
    # less the gradient of the pixels.
    forward = 784 * 500 + 500 * 40 + 20 * 500 + 500 * 784
    assert benchmark.step_flops(256, 10, 10) == 2 * 256 * (3 * forward - 784 * 500)


def test_profiled_ops_fall_into_the_parts_of_a_step():
    kinds = {name: benchmark.kernel_kind(name) for name in
             ("aten::addmm", "aten::mm", "aten::_fused_adam_", "mlvae::fused_adam_", "aten::tanh",
              "Torch-Compiled Region: 0/0", "ProfilerStep#1")}
    assert kinds == {"aten::addmm": "matmuls", "aten::mm": "matmuls", "aten::_fused_adam_": "Adam",
                     "mlvae::fused_adam_": "Adam",
                     "aten::tanh": "other kernels", "Torch-Compiled Region: 0/0": "compiled kernels",
                     "ProfilerStep#1": "other"}


SMALL = ["--steps", "2", "--warmup", "2", "--rounds", "2", "--bound-calls", "1", "--profile-steps", "2",
         "--batch-size", "64", "--device", "cpu"]


def test_benchmark_reports_steps_bound_split_and_busy_neighbour(tmp_path, capsys):
    path = tmp_path / "bench.json"
    results = benchmark.main([*SMALL, "--busy-rounds", "1", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))
    assert [row["name"] for row in results["rows"]] == ["eager fp32", "eager bf16"]
    assert all(row["ms_per_step"] > 0 and 0 < row["share_of_bound"] for row in results["rows"])
    assert {bound["dtype"] for bound in results["bounds"]} == {"fp32", "bf16"}
    split = results["split"]["cpu"]["eager fp32"]
    assert split["matmuls"] > 0 and split["Adam"] > 0 and split["other kernels"] > 0
    busy = results["busy_neighbour"]
    assert busy["picked_threads"] >= 1 and set(busy["ms_per_step"]) >= {"1", str(busy["picked_threads"])}
    out = capsys.readouterr().out
    assert "FLOP bound fp32" in out and "Beside one busy process" in out


def test_compiled_rows_count_graphs_and_breaks(monkeypatch):
    # aot_eager traces the very graph the default backend compiles, without a minute of C++ compilation.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, **kwargs, backend="aot_eager"))
    results = benchmark.main([*SMALL, "--compile", "--precision", "fp32", "--busy-rounds", "0",
                              "--profile-steps", "0"])
    compiled = results["rows"][1]
    assert compiled["name"] == "compiled fp32" and (compiled["graphs"], compiled["graph_breaks"]) == (1, 0)
    assert compiled["compile_s"] > 0


# ---- the conv step -------------------------------------------------------------------------------

def test_conv_layer_flops_are_the_hand_computation():
    conv = benchmark.Layer("conv", "conv", (2, 3, 8, 8), (32, 3, 4, 4), (2, 32, 4, 4), (2, 2), (1, 1))
    transposed = benchmark.Layer("deconv", "conv transposed", (2, 32, 4, 4), (32, 3, 4, 4), (2, 3, 8, 8), (2, 2),
                                 (1, 1))
    linear = benchmark.Layer("head", "linear", (2, 512), (10, 512), (2, 10))
    # Conv: 4x4 outputs x 32 channels, each 3 channels x 4x4 taps; the transposed conv spreads each of
    # its 4x4 x 32 inputs over 3 channels x 4x4 outputs; the Linear 512 x 10 per image.
    assert benchmark.layer_macs(conv) == 2 * (4 * 4 * 32) * (3 * 4 * 4)
    assert benchmark.layer_macs(transposed) == 2 * (4 * 4 * 32) * (3 * 4 * 4)
    assert benchmark.layer_macs(linear) == 2 * 512 * 10


def test_conv_step_flops_count_every_pass_of_every_layer():
    # At 8x8x3 the stack is one Conv 3->32 (8->4 px), four heads 512->10, two code inputs 10->256 and
    # one ConvT 32->3 (4->8 px). The pixels get no gradient, so the first conv has two passes, the rest three.
    batch, conv = 4, 4 * 4 * 32 * 3 * 4 * 4
    macs = 2 * conv + 3 * 4 * 512 * 10 + 3 * 2 * 10 * 256 + 3 * conv
    layers = benchmark.conv_layers((3, 8, 8), batch, 10, 10)
    assert [layer.kind for layer in layers] == ["conv"] + ["linear"] * 6 + ["conv transposed"]
    assert benchmark.conv_step_flops(layers) == 2 * batch * macs
    passes = benchmark.conv_step_passes(layers)
    assert passes[:len(layers)] == [(layer, "forward") for layer in layers]
    assert passes[-1] == (layers[0], "grad weight") and (layers[0], "grad input") not in passes


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 8, 8)])
def test_the_conv_bound_runs_the_flops_the_step_runs(shape):
    # torch's own FLOP counter, over one real training step and over one run of the bound's kernels.
    layers = benchmark.conv_layers(shape, 8, 10, 10)
    runner = benchmark.StepRunner(benchmark.synthetic_split(shape, 8),
                                  benchmark.conv_step_args(8, "fp32", torch.device("cpu"), False))
    bound = benchmark.conv_bound_timer(layers, torch.float32, torch.device("cpu"), calls=1)
    with FlopCounterMode(display=False) as step_counter:
        runner.step()
    with FlopCounterMode(display=False) as bound_counter:
        assert bound() > 0
    assert step_counter.get_total_flops() == bound_counter.get_total_flops() == benchmark.conv_step_flops(layers)


def test_synthetic_split_gives_group_balanced_batches_of_every_group():
    split = benchmark.synthetic_split((3, 8, 8), 16)
    assert split.images.dtype == torch.uint8 and split.images.shape == (benchmark.SYNTHETIC_GROUPS * 8, 3, 8, 8)
    assert torch.bincount(split.labels).tolist() == [8] * benchmark.SYNTHETIC_GROUPS
    runner = benchmark.StepRunner(split, benchmark.conv_step_args(16, "fp32", torch.device("cpu"), False))
    x, groups = runner.batch()
    assert x.shape == (16, 3, 8, 8) and groups.tolist() == [0] * 8 + [1] * 8
    assert runner.batches.steps_per_epoch == 32  # 64 groups x 8 images in batches of 2 groups


CONV_SMALL = ["--arch", "conv", "--image-sizes", "8", "28", "--channels", "1", "3", "--batch-size", "16",
              "--steps", "1", "--rounds", "2", "--warmup", "1", "--precision", "fp32", "--device", "cpu"]


def test_conv_benchmark_has_a_row_per_size_and_channels_against_its_bound(tmp_path, capsys):
    path = tmp_path / "bench_conv.json"
    results = benchmark.main([*CONV_SMALL, "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))
    rows = results["rows"]
    assert sorted((row["image_size"], row["channels"]) for row in rows) == [(8, 1), (8, 3), (28, 1), (28, 3)]
    assert all(row["images_per_s"] == pytest.approx(16e3 / row["ms_per_step"]) for row in rows)
    bounds = {(bound["image"], bound["dtype"]): bound for bound in results["bounds"]}
    assert len(bounds) == 4 and all(bound["bound_ms"] > 0 for bound in bounds.values())
    for row in rows:
        bound = bounds[row["image"], "fp32"]
        assert row["share_of_bound"] == pytest.approx(bound["bound_ms"] / row["ms_per_step"])
        # The bound is part of the step's work; 20x leaves room for a busy machine's noise.
        assert 0 < row["share_of_bound"] < 20
    assert bounds["28px C=3", "fp32"]["step_flops"] > bounds["28px C=1", "fp32"]["step_flops"]
    out = capsys.readouterr().out
    assert all(f"| cpu | {image} | eager fp32 |" in out for image in ("8px C=1", "8px C=3", "28px C=1", "28px C=3"))
    assert "Where a step's time goes" not in out  # no profile unless --profile-steps asks for one


def test_profiled_convolutions_are_a_part_of_their_own():
    names = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
             "aten::slow_conv_transpose2d")
    assert {benchmark.kernel_kind(name) for name in names} == {"convolutions"}
    assert benchmark.kernel_kind("aten::native_batch_norm") == "other kernels"


def test_compiled_conv_step_is_one_graph(monkeypatch):
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, **kwargs, backend="aot_eager"))
    results = benchmark.main(["--arch", "conv", "--image-sizes", "8", "--channels", "3", "--batch-size", "8",
                              "--steps", "1", "--rounds", "1", "--warmup", "2", "--precision", "fp32", "--compile",
                              "--device", "cpu"])
    eager, compiled = results["rows"]
    assert (eager["name"], compiled["name"]) == ("8px C=3 eager fp32", "8px C=3 compiled fp32")
    assert (compiled["graphs"], compiled["graph_breaks"]) == (1, 0) and compiled["compile_s"] > 0


@pytest.mark.parametrize("flags, named", [
    (["--arch", "conv", "--image-sizes", "30"], "--image-sizes 30"),
    (["--arch", "conv", "--batch-size", "12"], "--batch-size 12"),
    (["--arch", "conv", "--busy-rounds", "3"], "--busy-rounds"),
    (["--image-sizes", "32"], "--arch conv"),
    (["--arch", "conv", "--channels", "2"], "--channels"),
])
def test_bad_conv_flags_end_in_one_error_line(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(flags)
    assert exit_.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and named in err[-1] and "Traceback" not in "".join(err)
