"""studies/pixel_classifier.py: training the pixel-space CNN of the swap score."""
import pytest

from studies import pixel_classifier


def test_pixel_classifier_rejects_a_bad_device_with_a_parser_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pixel_classifier.main(["--device", "tpu"])
    assert exit_info.value.code == 2
    assert "--device" in capsys.readouterr().err
