"""training.py's tensorboard log, read back with TensorBoard's own reader: step and epoch losses, images/s,
reconstructions, the swap grid of inference.py, the run's settings, and a resume's clean continuation."""
import io
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import inference
import training
from runs import read_log

TERMS = ("reconstruction", "style_kl", "class_kl")
EIGHT_BITS = 1.5 / 255  # tensorboardX truncates pixels to 8 bits where save_image rounds


def train(tmp_path, *flags):
    """Train epochs of 8 steps (2 unless flags say otherwise), logging the losses every 4 steps."""
    return training.main(["--num-train", "512", "--batch-size", "64", "--epochs", "2", "--log-every", "4",
                          "--run-name", "r", "--checkpoint-dir", str(tmp_path / "ck"),
                          "--log-dir", str(tmp_path / "runs"), "--no-progress", *flags])


def read_events(tmp_path):
    keep_all = {"scalars": 0, "images": 0, "tensors": 0}
    return EventAccumulator(str(tmp_path / "runs" / "r"), size_guidance=keep_all).Reload()


def train_and_read(tmp_path, *flags):
    """Train 2 epochs; return the run folder and its events."""
    run_dir = train(tmp_path, *flags)
    return run_dir, read_events(tmp_path)


def pixels(png: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(png)).convert("L"))).float() / 255


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    return train_and_read(tmp_path_factory.mktemp("tb"), "--image-every", "1")


def test_losses_are_logged_every_log_every_steps_and_every_epoch(logged):
    _, events = logged
    for term in TERMS:
        assert [e.step for e in events.Scalars(f"loss_steps/{term}")] == [4, 8, 12, 16]
        assert [e.step for e in events.Scalars(f"loss/{term}")] == [8, 16]
    assert [e.step for e in events.Scalars("speed/images_per_s")] == [8, 16]
    assert all(e.value > 0 for e in events.Scalars("speed/images_per_s"))


def test_step_losses_average_to_the_epoch_means(logged):
    # Two windows of 4 steps make up each epoch of 8, so their mean is the epoch's mean.
    _, events = logged
    for term in TERMS:
        steps = [e.value for e in events.Scalars(f"loss_steps/{term}")]
        epochs = [e.value for e in events.Scalars(f"loss/{term}")]
        np.testing.assert_allclose([np.mean(steps[:2]), np.mean(steps[2:])], epochs, rtol=1e-5)
    assert steps[0] != steps[1]  # a window's own mean, not the epoch's


def test_reconstructions_show_the_first_test_images_above_their_decodings(logged):
    _, events = logged
    images = events.Images("images/reconstructions")
    assert [e.step for e in images] == [8, 16]
    picture = pixels(images[-1].encoded_image_string)
    assert picture.shape == (2 + 2 * (28 + 2), 2 + training.RECONSTRUCTED * (28 + 2))
    test_images, _ = training.data_loader.load_split("data", "test")
    torch.testing.assert_close(picture[2:30, 2:30], test_images[0, 0], atol=EIGHT_BITS, rtol=0)
    assert not torch.equal(picture[32:60, 2:30], picture[2:30, 2:30])  # a decoding, not a copy


def test_swap_grid_is_the_one_inference_draws_from_the_saved_run(logged, tmp_path):
    run_dir, events = logged
    grids = events.Images("images/swap_grid")
    assert [e.step for e in grids] == [8, 16]
    png = inference.main(["--checkpoint-dir", str(run_dir), "--out", str(tmp_path / "grid.png")])
    expected = pixels(png.read_bytes())
    torch.testing.assert_close(pixels(grids[-1].encoded_image_string), expected, atol=EIGHT_BITS, rtol=0)
    assert not torch.equal(pixels(grids[0].encoded_image_string), expected)  # the model moved in epoch 2


def test_settings_are_shown_as_text(logged):
    _, events = logged
    [text] = events.Tensors("settings/text_summary")
    assert '"eps_std": 0.1' in text.tensor_proto.string_val[0].decode()


def test_image_every_zero_writes_no_images(tmp_path):
    _, events = train_and_read(tmp_path, "--image-every", "0")
    assert events.Tags()["images"] == []
    assert "loss_steps/reconstruction" in events.Tags()["scalars"]


def test_resume_replaces_what_was_logged_after_the_last_save(tmp_path):
    # Event files are named by the second they were opened in and read in name order: the runs below
    # start at least a second apart, as a resume after a crash does.
    run_dir = train(tmp_path, "--epochs", "1", "--image-every", "0")
    shutil.copytree(run_dir, tmp_path / "saved_after_epoch_1")
    time.sleep(1.1)
    train(tmp_path, "--resume", "--epochs", "2")  # logs epoch 2, then "dies" before a later save
    shutil.rmtree(run_dir)
    shutil.copytree(tmp_path / "saved_after_epoch_1", run_dir)
    time.sleep(1.1)
    train(tmp_path, "--resume", "--epochs", "2")  # trains epoch 2 again
    events = read_events(tmp_path)
    assert [e.step for e in events.Scalars("loss/reconstruction")] == [8, 16]
    assert [e.step for e in events.Scalars("loss_steps/reconstruction")] == [4, 8, 12, 16]


def test_overwrite_leaves_only_the_new_runs_events(tmp_path):
    train(tmp_path, "--epochs", "2", "--image-every", "0")
    time.sleep(1.1)  # event files are named by the second they were opened in
    run_dir = train(tmp_path, "--overwrite", "--epochs", "1", "--seed", "1", "--image-every", "0")
    assert len(list((tmp_path / "runs" / "r").iterdir())) == 1  # the old run's event file is gone
    events = read_events(tmp_path)
    [epoch] = events.Scalars("loss/reconstruction")
    [row] = read_log(run_dir / "log.csv")
    assert epoch.step == 8 and epoch.value == pytest.approx(float(row["reconstruction"]), rel=1e-5)
    assert [e.step for e in events.Scalars("loss_steps/reconstruction")] == [4, 8]
    [text] = events.Tensors("settings/text_summary")
    assert '"seed": 1' in text.tensor_proto.string_val[0].decode()


def test_a_new_run_hides_the_events_of_a_run_that_was_never_saved(tmp_path):
    # Events left in runs/r by a run whose folder holds no save (killed before it, or deleted). The
    # reader of TensorBoard's server drops them all, as it drops a resumed run's events after its save.
    run_dir = train(tmp_path, "--epochs", "2", "--image-every", "0")
    shutil.rmtree(run_dir)
    time.sleep(1.1)
    train(tmp_path, "--epochs", "1", "--seed", "1", "--image-every", "0")
    events = plugin_event_accumulator.EventAccumulator(str(tmp_path / "runs" / "r")).Reload()
    assert [e.step for e in events.Tensors("loss/reconstruction")] == [8]
    [text] = events.Tensors("settings/text_summary")
    assert '"seed": 1' in text.tensor_proto.string_val[0].decode()
