"""Turning untrusted uploaded bytes into an RGB image, or a clear reason why not.

Every check happens before the pixels are decoded: the byte size (the caller streams at most ``limit + 1`` bytes),
then the header's pixel count against an explicit bound (a decompression bomb is a small file that decodes to
gigabytes), and only then the decode, which catches truncated and corrupt files.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from hihpq.data.folders import MAX_ASPECT, to_8bit_rgb

#: pixels an uploaded query may have (40 MP: any camera photo); PIL's own bomb guard is ~89 MP (warning) and
#: twice that (error), so this bound is the one that applies.
DEFAULT_MAX_PIXELS = 40_000_000


class BadImageError(ValueError):
    """The upload is not a decodable image (status 400)."""

    status_code = 400


class TooManyPixelsError(BadImageError):
    """The image header announces more pixels than the bound (status 422)."""

    status_code = 422


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` into an RGB PIL image; BadImageError / TooManyPixelsError say what is wrong."""
    if not data:
        raise BadImageError("the uploaded file is empty; send a JPEG, PNG, WebP, GIF or BMP image")
    try:
        with warnings.catch_warnings():
            # PIL's bomb warning becomes an error; other warnings (odd EXIF, palettes) are about readable files
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise TooManyPixelsError(
                        f"the image is {w} x {h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
                        "send a smaller image"
                    )
                if max(w, h) > MAX_ASPECT * max(min(w, h), 1):  # a 1 x 30,000 strip: tiny, but its resize is not
                    raise TooManyPixelsError(
                        f"the image is {w} x {h} pixels, an aspect ratio over {MAX_ASPECT:g}; send a less elongated one"
                    )
                img.load()
                if img.mode == "P" and "transparency" in img.info:
                    return img.convert("RGBA").convert("RGB")
                if img.mode in ("I", "F") or img.mode.startswith("I;16"):
                    return to_8bit_rgb(img)  # PIL's convert would clip 16-bit and float images to near-constant
                return img.convert("RGB")
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooManyPixelsError(f"the image is a decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise BadImageError(
            "the uploaded file is not an image PIL can read; send a JPEG, PNG, WebP, GIF or BMP image"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadImageError(f"the image could not be decoded (truncated or corrupt?): {exc}") from None
