"""Swap score: chance for a decoder that ignores its class input, near 100% for one that copies it."""

import pytest
import torch
from torch import nn

import data_loader
from conftest import ROOT
from evaluation import load_pixel_classifier, predict
from studies.swap_score import swap_scores

PIXEL_CLASSIFIER = ROOT / "checkpoints" / "pixel_classifier_mnist.pt"


class PixelsAsCodes(nn.Module):
    """A stub encoder whose style and class codes are both the image itself."""

    def forward(self, x):
        flat = x.flatten(1)
        return flat, torch.zeros_like(flat), flat, torch.zeros_like(flat)


class StubDecoder(nn.Module):
    def __init__(self, use: str):
        super().__init__()
        self.use = use

    def forward(self, style, class_):
        return (class_ if self.use == "class" else style).view(-1, 1, 28, 28)


@pytest.fixture(scope="module")
def mnist_test_subset():
    images, labels = data_loader.load_split(ROOT / "data", "test")
    return images[:3000], labels[:3000]


@pytest.fixture(scope="module")
def classifier():
    return load_pixel_classifier(PIXEL_CLASSIFIER, torch.device("cpu"))


def scores(decoder_uses, subset, classifier):
    return swap_scores(PixelsAsCodes(), StubDecoder(decoder_uses), classifier, *subset, num_styles=300,
                       evidence_size=5, generator=torch.Generator().manual_seed(0))


def test_shipped_pixel_classifier_is_above_99_percent_on_the_test_split(classifier):
    images, labels = data_loader.load_split(ROOT / "data", "test")
    assert (predict(classifier, images) == labels).float().mean() >= 0.99


def test_decoder_ignoring_the_class_code_scores_chance(mnist_test_subset, classifier):
    result = scores("style", mnist_test_subset, classifier)
    for name in ("no_evidence", "with_evidence"):
        assert result[name]["content_transfer"] == pytest.approx(10.0, abs=1.5)
        assert result[name]["style_leak"] > 95.0


def test_decoder_copying_the_class_source_scores_near_100(mnist_test_subset, classifier):
    result = scores("class", mnist_test_subset, classifier)
    assert result["no_evidence"]["content_transfer"] > 97.0
    assert result["no_evidence"]["style_leak"] < 2.0
    assert result["with_evidence"]["content_transfer"] > 90.0  # the fused code is a mean of 5 images
