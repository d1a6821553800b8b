"""load_image / read_label_png on every image kind real datasets contain (built with Pillow here)
and on the real-format samples."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from densebench.data.image import TRANSPARENT_BACKGROUND, load_image, read_label_png
from densebench.errors import InputError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def test_rgb_jpeg_keeps_size_and_colour(tmp_path):
    path = tmp_path / "rgb.jpg"
    Image.new("RGB", (30, 20), (10, 200, 30)).save(path, quality=95)
    img = load_image(path)
    assert img.size == (30, 20)
    assert np.abs(_pixels(img)[5, 5] - [10, 200, 30]).max() <= 3


def test_grey_l_png_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8), mode="L").save(path)
    assert _pixels(load_image(path))[:, :, 0].tolist() == [[0, 100], [200, 255]]
    assert (_pixels(load_image(path)) == np.array([[0, 100], [200, 255]])[:, :, None]).all()


def test_one_bit_image(tmp_path):
    path = tmp_path / "bits.png"
    Image.fromarray(np.array([[0, 1]], dtype=bool)).save(path)
    assert _pixels(load_image(path))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk_converts_to_rgb(tmp_path, suffix):
    path = tmp_path / f"cmyk{suffix}"
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan, full magenta+yellow = red
    cmyk.paste((255, 255, 0, 0), (8, 0, 16, 16))  # cyan + magenta = blue
    cmyk.save(path, **({"quality": 98} if suffix == ".jpg" else {}))
    assert Image.open(path).mode == "CMYK"
    pixels = _pixels(load_image(path))
    assert np.abs(pixels[8, 2] - RED).max() <= 8
    assert np.abs(pixels[8, 13] - BLUE).max() <= 8


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    path = tmp_path / "pal.png"
    img = Image.fromarray(np.array([[0, 1], [1, 2]], dtype=np.uint8), mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.save(path, transparency=0)  # index 0 (stored black) is fully transparent
    pixels = _pixels(load_image(path))
    assert pixels[0, 0].tolist() == list(TRANSPARENT_BACKGROUND)
    assert pixels[0, 1].tolist() == list(RED)
    assert pixels[1, 1].tolist() == list(BLUE)


def test_palette_without_transparency_uses_palette_colours(tmp_path):
    path = tmp_path / "pal.gif"
    img = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    img.putpalette([0, 255, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.save(path)
    assert _pixels(load_image(path))[0].tolist() == [[0, 255, 0], list(RED)]


def test_rgba_alpha_is_composited(tmp_path):
    path = tmp_path / "rgba.png"
    data = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [255, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(data, mode="RGBA").save(path)
    pixels = _pixels(load_image(path))
    assert pixels[0, 0].tolist() == list(RED)  # opaque: unchanged
    assert pixels[0, 1].tolist() == [255, 255, 255]  # transparent: background, not the stored red
    assert pixels[0, 2, 0] == 255 and abs(pixels[0, 2, 1] - 127) <= 1 and abs(pixels[0, 2, 2] - 127) <= 1


def test_la_alpha_is_composited(tmp_path):
    path = tmp_path / "la.png"
    Image.fromarray(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), mode="LA").save(path)
    pixels = _pixels(load_image(path))
    assert pixels[0, 0].tolist() == [50, 50, 50]
    assert pixels[0, 1].tolist() == [255, 255, 255]


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    values = np.array([[0, 257 * 100, 65535, 128 * 257, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    pixels = _pixels(load_image(path))
    assert pixels[0, :, 0].tolist() == [0, 100, 255, 128, 4]  # 1000/257 = 3.9 -> 4
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_mode_i_holding_16_bit_values_is_scaled(tmp_path):
    """Older Pillow opens 16-bit grey PNGs as mode I; a 32-bit TIFF gives the same mode here."""
    path = tmp_path / "mode_i.tif"
    Image.fromarray(np.array([[0, 65535, 257 * 7]], dtype=np.int32), mode="I").save(path)
    assert _pixels(load_image(path))[0, :, 1].tolist() == [0, 255, 7]


def test_32_bit_values_outside_16_bit_range_are_an_error(tmp_path):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.array([[-5, 70000]], dtype=np.int32), mode="I").save(path)
    with pytest.raises(InputError, match="wide.tif"):
        load_image(path)


def test_png_bytes_behind_jpeg_name(tmp_path):
    path = tmp_path / "n01440764_1.JPEG"
    Image.new("RGB", (7, 5), (1, 2, 3)).save(path, format="PNG")
    img = load_image(path)
    assert img.size == (7, 5) and _pixels(img)[0, 0].tolist() == [1, 2, 3]


def _corner_image() -> Image.Image:
    """40 wide x 20 high, blue with a red 8x8 block in the stored top-left corner."""
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(RED, (0, 0, 8, 8))
    return img


@pytest.mark.parametrize(
    "orientation, size, red_at",
    [
        (1, (40, 20), (2, 2)),  # as stored
        (3, (40, 20), (37, 17)),  # rotated 180: red at bottom-right
        (6, (20, 40), (17, 2)),  # display = stored rotated 90 clockwise: red at top-right
        (8, (20, 40), (2, 37)),  # display = stored rotated 90 counter-clockwise: red at bottom-left
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, size, red_at):
    path = tmp_path / f"exif{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    _corner_image().save(path, exif=exif, quality=95)
    img = load_image(path)
    assert img.size == size
    pixels = _pixels(img)
    x, y = red_at
    assert np.abs(pixels[y, x] - RED).max() <= 30
    other = (size[0] - 1 - x, size[1] - 1 - y)  # the diagonally opposite corner is blue
    assert np.abs(pixels[other[1], other[0]] - BLUE).max() <= 30


def test_zero_byte_image_is_an_input_error(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(InputError, match="empty.jpg") as info:
        load_image(path)
    assert "0 bytes" in str(info.value)


def test_truncated_jpeg_is_an_input_error(tmp_path):
    full = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    with pytest.raises(InputError, match="cut.jpg") as info:
        load_image(path)
    assert "truncated" in str(info.value)


def test_non_image_and_missing_files_are_input_errors(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all")
    with pytest.raises(InputError, match="notes.jpg") as info:
        load_image(text)
    assert "not an image" in str(info.value)
    with pytest.raises(InputError, match="absent.png"):
        load_image(tmp_path / "absent.png")


def test_realdata_images(realdata):
    grey_path = realdata / "mmdet_tests_data" / "gray.jpg"
    assert Image.open(grey_path).mode == "L"
    grey = _pixels(load_image(grey_path))
    assert grey.shape == (288, 512, 3)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert np.array_equal(grey[..., 0], np.asarray(Image.open(grey_path)))
    colour = load_image(realdata / "mmdet_tests_data" / "color.jpg")
    assert colour.size == (512, 288)
    assert np.asarray(colour).std(axis=2).mean() > 1  # really coloured, not grey
    voc = load_image(realdata / "mmdet_tests_data" / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000001.jpg")
    assert voc.size == (353, 500)  # progressive JPEG, portrait


def test_read_label_png_returns_palette_indices_not_colours(tmp_path):
    path = tmp_path / "label.png"
    indices = np.array([[0, 1, 255], [15, 20, 0]], dtype=np.uint8)
    img = Image.fromarray(indices, mode="P")
    img.putpalette(list(np.random.default_rng(1).integers(0, 255, 768, dtype=np.uint8)))
    img.save(path)
    labels = read_label_png(path)
    assert labels.dtype == np.uint8 and labels.tolist() == indices.tolist()


def test_read_label_png_grey_and_rgb(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.array([[3, 255]], dtype=np.uint8), mode="L").save(grey)
    assert read_label_png(grey).tolist() == [[3, 255]]
    colour = tmp_path / "colour.png"
    Image.new("RGB", (2, 2), RED).save(colour)
    with pytest.raises(InputError, match="colour.png") as info:
        read_label_png(colour)
    assert "mode RGB" in str(info.value)


def test_read_label_png_on_voc_aug_sample(realdata):
    folder = realdata / "voc_SegmentationClassAug_sample" / "SegmentationClassAug"
    expected = {
        "2007_000032": {0, 1, 15, 255},
        "2007_000033": {0, 1, 255},
        "2007_000039": {0, 20, 255},
        "2007_000042": {0, 19, 255},
        "2007_000061": {0, 4, 255},
        "2007_000063": {0, 9, 12, 255},
        "2007_000068": {0, 3, 255},
        "2007_000129": {0, 2, 15, 255},
        "2008_000002": {0, 20},  # SBD-derived: no 255 border band
        "2008_000003": {0, 15, 19},
        "2010_000002": {0, 17, 255},
    }
    for image_id, values in expected.items():
        path = folder / f"{image_id}.png"
        assert Image.open(path).mode == "P"
        assert set(np.unique(read_label_png(path)).tolist()) == values, image_id
    assert read_label_png(folder / "2007_000129.png").shape == (500, 334)  # portrait
    assert read_label_png(folder / "2007_000032.png").shape == (281, 500)


def test_read_label_png_on_random_palette_gt(realdata):
    """pseudo_dataset GTs have a random palette per file: only the indices {0, k} matter."""
    for path in sorted((realdata / "mmseg_tests_data" / "pseudo_dataset" / "gts").glob("*_gt.png")):
        values = set(np.unique(read_label_png(path)).tolist())
        assert 0 in values and len(values) == 2 and max(values) in (1, 2, 3), path.name
        assert read_label_png(path).shape == (128, 256)
