"""training.py's step: the loss terms and their scale, the weighted loss's gradients, the Adam update, the
step's noise; eager and compiled steps train alike, the compiled step is one graph."""
import csv
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

import training
from runs import UserError
from conftest import naive_product_of_gaussians, prior_kl
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
    assert {torch.autograd.grad, torch.ops.mlvae.fused_adam_.default} <= ops  # the backward and the fused Adam


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


def test_a_run_whose_compilation_fails_trains_eager_after_one_note(tmp_path, monkeypatch, capsys):
    def no_compiler(graph, example_inputs):  # as Inductor fails on a machine without a C++ compiler
        raise RuntimeError("Compiler: g++ is not found\nsecond line")

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, **kwargs, backend=no_compiler))
    compiled = final_loss(tmp_path / "compiled", "--compile")
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "g++ is not found" in notes[0] and "eager" in notes[0]
    assert compiled == final_loss(tmp_path / "eager")  # every step taken once, the noise drawn as eager draws it


def step_inputs(args, seed=1):
    """Seeded networks and a batch (images, group ids in [0, 10), noise) for args."""
    torch.manual_seed(0)
    encoder, decoder = build_networks(args.arch, args.style_dim, args.class_dim, args.likelihood)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(BATCH, 784, generator=gen)
    groups = torch.randint(0, 10, (BATCH,), generator=gen)
    noise = torch.randn(BATCH, args.style_dim, generator=gen), torch.randn(10, args.class_dim, generator=gen)
    return encoder, decoder, x, groups, noise


class LinearDecoder(nn.Module):
    """Pixel logits that are fixed random linear maps of the style and of the class code, and log-variances
    tanh(logits): unlike an untrained network's, every pixel depends strongly on each code, in its own way."""

    def __init__(self, style_dim: int, class_dim: int, gen: torch.Generator) -> None:
        super().__init__()
        self.style_map = torch.randn(style_dim, 784, generator=gen)
        self.class_map = torch.randn(class_dim, 784, generator=gen)

    def logits(self, style: torch.Tensor, class_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = style @ self.style_map + class_ @ self.class_map
        return logits, torch.tanh(logits)


@pytest.mark.parametrize("flags", [[], ["--class-kl-per-sample"], ["--likelihood", "bernoulli"],
                                   ["--likelihood", "gaussian"]])
def test_loss_terms_are_per_pixel_means_of_the_textbook_terms(flags):
    args = step_args("--style-dim", "4", "--class-dim", "4", "--eps-std", "0.3", *flags)
    encoder, _, x, groups, noise = step_inputs(args)
    decoder = LinearDecoder(4, 4, torch.Generator().manual_seed(2))
    terms = training.compute_losses(encoder, decoder, x, groups, noise, args)
    with torch.no_grad():
        style_mu, style_logvar, class_mu, class_logvar = encoder(x)
        group_mu, group_logvar = (t.float() for t in naive_product_of_gaussians(class_mu, class_logvar, groups))
        style_z = style_mu + noise[0] * torch.exp(0.5 * style_logvar)
        class_z = group_mu + 0.3 * noise[1][groups] * torch.exp(0.5 * group_logvar)
        logits, pixel_logvar = decoder.logits(style_z, class_z)
        mean = torch.sigmoid(logits)
        reconstruction = {"mse": F.mse_loss(mean, x),  # the reference's loss: a mean over pixels and images
                          "bernoulli": -(x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)).mean(),
                          "gaussian": -Normal(mean, torch.exp(0.5 * pixel_logvar)).log_prob(x).mean()}
        class_kl = prior_kl(group_mu, group_logvar)
        if not args.class_kl_per_sample:  # once per group: each member's row weighted by 1 / group size
            class_kl = class_kl / torch.bincount(groups)[groups]
    want = torch.stack([reconstruction[args.likelihood], prior_kl(style_mu, style_logvar).sum() / (BATCH * 784),
                        class_kl.sum() / (BATCH * 784)])
    torch.testing.assert_close(terms.detach(), want, rtol=1e-5, atol=1e-8)


def test_step_gradients_are_those_of_the_loss_weighted_by_the_coefficients(monkeypatch):
    args = step_args("--reconstruction-coef", "0.5", "--kl-coef", "2", "--style-kl-coef", "3")
    encoder, decoder, x, groups, noise = step_inputs(args)
    optimizer = training.make_optimizer(encoder, decoder, args)
    applied = []
    monkeypatch.setattr(training, "adam_update", lambda optimizer, grads: applied.append(grads))
    training.optimization_step(encoder, decoder, optimizer, x, groups, noise, args)
    terms = training.compute_losses(encoder, decoder, x, groups, noise, args)
    want = torch.autograd.grad(0.5 * terms[0] + 2 * (3 * terms[1] + terms[2]), optimizer.param_groups[0]["params"])
    for got, expected in zip(applied[0], want, strict=True):
        torch.testing.assert_close(got, expected)


def two_group_optimizers(settings):
    """An optimizer as make_optimizer builds it but with the encoder and the decoder in two param groups of
    their own `settings`, and torch.optim's own Adam over copies of the same weights."""
    torch.manual_seed(0)
    networks = build_networks("mlp", 3, 2)
    optimizer = torch.optim.Adam([{"params": net.parameters(), **group} for net, group in zip(networks, settings)],
                                 fused=True)
    training.init_adam_state(optimizer)
    copies = [[p.detach().clone().requires_grad_() for p in net.parameters()] for net in networks]
    reference = torch.optim.Adam([{"params": params, **group} for params, group in zip(copies, settings)])
    return optimizer, reference


@pytest.mark.parametrize("settings", [
    [{"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.1}] * 2,  # far from the defaults
    [{"lr": 0.02, "amsgrad": True}, {"lr": 0.005, "maximize": True, "weight_decay": 0.01}],
    [{"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}, {"lr": torch.tensor(0.003)}]])
def test_adam_update_is_torch_optim_adams_step_with_each_groups_settings(settings):
    optimizer, reference = two_group_optimizers(settings)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    copies = [p for group in reference.param_groups for p in group["params"]]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        training.adam_update(optimizer, grads)
        for copy, grad in zip(copies, grads):
            copy.grad = grad.clone()
        reference.step()
    for p, copy in zip(params, copies, strict=True):
        torch.testing.assert_close(p.detach(), copy.detach())
    assert optimizer.state_dict()["state"].keys() == reference.state_dict()["state"].keys()
    for saved, expected in zip(optimizer.state_dict()["state"].values(), reference.state_dict()["state"].values()):
        assert saved.keys() == expected.keys()  # the checkpoint holds what torch.optim's Adam writes


@pytest.mark.parametrize("lr", [0.01, torch.tensor(0.01)])
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler")  # adam_update never calls step()
def test_a_compiled_step_follows_a_learning_rate_scheduler(lr, monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, **kwargs, backend=counter))
    args = step_args()
    weights = []
    for compiled in (False, True):
        torch.manual_seed(0)
        encoder, decoder = build_networks(args.arch, args.style_dim, args.class_dim, args.likelihood)
        optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()],
                                     lr=lr.clone() if isinstance(lr, torch.Tensor) else lr, fused=True)
        training.init_adam_state(optimizer)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)
        step_fn = training.compile_step(optimizer, args.device) if compiled else training.optimization_step
        generator = torch.Generator().manual_seed(0)
        for x, labels in itertools.islice(batches(generator), 2):  # the second step at the scheduler's lr
            training.train_step(encoder, decoder, optimizer, x, labels, 10, args, generator, step_fn)
            scheduler.step()
        weights.append([p.detach().clone() for p in optimizer.param_groups[0]["params"]])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # A tensor lr is read at every step; a float one is a constant of the graph, recompiled when it changes.
    assert (counter.frame_count == 1) == isinstance(lr, torch.Tensor)


def test_a_differentiable_adam_is_refused_with_a_user_error():
    optimizer = torch.optim.Adam(build_networks("mlp", 3, 2)[0].parameters(), differentiable=True)
    training.init_adam_state(optimizer)
    with pytest.raises(UserError, match="differentiable"):
        training.adam_update(optimizer, [torch.zeros_like(p) for p in optimizer.param_groups[0]["params"]])


def test_train_step_draws_standard_normal_noise_from_the_generator():
    args = step_args("--style-dim", "6", "--class-dim", "5", "--group-size", "3")
    x, groups = torch.zeros(2048, 784), torch.zeros(2048, dtype=torch.long)
    drawn = []

    def recording_step(encoder, decoder, optimizer, x, groups, noise, args):
        drawn.append(noise)

    for seed in (0, 0, 1):
        training.train_step(None, None, None, x, groups, num_training_groups(10, 2048, 3), args,
                            torch.Generator().manual_seed(seed), recording_step)
    (style, class_), again, other = drawn
    assert style.shape == (2048, 6) and class_.shape == (num_training_groups(10, 2048, 3), 5)
    assert all(torch.equal(a, b) for a, b in zip(drawn[0], again)) and not torch.equal(style, other[0])
    for noise in (style, class_):
        n = noise.numel()
        assert abs(noise.mean().item()) < 6 / math.sqrt(n) and abs(noise.std().item() - 1) < 6 / math.sqrt(2 * n)


def test_each_process_takes_its_rows_of_the_noise_one_process_draws():
    args = step_args("--style-dim", "3", "--class-dim", "2")
    drawn = {}

    def recording_step(encoder, decoder, optimizer, x, groups, noise, args):
        drawn[len(drawn)] = noise

    generators = []
    for world in (training.distributed.World(), *(training.distributed.World(rank, 2) for rank in range(2))):
        generators.append(torch.Generator().manual_seed(0))
        size = 8 // world.size
        training.train_step(None, None, None, torch.zeros(size, 784), torch.zeros(size, dtype=torch.long),
                            4 // world.size, args, generators[-1], recording_step, world)
    (style, class_), *shares = drawn.values()
    assert torch.equal(torch.cat([share[0] for share in shares]), style)
    assert torch.equal(torch.cat([share[1] for share in shares]), class_)
    assert all(torch.equal(g.get_state(), generators[0].get_state()) for g in generators)  # one stream in each
