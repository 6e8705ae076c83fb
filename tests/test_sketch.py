import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch
from conftest import draw_square

from pipeline_sketch_guided import prepare_sketch


def strokes(tensor: torch.Tensor) -> torch.Tensor:
    """Where the prepared sketch (light strokes on dark, in [-1, 1]) has ink."""
    return tensor[0, 0] > 0


@pytest.fixture
def reference():
    return prepare_sketch(draw_square(32), 32, 32)


def test_output_is_a_three_channel_batch_in_range(reference):
    assert reference.shape == (1, 3, 32, 32)
    assert reference.min() == -1 and reference.max() == 1
    assert torch.equal(reference[:, 0], reference[:, 1]) and torch.equal(reference[:, 0], reference[:, 2])
    # light_on_dark: a few bright stroke pixels on a dark background.
    assert 0.1 < strokes(reference).float().mean() < 0.4


def test_both_polarities_give_the_same_result(reference):
    assert torch.equal(prepare_sketch(draw_square(32, dark_on_light=False), 32, 32), reference)


def test_dark_on_light_convention_is_the_inverse(reference):
    assert torch.equal(prepare_sketch(draw_square(32), 32, 32, polarity="dark_on_light"), -reference)


@pytest.mark.parametrize("mode", ["1", "L", "RGB", "P"])
def test_image_modes(mode, reference):
    assert torch.equal(prepare_sketch(draw_square(32).convert(mode), 32, 32), reference)


def test_transparent_background_counts_as_paper(reference):
    # Black strokes on a fully transparent (black!) background: only compositing on white makes this a sketch.
    alpha = 255 - np.asarray(draw_square(32))
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = alpha
    assert torch.equal(prepare_sketch(PIL.Image.fromarray(rgba, "RGBA"), 32, 32), reference)


def test_arrays_tensors_and_files(tmp_path, reference):
    array = np.array(draw_square(32))
    assert torch.equal(prepare_sketch(array, 32, 32), reference)
    assert torch.equal(prepare_sketch(array.astype(np.float32) / 255, 32, 32), reference)
    assert torch.equal(prepare_sketch(array > 127, 32, 32), reference)
    tensor = torch.from_numpy(array).float() / 255
    assert torch.equal(prepare_sketch(tensor, 32, 32), reference)
    assert torch.equal(prepare_sketch(tensor.expand(1, 3, 32, 32), 32, 32), reference)
    assert torch.equal(prepare_sketch(tensor * 2 - 1, 32, 32), reference)  # diffusers' [-1, 1] tensors
    path = tmp_path / "sketch.png"
    draw_square(32).save(path)
    assert torch.equal(prepare_sketch(path, 32, 32), reference)
    assert torch.equal(prepare_sketch(str(path), 32, 32), reference)


def test_any_size_is_resized_and_thin_strokes_survive():
    big = draw_square(256).resize((300, 200))
    prepared = prepare_sketch(big, 32, 48)
    assert prepared.shape == (1, 3, 32, 48)
    # 2-pixel strokes at 256 px become a fraction of a pixel at 32: they fade but must not vanish.
    assert strokes(prepared).any()


def test_another_aspect_is_fitted_and_padded_with_paper_not_stretched(caplog):
    wide = PIL.Image.new("L", (400, 300), 255)  # 4:3, a circle of diameter 200 in the middle
    PIL.ImageDraw.Draw(wide).ellipse((100, 50, 300, 250), outline=0, width=8)
    with caplog.at_level("WARNING"):
        prepared = prepare_sketch(wide, 64, 64)  # light_on_dark: strokes are bright
    assert "fitted inside and padded with paper" in caplog.text
    rows, cols = np.nonzero(strokes(prepared).numpy())
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(height - width) <= 1  # still a circle: 32x32 of the 64x64, centred, not a 43x64 ellipse
    assert not strokes(prepared)[:8].any() and not strokes(prepared)[-8:].any()  # paper bands above and below
    with caplog.at_level("WARNING"):
        caplog.clear()
        prepare_sketch(wide, 48, 64)  # the same aspect: no padding, no warning
    assert caplog.text == ""


def test_blank_sketch_is_rejected():
    with pytest.raises(ValueError, match="blank"):
        prepare_sketch(PIL.Image.new("L", (32, 32), 255), 32, 32)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        prepare_sketch(tmp_path / "missing.png", 32, 32)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="Cannot read the sketch file"):
        prepare_sketch(broken, 32, 32)
    with pytest.raises(ValueError, match="shape"):
        prepare_sketch(np.zeros((4, 4, 2), dtype=np.uint8), 32, 32)
    with pytest.raises(TypeError, match="PIL image"):
        prepare_sketch(42, 32, 32)
    with pytest.raises(ValueError, match="polarity"):
        prepare_sketch(draw_square(), 32, 32, polarity="sideways")


def test_a_pencils_grey_strokes_are_the_same_instruction_as_black_ones(reference):
    square = np.asarray(draw_square(32), dtype=np.float32) / 255  # black strokes on white
    pencil = 0.85 - 0.45 * (1 - square)  # grey strokes (0.40) on grey paper (0.85)
    assert torch.allclose(prepare_sketch(pencil, 32, 32), reference, atol=1e-6)
    chalk = 0.1 + 0.5 * (1 - square)  # light grey strokes on a dark board
    assert torch.allclose(prepare_sketch(chalk, 32, 32), reference, atol=1e-6)
    # A faint stroke is made stronger, at most 4 times: page grain is not made into strokes.
    faint = 1.0 - 0.1 * (1 - square)
    strokes = (prepare_sketch(faint, 32, 32)[0, 0] + 1) / 2
    assert torch.allclose(strokes.max(), torch.tensor(0.4), atol=0.02) and strokes.min() == 0  # 8-bit tones
