"""Decoding and encoding (service/imaging.py): deceptive headers, the byte floor, grey, alpha and 16 bits."""

from __future__ import annotations

import io
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from service.imaging import (
    MAX_BYTES_PER_PIXEL,
    ImageError,
    check_output_format,
    decode_image,
    decoded_bytes,
    encode_image,
    media_type,
    probe,
)
from service.settings import Settings
from tests.service.conftest import encoded, png_bytes, post


def webp_claiming(width: int, height: int) -> bytes:
    """A small lossless WebP whose VP8L header is patched to declare ``width`` x ``height``."""
    data = bytearray(encoded(np.zeros((16, 16, 3), np.uint8), "WEBP", lossless=True))
    offset = data.index(b"VP8L") + 8 + 1  # chunk tag, chunk size, then the 0x2f signature
    bits = struct.unpack("<I", data[offset:offset + 4])[0]
    bits = (bits & ~0x0FFFFFFF) | (width - 1) | ((height - 1) << 14)
    data[offset:offset + 4] = struct.pack("<I", bits)
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A 64x64 JPEG whose SOF0 segment is patched to declare ``width`` x ``height``."""
    data = bytearray(encoded(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8), "JPEG"))
    offset = data.index(b"\xff\xc0") + 5  # marker, length (2), precision (1)
    data[offset:offset + 4] = struct.pack(">HH", height, width)
    return bytes(data)


def test_a_tiny_jpeg_whose_header_claims_a_huge_image_is_refused_before_decoding(make_client, monkeypatch):
    bomb = jpeg_claiming(6000, 6000)
    with pytest.raises(ImageError, match="too few") as caught:
        decode_image(bomb, max_pixels=40_000_000)
    assert caught.value.reason == "corrupt"
    client, batches = make_client()
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("the pixels were decoded"))
    response = post(client, bomb)
    assert response.status_code == 422 and "too few" in response.json()["detail"] and not batches


def test_real_files_of_every_format_pass_the_byte_floor_even_when_flat():
    flat = np.full((2048, 2048, 3), 128, np.uint8)  # the most compressible image there is
    for fmt, options in (("PNG", {"optimize": True}), ("JPEG", {"quality": 10}), ("WEBP", {"lossless": True}),
                         ("WEBP", {"quality": 1}), ("TIFF", {"compression": "tiff_deflate"}), ("BMP", {})):
        data = encoded(flat, fmt, **options)
        assert decode_image(data).size == (2048, 2048), (fmt, len(data))
    # A flat lossless WebP spends almost nothing per pixel: a file of tens of bytes may honestly hold
    # 36 MP. It is decoded, within max_pixels; what bounds memory is the number of decodes at once.
    assert len(webp_claiming(6000, 6000)) < 100


@pytest.mark.parametrize("payload, reason", [
    (b"", "empty"),
    (b"plain text, not an image", "unsupported"),
    (png_bytes(np.zeros((30, 40, 3), np.uint8))[:60], "corrupt"),
])
def test_each_refusal_names_its_reason(payload, reason):
    with pytest.raises(ImageError) as caught:
        decode_image(payload)
    assert caught.value.reason == reason


def test_an_image_over_max_pixels_is_refused_as_too_large():
    with pytest.raises(ImageError, match="1200 pixels, the limit is 1000") as caught:
        decode_image(png_bytes(np.zeros((30, 40, 3), np.uint8)), max_pixels=1000)
    assert caught.value.reason == "too_large"


def test_a_colour_png_decodes_to_its_pixels_and_encodes_back_to_the_same_pixels():
    pixels = np.random.default_rng(2).integers(0, 255, (30, 40, 3), np.uint8)
    decoded = decode_image(png_bytes(pixels))
    assert decoded.rgb.shape == (1, 3, 30, 40) and decoded.rgb.dtype == torch.float32
    assert not decoded.grey and decoded.bits == 8 and decoded.alpha is None and decoded.size == (40, 30)
    assert np.array_equal(np.round(decoded.rgb[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8), pixels)
    with Image.open(io.BytesIO(encode_image(decoded.rgb, decoded, "png"))) as again:
        assert again.mode == "RGB" and np.array_equal(np.asarray(again), pixels)


def test_grey_stays_grey_and_alpha_comes_back_untouched():
    grey = np.random.default_rng(3).integers(0, 255, (20, 24), np.uint8)
    decoded = decode_image(png_bytes(grey))
    assert decoded.grey and decoded.bits == 8 and torch.equal(decoded.rgb[0, 0], decoded.rgb[0, 2])
    with Image.open(io.BytesIO(encode_image(decoded.rgb, decoded))) as again:
        assert again.mode == "L" and np.array_equal(np.asarray(again), grey)
    rgba = np.dstack([np.zeros((20, 24, 3), np.uint8), np.arange(20 * 24, dtype=np.uint8).reshape(20, 24)])
    with_alpha = decode_image(png_bytes(rgba, "RGBA"))
    assert with_alpha.alpha is not None and with_alpha.rgb.shape[1] == 3
    with Image.open(io.BytesIO(encode_image(with_alpha.rgb, with_alpha, "webp"))) as again:
        assert again.mode == "RGBA" and np.array_equal(np.asarray(again)[..., 3], rgba[..., 3])


def test_an_output_format_that_cannot_carry_the_input_is_refused():
    rgba = decode_image(png_bytes(np.zeros((8, 8, 4), np.uint8), "RGBA"))
    for source, output, message in ((rgba, "jpeg", "alpha"), (rgba, "gif", "unknown output format")):
        with pytest.raises(ImageError, match=message) as caught:
            check_output_format(source, output)
        assert caught.value.reason == "bad_output"
    assert check_output_format(rgba, "PNG") == "PNG" and check_output_format(rgba, "webp") == "WEBP"
    assert media_type("jpg") == "image/jpeg" and media_type("webp") == "image/webp"


def test_an_upload_that_expands_past_the_ratio_is_refused_before_decoding(make_client, monkeypatch):
    bomb = webp_claiming(6000, 6000)  # a valid flat image: 108 MB of pixels from tens of bytes
    with pytest.raises(ImageError, match="DDSNET_MAX_EXPANSION_RATIO=10000") as caught:
        decode_image(bomb, max_expansion=10_000)
    assert caught.value.reason == "expansion"
    photo = encoded(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8), "JPEG")
    assert decode_image(photo, max_expansion=10_000).size == (64, 64)
    client, batches = make_client()
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("the pixels were decoded"))
    response = post(client, bomb, "bomb.webp")
    assert response.status_code == 413 and response.headers["content-type"] == "application/json"
    assert "DDSNET_MAX_EXPANSION_RATIO" in response.json()["detail"] and not batches


def test_the_default_expansion_limit_refuses_flat_lossless_webp_and_blank_fax_pages_but_not_png_screenshots():
    limit = Settings().max_expansion_ratio
    flat = np.full((1080, 1920, 3), 200, np.uint8)  # a flat 1920x1080 frame: 132 bytes of lossless WebP
    with pytest.raises(ImageError) as webp:
        probe(encoded(flat, "WEBP", lossless=True), max_expansion=limit)
    page = io.BytesIO()
    Image.new("1", (5100, 6600), 1).save(page, "TIFF", compression="group4")  # a blank letter page at 600 dpi
    with pytest.raises(ImageError) as fax:
        probe(page.getvalue(), max_expansion=limit)
    assert webp.value.reason == fax.value.reason == "expansion"
    assert probe(encoded(flat, "PNG"), max_expansion=limit).size == (1920, 1080)  # 724 times: deflate's limit
    assert probe(encoded(flat, "WEBP", lossless=True), max_expansion=0).size == (1920, 1080)  # 0: no limit


def test_the_decoded_size_of_a_mode_pillow_does_not_list_counts_the_most_bytes_a_pixel_takes():
    assert decoded_bytes(SimpleNamespace(mode="RGB", size=(10, 20))) == 600
    assert decoded_bytes(SimpleNamespace(mode="I;16", size=(10, 20))) == 400
    assert decoded_bytes(SimpleNamespace(mode="XYZ;7", size=(10, 20))) == 200 * MAX_BYTES_PER_PIXEL == 800
