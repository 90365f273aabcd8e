"""load_image: the authors' preprocessing exactly, every image mode, draft decoding, clear errors."""
import io

import numpy as np
import pytest
from data_fixtures import encode, photo
from PIL import Image

from dpiqa_jax.data.images import ImageError, load_image


def _pil_reference(image: Image.Image, size: int) -> np.ndarray:
    """The authors' transform: torchvision Resize((size, size)) + ToTensor on a PIL RGB image."""
    from torchvision import transforms

    tensor = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])(image)
    return tensor.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("size", [16, 24, 48])
def test_matches_torchvision_resize(size, tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(encode(photo(40, 30, seed=3)))
    ours = load_image(str(path), size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, _pil_reference(Image.open(path).convert("RGB"), size))
    np.testing.assert_array_equal(load_image(path.read_bytes(), size), ours)


def test_exif_orientation_applied(tmp_path):
    pixels = photo(40, 24, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = encode(pixels, "JPEG", exif=exif.tobytes())
    stored = np.asarray(Image.open(io.BytesIO(rotated)).convert("RGB"))
    upright = np.asarray(Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(load_image(rotated, 16), load_image(encode(upright, "PNG"), 16))
    np.testing.assert_array_equal(load_image(rotated, 16, exif=False), load_image(encode(stored, "PNG"), 16))


def _mode_bytes(mode: str) -> bytes:
    rgb = photo(20, 20, seed=2)
    grey = rgb[..., 0]
    alpha = np.where(np.arange(20)[:, None] < 10, 0, 255).astype(np.uint8) * np.ones((1, 20), np.uint8)
    if mode == "L":
        return encode(grey, "PNG")
    if mode == "RGBA":
        return encode(np.dstack([rgb, alpha]), "PNG")
    if mode == "LA":
        buffer = io.BytesIO()
        Image.fromarray(np.dstack([grey, alpha])).convert("LA").save(buffer, "PNG")
        return buffer.getvalue()
    if mode == "CMYK":
        buffer = io.BytesIO()
        Image.fromarray(rgb).convert("CMYK").save(buffer, "JPEG", quality=95)
        return buffer.getvalue()
    if mode == "BMP":
        return encode(rgb, "BMP")
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "CMYK", "BMP"])
def test_any_mode_to_rgb(mode):
    image = load_image(_mode_bytes(mode), 20)
    assert image.shape == (20, 20, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    if mode in ("L", "LA"):
        assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])
    if mode in ("RGBA", "LA"):  # transparent rows composited on white
        np.testing.assert_array_equal(image[:10], 1.0)
        assert image[10:].mean() < 0.9
    if mode == "CMYK":  # PIL's CMYK round trip is close to the RGB original
        assert np.abs(image - photo(20, 20, seed=2) / 255.0).mean() < 0.05


def test_palette_transparency_on_white():
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 8, 4))
    buffer = io.BytesIO()
    palette.save(buffer, "PNG", transparency=1)
    image = load_image(buffer.getvalue(), 8)
    np.testing.assert_array_equal(image[:4], 1.0)  # the transparent blue half is white
    np.testing.assert_array_equal(image[4:], np.broadcast_to([1.0, 0.0, 0.0], (4, 8, 3)))


def test_sixteen_bit_scaled_not_clipped():
    levels = np.array([[0, 257 * 64, 32896, 65535]], np.uint16).repeat(4, axis=0)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, "PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode.startswith("I")
    image = load_image(buffer.getvalue(), 4)
    np.testing.assert_allclose(image[0, :, 0], [0, 64 / 255, 128 / 255, 1.0], atol=1e-6)


def test_float_image_taken_as_unit_range(tmp_path):
    Image.fromarray(np.full((6, 6), 0.5, np.float32)).save(tmp_path / "f.tif")
    np.testing.assert_allclose(load_image(str(tmp_path / "f.tif"), 6), 128 / 255)


def test_animation_first_frame():
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (40, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    assert load_image(buffer.getvalue(), 8).mean() < 0.5


@pytest.mark.parametrize("orientation", [1, 8])
def test_draft_decoding_close_to_full_decode(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation  # 8: turned by 90 degrees, so the draft box turns too
    pixels = np.asarray(Image.fromarray(photo(160, 120, seed=5)).resize((1100, 700), Image.BICUBIC))
    big = encode(pixels, quality=92, exif=exif.tobytes())
    drafted, full = load_image(big, 128), load_image(big, 128, draft=False)
    difference = np.abs(drafted - full)
    assert 0 < difference.mean() < 0.5 / 255 and difference.max() <= 6 / 255
    small = encode(photo(500, 400, seed=6))  # under 4x the target: decoded in full, result unchanged
    np.testing.assert_array_equal(load_image(small, 128), load_image(small, 128, draft=False))


def _truncated() -> bytes:
    data = encode(photo(64, 64, seed=7))
    return data[: len(data) // 2]


def _corrupt() -> bytes:
    data = bytearray(encode(photo(64, 64, seed=7), "PNG"))
    start = data.find(b"IDAT") + 20
    data[start:start + 40] = bytes(b ^ 0xFF for b in data[start:start + 40])
    return bytes(data)


def _header_only() -> bytes:
    data = encode(photo(64, 64, seed=7))
    return data[:data.find(b"\xff\xda") + 14]  # up to the start of the scan: no pixel data


def _other_format(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo(16, 16, seed=1)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("content,reason", [
    (b"", "unknown or unsupported image format"),
    (b"this is not an image", "unknown or unsupported image format"),
    (_truncated(), "truncated"),
    (_header_only(), "truncated"),
    (_corrupt(), "corrupt image data"),
    (_other_format("TGA"), "unknown or unsupported image format (accepted: JPEG, PNG, BMP, GIF, TIFF, WEBP)"),
    (_other_format("ICO"), "unknown or unsupported image format"),
])
def test_bad_files_raise_one_line(content, reason, tmp_path):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError) as error:
        load_image(str(path), 16)
    message = str(error.value)
    assert reason in message and str(path) in message and "\n" not in message


def test_a_one_pixel_image_is_an_image():
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (10, 200, 30)).save(buffer, "PNG")
    expected = np.full((4, 4, 3), [10, 200, 30], np.float32) / np.float32(255)
    np.testing.assert_array_equal(load_image(buffer.getvalue(), 4), expected)


def test_missing_file_and_pixel_cap(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(str(tmp_path / "absent.png"), 16)
    with pytest.raises(ImageError, match="40x30 image has more than the 1000 pixels allowed"):
        load_image(encode(photo(40, 30)), 16, name="big.jpg", max_pixels=1000)
