"""Networks: shapes and strict loading of the reference's published weights."""
import pytest
import torch

from networks import Classifier, Decoder, Encoder


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
