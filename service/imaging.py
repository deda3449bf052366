"""Decoding uploads and files into tensors, and encoding results, the same way for the CLI and the service.

EXIF orientation is applied. Grey images come back grey, an alpha channel passes through untouched,
palette images are expanded. 16-bit grey images keep 16 bits; 16-bit colour images, which Pillow would
silently truncate to 8 bits, are refused, as are 32-bit and floating-point images and animated or
multi-page files (whose other frames would be lost).

A file too short for the size its header declares is refused before it is decoded: a decoder fed a
patched header would otherwise fill the missing pixels and spend the memory and time of the declared size.
The floors (:data:`MIN_PIXELS_PER_BYTE`) are far below what any real encoder reaches: Huffman-coded JPEG
spends at least one bit per 8x8 block, deflate (PNG) compresses at most about 1032:1 and BMP's and TIFF's
run-length, LZW and fax codes at most a few thousand pixels per byte. WebP and arithmetic-coded JPEG have no
floor: their entropy coders can spend almost nothing on a flat image, so a tiny file may honestly hold a
large one. What bounds memory for every format is ``max_pixels`` and the number of decodes at once; what
bounds the work a few bytes can ask for is ``max_expansion``, the most bytes the decoded pixels may take per
byte of the file (no photo comes near 10,000; a 34-byte flat WebP of 6000x6000 expands 3,000,000 times).
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = {"PNG", "JPEG", "MPO", "TIFF", "WEBP", "BMP"}
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP", "tiff": "TIFF", "tif": "TIFF"}
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "TIFF": "image/tiff"}
# The most pixels one byte of a well-formed file can hold, per format (see the module docstring).
MIN_PIXELS_PER_BYTE = {"JPEG": 1024, "MPO": 1024, "PNG": 20000, "BMP": 65536, "TIFF": 65536}
ARITHMETIC_JPEG_MARKERS = (b"\xff\xc9", b"\xff\xca", b"\xff\xcb", b"\xff\xcd", b"\xff\xce", b"\xff\xcf")
# What else a malformed header can make Pillow raise while it opens a file.
HEADER_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError, struct.error)


class ImageError(ValueError):
    """An input that cannot be denoised. ``reason`` is one of: ``empty``, ``unsupported``, ``corrupt``,
    ``too_large``, ``expansion``, ``bad_output``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class DecodedImage:
    rgb: torch.Tensor  # (1, 3, H, W) float32 in [0, 1]
    grey: bool
    bits: int  # 8 or 16
    alpha: Image.Image | None  # the untouched alpha band, if any
    jpeg_quality: int | None = None  # a JPEG file's quality, estimated from its header; None for other formats

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.rgb.shape[-1], self.rgb.shape[-2]


def _png_bit_depth(data: bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, or None for other files."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 26:
        return None
    return struct.unpack(">BB", data[24:26])


MAX_BYTES_PER_PIXEL = 4  # the most any mode Pillow decodes to takes: RGBA, CMYK, 32-bit integer or float


def decoded_bytes(image: Image.Image) -> int:
    """Bytes the pixels of an opened (not yet decoded) image take once decoded, in its own mode (3 per pixel
    for 8-bit RGB; a mode Pillow's table does not know counts :data:`MAX_BYTES_PER_PIXEL`)."""
    width, height = image.size
    try:
        mode = ImageMode.getmode(image.mode)
    except KeyError:
        return width * height * MAX_BYTES_PER_PIXEL
    return width * height * len(mode.bands) * int(mode.typestr[-1])


def probe(data: bytes, max_pixels: int | None = None, max_expansion: float | None = None) -> Image.Image:
    """Open the image header (no pixel decoding yet) and apply the format, size and expansion checks."""
    if not data:
        raise ImageError("empty", "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError("too_large", f"image too large: {error}") from None
    except UnidentifiedImageError:
        raise ImageError("unsupported", "not an image, or a format ddsnet cannot read") from None
    except HEADER_ERRORS as error:
        raise ImageError("corrupt", f"image header is unreadable: {error}") from None
    if image.format not in SUPPORTED_FORMATS:
        raise ImageError("unsupported", f"{image.format} images are not supported (use PNG, JPEG, TIFF, WebP or BMP)")
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError("corrupt", f"image header declares a {width}x{height} image")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError("too_large", f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}")
    head = data[:65536]  # the markers before the scan data
    arithmetic = image.format in ("JPEG", "MPO") and any(marker in head for marker in ARITHMETIC_JPEG_MARKERS)
    if image.format in MIN_PIXELS_PER_BYTE and not arithmetic:
        floor = width * height // MIN_PIXELS_PER_BYTE[image.format]
        if len(data) < floor:
            raise ImageError("corrupt", f"the file has {len(data)} bytes, too few for the {width}x{height} image "
                                        f"its header declares (a {image.format} file that size has {floor} or more)")
    if max_expansion:
        expansion = decoded_bytes(image) / len(data)
        if expansion > max_expansion:
            raise ImageError("expansion", f"the {width}x{height} image would take {expansion:.0f} times its "
                                          f"{len(data)} bytes once decoded; the limit is DDSNET_MAX_EXPANSION_RATIO="
                                          f"{max_expansion:g}")
    # MPO: a camera JPEG with extra images (a preview, a gain map); the photo itself is the first frame.
    if image.format != "MPO" and getattr(image, "n_frames", 1) > 1:
        raise ImageError("unsupported", f"animated or multi-page {image.format} files are not supported "
                                        "(every frame but the first would be lost); send one frame")
    if image.mode == "I" and _png_bit_depth(data) != (16, 0):  # Pillow < 10.3 opens 16-bit grey PNGs as "I"
        raise ImageError("unsupported", "32-bit integer images are not supported; 8-bit and 16-bit are")
    png = _png_bit_depth(data)
    if png and png[0] == 16 and png[1] in (2, 4, 6):
        raise ImageError(
            "unsupported", "16-bit colour or grey+alpha PNGs are not supported (they would lose bits); 16-bit grey is"
        )
    if image.format == "TIFF" and image.mode.startswith(("RGB", "CMYK")):
        bits = image.tag_v2.get(258, (8,))
        if max(bits if isinstance(bits, tuple) else (bits,)) > 8:
            raise ImageError("unsupported", "16-bit colour TIFFs are not supported (they would lose bits)")
    return image


def decode_image(data: bytes, max_pixels: int | None = None, max_expansion: float | None = None) -> DecodedImage:
    """Decode an upload or file's bytes.

    Raises:
        ImageError: empty, unsupported, corrupt/truncated, over ``max_pixels``, or expanding more than
            ``max_expansion`` times (decoded bytes over file bytes; None or 0: no limit).
    """
    image = probe(data, max_pixels, max_expansion)
    jpeg_quality = estimate_jpeg_quality(image)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as error:
        raise ImageError("too_large", f"image too large: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError("corrupt", f"image data is truncated or corrupt: {error}") from None

    alpha = None
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        alpha = image.getchannel("A")
        image = image.convert("RGB" if image.mode == "RGBA" else "L")

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float32) / 65535.0
        grey, bits = True, 16
    elif image.mode in ("1", "L"):
        pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        grey, bits = True, 8
    elif image.mode == "F":
        raise ImageError("unsupported", "floating-point images are not supported")
    else:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        grey, bits = False, 8
    tensor = torch.from_numpy(np.ascontiguousarray(pixels))
    tensor = tensor.expand(3, *tensor.shape) if grey else tensor.permute(2, 0, 1)
    return DecodedImage(tensor[None].contiguous().clamp_(0, 1), grey, bits, alpha, jpeg_quality)


# The luminance quantisation table of the JPEG standard (Annex K) that libjpeg scales to every quality.
STANDARD_LUMA_TABLE_SUM = sum((16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57,
                               69, 56, 14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55,
                               64, 81, 104, 113, 92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100,
                               103, 99))


def estimate_jpeg_quality(image: Image.Image) -> int | None:
    """The libjpeg quality (1-100) whose scaling of the standard table best matches a JPEG's luminance table,
    read from its header without decoding; None for other formats or a JPEG without tables.

    libjpeg quantises with ``standard * scale / 100``, where ``scale`` is ``5000 / quality`` below 50 and
    ``200 - 2 * quality`` above; the ratio of the table sums gives ``scale`` back, whatever order the tables
    are stored in. Encoders with tables of their own get the quality of the nearest libjpeg table.
    """
    tables = getattr(image, "quantization", None) if image.format in ("JPEG", "MPO") else None
    if not tables or 0 not in tables or len(tables[0]) != 64:
        return None
    scale = 100 * sum(tables[0]) / STANDARD_LUMA_TABLE_SUM
    quality = (200 - scale) / 2 if scale <= 100 else 5000 / scale
    return int(min(100, max(1, round(quality))))


def check_output_format(source: DecodedImage, output_format: str) -> str:
    """The Pillow format name for ``output_format``, if it can carry ``source`` (alpha, 16 bits).

    Raises:
        ImageError: ``bad_output`` otherwise.
    """
    fmt = OUTPUT_FORMATS.get(output_format.lower())
    if fmt is None:
        raise ImageError("bad_output", f"unknown output format {output_format!r}; use png, jpeg, webp or tiff")
    if source.alpha is not None and fmt == "JPEG":
        raise ImageError("bad_output", "JPEG cannot carry the input's alpha channel; ask for png or webp")
    if source.bits == 16 and fmt not in ("PNG", "TIFF"):
        raise ImageError("bad_output", "16-bit input keeps 16 bits: ask for png or tiff")
    return fmt


def encode_image(denoised: torch.Tensor, source: DecodedImage, output_format: str = "png",
                 png_compress_level: int = 1) -> bytes:
    """Encode a ``(1, 3, H, W)`` result in [0, 1] like ``source`` (grey stays grey, alpha is re-attached).

    ``png_compress_level`` is zlib's level for PNG output. The default, 1, encodes a 2 MP photo 4x faster than
    Pillow's 6 (0.11 s against 0.45 s) for a file 16% larger (``python -m benchmarks.encode``).

    Raises:
        ImageError: ``bad_output`` when the format cannot carry what the input has (alpha in JPEG, 16 bits).
    """
    fmt = check_output_format(source, output_format)
    pixels = denoised[0].clamp(0, 1).cpu()
    if source.grey:
        grey = pixels.mean(dim=0).numpy()
        if source.bits == 16:
            image = Image.fromarray(np.round(grey * 65535).astype(np.uint16))
        else:
            image = Image.fromarray(np.round(grey * 255).astype(np.uint8), mode="L")
    else:
        image = Image.fromarray(np.round(pixels.permute(1, 2, 0).numpy() * 255).astype(np.uint8), mode="RGB")
    if source.alpha is not None:
        image.putalpha(source.alpha)
    buffer = io.BytesIO()
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    if fmt == "PNG":
        options["compress_level"] = png_compress_level
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def media_type(output_format: str) -> str:
    return MEDIA_TYPES[OUTPUT_FORMATS[output_format.lower()]]
