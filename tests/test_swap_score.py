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


@pytest.fixture(scope="module")
def style_copy_scores(mnist_test_subset, classifier):
    """The scores of a decoder that ignores its class code and draws its style source."""
    return scores("style", mnist_test_subset, classifier)


@pytest.fixture(scope="module")
def class_copy_scores(mnist_test_subset, classifier):
    """The scores of a decoder that draws the image its class code came from."""
    return scores("class", mnist_test_subset, classifier)


def test_shipped_pixel_classifier_is_above_99_percent_on_the_test_split(classifier):
    images, labels = data_loader.load_split(ROOT / "data", "test")
    assert (predict(classifier, images) == labels).float().mean() >= 0.99


def test_decoder_ignoring_the_class_code_scores_chance(style_copy_scores):
    for name in ("no_evidence", "with_evidence"):
        assert style_copy_scores[name]["content_transfer"] == pytest.approx(10.0, abs=1.5)
        assert style_copy_scores[name]["style_leak"] > 95.0


def test_decoder_copying_the_class_source_scores_near_100(class_copy_scores):
    assert class_copy_scores["no_evidence"]["content_transfer"] > 97.0
    assert class_copy_scores["no_evidence"]["style_leak"] < 2.0
    assert class_copy_scores["with_evidence"]["content_transfer"] > 90.0  # the fused code is a mean of 5 images


def test_ceiling_classifies_each_style_images_reconstruction_from_its_own_codes(style_copy_scores, class_copy_scores):
    # Both stubs rebuild an image from its own codes as the image itself, so the ceiling is the CNN's accuracy on
    # the real style images; with evidence, the class-copying stub draws the mean of 5 images of the digit.
    real = style_copy_scores["classifier_on_real_images"]
    assert real > 97.0
    for result in (style_copy_scores["no_evidence"], style_copy_scores["with_evidence"],
                   class_copy_scores["no_evidence"]):
        assert result["reconstruction_ceiling"] == real
    assert class_copy_scores["with_evidence"]["reconstruction_ceiling"] > 90.0
