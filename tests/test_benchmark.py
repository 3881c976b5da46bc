"""benchmark.py: the loop baseline computes what utils.py computes; the speed options train; the CLI runs."""
import csv
import functools
import json

import pytest
import torch

from studies import benchmark
import training
from utils import accumulate_group_evidence, group_wise_reparameterize

SMALL = ["--num-train", "512", "--batch-size", "64", "--epochs", "2", "--no-progress"]


@pytest.mark.parametrize("num_groups", [1, 3, 10, 64])
def test_loop_accumulation_equals_the_vectorised_one(num_groups):
    gen = torch.Generator().manual_seed(num_groups)
    mu, logvar = torch.randn(64, 7, generator=gen), torch.randn(64, 7, generator=gen)
    groups = torch.randint(0, num_groups, (64,), generator=gen) * 3  # ids need not be compact
    loop_mu, loop_logvar = benchmark.loop_accumulate_group_evidence(mu, logvar, groups)
    vector_mu, vector_logvar = accumulate_group_evidence(mu, logvar, groups)
    torch.testing.assert_close(loop_mu, vector_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loop_logvar, vector_logvar, rtol=1e-5, atol=1e-5)


def test_loop_reparameterization_equals_the_vectorised_one_for_the_same_noise():
    gen = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(32, 5, generator=gen), torch.randn(32, 5, generator=gen)
    groups = torch.randint(0, 6, (32,), generator=gen) + 2
    vector_z = group_wise_reparameterize(mu, logvar, groups, 0.1, generator=torch.Generator().manual_seed(1))
    # The noise utils.py drew: with mu 0, unit variance and eps_std 1, z_i is its group's eps.
    eps = group_wise_reparameterize(torch.zeros_like(mu), torch.zeros_like(logvar), groups, 1.0,
                                    generator=torch.Generator().manual_seed(1))
    noise = {label: eps[groups.tolist().index(label)] for label in set(groups.tolist())}
    loop_z = benchmark.loop_assign_group_noise(mu, logvar, groups, 0.1, noise)
    torch.testing.assert_close(loop_z, vector_z)


def test_loop_noise_is_one_draw_per_label_shared_by_its_members():
    groups = torch.tensor([4, 4, 7, 9, 9, 9])
    z = benchmark.loop_group_wise_reparameterize(torch.zeros(6, 3), torch.zeros(6, 3), groups, 1.0,
                                                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z[0], z[1])
    torch.testing.assert_close(z[3], z[5])
    assert not torch.allclose(z[0], z[2]) and not torch.allclose(z[2], z[3])


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
    timers = benchmark.gemm_bound_timers(8, 10, 10, torch.float32, torch.device("cpu"), calls=1)
    assert set(timers) == {"sequence", "alone"} and all(timer() > 0 for timer in timers.values())


def test_flop_count_matches_the_networks_shapes():
    # Forward: 784*500 + 500*40 + 20*500 + 500*784 multiply-adds per image; backward twice that,
    # less the gradient of the pixels.
    forward = 784 * 500 + 500 * 40 + 20 * 500 + 500 * 784
    assert benchmark.step_flops(256, 10, 10) == 2 * 256 * (3 * forward - 784 * 500)


def final_loss(tmp_path, *flags):
    run_dir = training.main([*SMALL, "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs"),
                             "--run-name", "r", *flags])
    with (run_dir / "log.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    return sum(float(last[key]) for key in ("reconstruction", "style_kl", "class_kl"))


@pytest.fixture(scope="module")
def fp32_loss(tmp_path_factory):
    return final_loss(tmp_path_factory.mktemp("fp32"))


def test_bf16_trains_to_the_fp32_loss(tmp_path, fp32_loss):
    assert final_loss(tmp_path, "--precision", "bf16") == pytest.approx(fp32_loss, rel=0.03)


def test_compile_trains_to_the_fp32_loss(tmp_path, fp32_loss, monkeypatch):
    # Inductor's C++ code generation takes minutes on a small CPU; the aot_eager backend traces the very
    # same graphs (graph breaks, dynamic group counts, autograd), only without generated kernels.
    # benchmark.py --compile exercises the default backend.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    assert final_loss(tmp_path, "--compile") == pytest.approx(fp32_loss, rel=0.03)


def test_benchmark_writes_the_table_as_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    benchmark.main(["--steps", "2", "--warmup", "1", "--rounds", "2", "--bound-calls", "1", "--baseline-steps", "1",
                    "--batch-size", "64", "--device", "cpu", "--json", str(path)])
    results = json.loads(path.read_text())
    names = [row["name"] for row in results["rows"]]
    assert names == ["ML-VAE step, fp32", "ML-VAE step, bf16", "loop baseline, fp32"]
    assert all(row["ms_per_step"] > 0 and row["share_of_bound"] > 0 and row["share_of_alone"] > 0
               for row in results["rows"])
    assert {bound["dtype"] for bound in results["bounds"]} == {"float32", "bfloat16"}
    assert "loop baseline" in capsys.readouterr().out
