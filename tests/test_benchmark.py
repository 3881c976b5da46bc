"""benchmark.py: the bound runs the step's matmuls, the rounds interleave, the CLI reports every part."""
import json

import torch

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
             ("aten::addmm", "aten::mm", "aten::_fused_adam_", "aten::tanh", "Torch-Compiled Region: 0/0",
              "ProfilerStep#1")}
    assert kinds == {"aten::addmm": "matmuls", "aten::mm": "matmuls", "aten::_fused_adam_": "Adam",
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
