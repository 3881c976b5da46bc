"""Networks: shapes, the conv option end to end, and strict loading of the reference's published weights."""
import argparse
import json
import shutil

import pytest
import torch

import training
from networks import Classifier, ConvDecoder, ConvEncoder, Decoder, Encoder, build_networks
from runs import ModelLoadError, add_model_arguments, load_models


def test_encoder_returns_four_heads_of_the_asked_dims():
    outputs = Encoder(3, 5)(torch.rand(4, 1, 28, 28))
    assert [tuple(o.shape) for o in outputs] == [(4, 3), (4, 3), (4, 5), (4, 5)]


def test_fused_heads_equal_the_four_separate_linear_layers():
    encoder = Encoder(3, 5)
    x = torch.rand(4, 784)
    hidden = torch.tanh(encoder.linear_model["linear_1"](x))
    separate = [encoder.style_mu, encoder.style_logvar, encoder.class_mu, encoder.class_logvar]
    for got, head in zip(encoder(x), separate):
        torch.testing.assert_close(got, head(hidden))


@pytest.mark.parametrize("likelihood", ["mse", "bernoulli", "gaussian"])
def test_decoder_returns_images_in_unit_range(likelihood):
    images = Decoder(3, 5, likelihood)(torch.randn(4, 3), torch.randn(4, 5))
    assert images.shape == (4, 1, 28, 28) and images.min() >= 0 and images.max() <= 1


def test_gaussian_decoder_bounds_its_log_variance():
    decoder = Decoder(3, 5, "gaussian")
    torch.nn.init.constant_(decoder.pixel_logvar.bias, 1e3)
    _, logvar = decoder.logits(torch.randn(2, 3), torch.randn(2, 5))
    assert logvar.abs().max() <= 5.0


def test_classifier_learns_to_separate_two_planted_clusters():
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (256,))
    z = torch.randn(256, 7) + 3.0 * labels.unsqueeze(1)
    model = Classifier(7, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50):
        loss = torch.nn.functional.cross_entropy(model(z), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (model.eval()(z).argmax(1) == labels).float().mean() > 0.95


@pytest.mark.parametrize("eps", ["0.1", "1"])
def test_reference_weights_load_strict(reference_checkpoints, eps):
    encoder, decoder = Encoder(10, 10), Decoder(10, 10)
    encoder.load_state_dict(torch.load(reference_checkpoints / f"encoder_{eps}_var_reparam", weights_only=True, map_location="cpu"))
    decoder.load_state_dict(torch.load(reference_checkpoints / f"decoder_{eps}_var_reparam", weights_only=True, map_location="cpu"))
    assert set(Decoder(10, 10, "gaussian").state_dict()) - set(decoder.state_dict()) == {
        "pixel_logvar.weight", "pixel_logvar.bias"}


def test_conv_encoder_reduces_28_pixels_to_256_features_and_four_heads():
    encoder = ConvEncoder(3, 5)
    x = torch.rand(4, 784)
    assert encoder.conv_model(x.view(4, 1, 28, 28)).shape == (4, 256)
    assert [tuple(o.shape) for o in encoder(x)] == [(4, 3), (4, 3), (4, 5), (4, 5)]


@pytest.mark.parametrize("likelihood", ["mse", "bernoulli"])
def test_conv_decoder_returns_28x28_images_in_unit_range(likelihood):
    decoder = ConvDecoder(3, 5, likelihood)
    style, class_ = 10 * torch.randn(4, 3), 10 * torch.randn(4, 5)
    logits, pixel_logvar = decoder.logits(style, class_)
    images = decoder(style, class_)
    assert logits.shape == (4, 784) and pixel_logvar is None
    assert images.shape == (4, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images.flatten(1), torch.sigmoid(logits))


def test_conv_decoder_refuses_the_gaussian_likelihood():
    with pytest.raises(ValueError, match="mse or bernoulli"):
        ConvDecoder(3, 5, "gaussian")


def test_conv_decoder_output_depends_on_both_codes():
    decoder = ConvDecoder(3, 5)
    style, class_ = torch.randn(2, 3), torch.randn(2, 5)
    images = decoder(style, class_)
    assert (decoder(torch.randn(2, 3), class_) - images).abs().max() > 1e-3
    assert (decoder(style, torch.randn(2, 5)) - images).abs().max() > 1e-3


def test_conv_networks_treat_each_image_alone_in_training_and_in_eval():
    """InstanceNorm keeps no running statistics: a batch's other images and eval() change nothing."""
    torch.manual_seed(0)
    encoder, decoder = build_networks("conv", 3, 5)
    x, style, class_ = torch.rand(8, 784), torch.randn(8, 3), torch.randn(8, 5)
    batch_heads, batch_images = encoder(x), decoder(style, class_)
    encoder.eval(), decoder.eval()
    for got, want in zip(encoder(x[:1]), batch_heads):
        torch.testing.assert_close(got, want[:1])
    torch.testing.assert_close(decoder(style[:1], class_[:1]), batch_images[:1])


def test_build_networks_picks_the_arch():
    assert [type(n) for n in build_networks("mlp", 3, 5)] == [Encoder, Decoder]
    assert [type(n) for n in build_networks("conv", 3, 5, "bernoulli")] == [ConvEncoder, ConvDecoder]
    with pytest.raises(ValueError, match="unknown arch"):
        build_networks("resnet", 3, 5)


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    return training.main(["--arch", "conv", "--num-train", "256", "--batch-size", "64", "--epochs", "1",
                          "--style-dim", "16", "--class-dim", "16", "--checkpoint-dir", str(root / "ck"),
                          "--log-dir", str(root / "runs"), "--run-name", "conv", "--image-every", "0",
                          "--no-progress"])


def load_run(run_dir):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return load_models(parser.parse_args(["--checkpoint-dir", str(run_dir)]), torch.device("cpu"))


def test_a_conv_run_trains_and_the_evaluation_loader_rebuilds_it_from_args_json(conv_run):
    encoder, decoder, settings = load_run(conv_run)
    assert (settings.arch, settings.style_dim, settings.class_dim) == ("conv", 16, 16)
    assert isinstance(encoder, ConvEncoder) and isinstance(decoder, ConvDecoder)
    saved = torch.load(conv_run / "encoder.pt", weights_only=True)
    torch.testing.assert_close(encoder.state_dict(), saved, rtol=0, atol=0)
    torch.manual_seed(0)  # training.py's seed: the weights it started from
    initial = ConvEncoder(16, 16).state_dict()["conv_model.0.weight"]
    assert (initial - saved["conv_model.0.weight"]).abs().max() > 0


def test_resuming_a_conv_run_keeps_conv_and_refuses_another_arch(conv_run, capsys):
    resume = ["--checkpoint-dir", str(conv_run.parent), "--run-name", "conv", "--resume"]
    assert training.parse_args(resume).arch == "conv"
    with pytest.raises(SystemExit):
        training.parse_args([*resume, "--arch", "mlp"])
    assert "--arch (saved conv, given mlp)" in capsys.readouterr().err


def test_a_run_saved_before_arch_existed_loads_as_mlp(conv_run, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(conv_run, run)
    settings = json.loads((run / "args.json").read_text())
    del settings["arch"]
    (run / "args.json").write_text(json.dumps(settings))
    (run / "training_state.pt").unlink()
    with pytest.raises(ModelLoadError, match="conv encoder weights of style dim 16"):
        load_run(run)
