"""training.py's step: eager and compiled steps train alike, the compiled step is one graph."""
import csv

import pytest
import torch

import training
from networks import build_networks
from utils import num_training_groups, training_groups

BATCH, STEPS = 16, 3  # a batch of 16 leaves some of the 10 digit groups empty


def step_args(*flags):
    args = training.build_parser().parse_args(["--batch-size", str(BATCH), *flags])
    args.device = torch.device("cpu")
    return args


def batches(generator):
    images = torch.rand(STEPS, BATCH, 784, generator=generator)
    return zip(images, torch.randint(0, 10, (STEPS, BATCH), generator=generator))


def trained_weights(args, compiled):
    """The parameters after STEPS train_step calls from seed 0, eager or through compile_step."""
    torch.manual_seed(0)
    encoder, decoder = build_networks(args.arch, args.style_dim, args.class_dim, args.likelihood)
    optimizer = training.make_optimizer(encoder, decoder, args)
    step_fn = training.compile_step(optimizer, args.device) if compiled else training.optimization_step
    generator = torch.Generator().manual_seed(0)
    for x, labels in batches(generator):
        groups = training_groups(labels, args.group_size)
        training.train_step(encoder, decoder, optimizer, x, groups, num_training_groups(10, BATCH, args.group_size),
                            args, generator, step_fn)
    return [p.detach().clone() for p in optimizer.param_groups[0]["params"]]


def initial_weights(args):
    torch.manual_seed(0)
    return [p.detach() for net in build_networks(args.arch, args.style_dim, args.class_dim) for p in net.parameters()]


def test_compiled_steps_give_the_eager_weights():
    args = step_args()
    eager, compiled = trained_weights(args, False), trained_weights(args, True)
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(eager, initial_weights(args)))  # every tensor moved
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flags", [["--precision", "bf16"], ["--group-size", "3", "--detach-class-posterior"]])
def test_the_traced_step_gives_the_eager_weights(flags, monkeypatch):
    # aot_eager traces the same single graph (autocast, fixed-size groups, autograd, Adam) as the
    # default backend and runs it with eager kernels, in seconds rather than a minute of C++ compilation.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, **kwargs, backend="aot_eager"))
    args = step_args(*flags)
    eager, compiled = trained_weights(args, False), trained_weights(args, True)
    # bf16 rounds the traced graph's decomposed ops differently, and Adam turns a near-zero gradient's
    # rounding into a step of up to lr: compare the change with the training's own change.
    for a, b, start in zip(eager, compiled, initial_weights(args)):
        assert (a - b).abs().mean() <= 0.01 * (a - start).abs().mean()


def test_the_whole_step_is_one_graph_without_breaks():
    args = step_args()
    encoder, decoder = build_networks(args.arch, args.style_dim, args.class_dim, args.likelihood)
    optimizer = training.make_optimizer(encoder, decoder, args)
    training.compile_step(optimizer, args.device)  # sets the tracing of autograd.grad
    x, labels = next(batches(torch.Generator().manual_seed(0)))
    noise = (torch.randn(BATCH, args.style_dim), torch.randn(10, args.class_dim))
    explained = torch._dynamo.explain(training.optimization_step)(encoder, decoder, optimizer, x, labels, noise,
                                                                 args)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    ops = {node.target for node in explained.graphs[0].graph.nodes}
    assert {torch.autograd.grad, torch._foreach_addcdiv_} <= ops  # the backward and Adam's update are in it


def final_loss(tmp_path, *flags):
    run_dir = training.main(["--num-train", "512", "--batch-size", "64", "--epochs", "2", "--no-progress",
                             "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs"),
                             "--run-name", "r", *flags])
    with (run_dir / "log.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    return sum(float(last[key]) for key in ("reconstruction", "style_kl", "class_kl"))


def test_bf16_trains_to_the_fp32_loss(tmp_path):
    assert final_loss(tmp_path / "bf16", "--precision", "bf16") == pytest.approx(final_loss(tmp_path / "fp32"),
                                                                                rel=0.03)
