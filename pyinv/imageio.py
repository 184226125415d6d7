"""Reading images robustly, preparing them for a model, and writing outputs atomically.

Every reading problem (missing, empty, truncated, not an image, too small, too large,
non-finite pixels) becomes a :class:`~pyinv.errors.PyinvError` with one clear line. The
EXIF orientation is applied (a phone photo is edited upright). Any mode Pillow opens is
converted to 8-bit RGB: greyscale, palette, alpha (composited on white), 16-bit integer
(÷ 65535), 32-bit integer (÷ 255 or ÷ 65535 when it fits, else scaled by the data's range),
float (scaled by the data's range), CMYK.

Outputs are written atomically; an output that cannot be written (a missing or read-only
folder, a name the file system refuses) fails before any work with the user's path named.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import PyinvError

MIN_SIDE = 8
MAX_PIXELS = 100_000_000


def _to_rgb(img: Image.Image, label: str = "image") -> Image.Image:
    """8-bit RGB from any Pillow mode (alpha composited on white)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise PyinvError(f"image has non-finite pixel values (NaN or infinity): {label}")
        lo, hi = float(arr.min()), float(arr.max())
        if mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        elif mode == "I" and lo >= 0 and hi <= 65535:
            lo, hi = 0.0, (255.0 if hi <= 255 else 65535.0)
        # else float, or 32-bit integers past 16 bits: the data's own range
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        grey = Image.fromarray(np.clip(np.rint((arr - lo) * scale), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def load_image(source: str | os.PathLike | Image.Image | np.ndarray) -> Image.Image:
    """Open ``source`` (path, PIL image or HWC uint8 array) as an 8-bit RGB PIL image."""
    if isinstance(source, Image.Image):
        return _finish(source, getattr(source, "filename", "") or "image")
    if isinstance(source, np.ndarray):
        arr = source
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise PyinvError(f"numpy images must be uint8 HxW or HxWx3 (or x4), got {arr.dtype} {arr.shape}")
        return _finish(Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr), "image")
    if not isinstance(source, str | os.PathLike):
        raise PyinvError(f"image must be a path, a PIL image or a numpy array, got {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.exists(path):
        raise PyinvError(f"image not found: {path}")
    if os.path.isdir(path):
        raise PyinvError(f"expected an image file, got a folder: {path}")
    if os.path.getsize(path) == 0:
        raise PyinvError(f"image file is empty: {path}")
    with warnings.catch_warnings():
        # Pillow's notes on odd files ("Tag data larger than file", its bomb warning: pyinv
        # applies its own MAX_PIXELS) would only be noise on stderr; _open reports errors
        warnings.simplefilter("ignore")
        img = _open(path)
        try:
            out = _finish(img, path)
            return out.copy() if out is img else out
        finally:
            img.close()  # multi-frame formats keep the file open otherwise


def load_image_bytes(data: bytes, label: str = "upload", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image file's bytes (an upload) as an 8-bit RGB PIL image, with the checks of
    :func:`load_image`; ``max_pixels`` (≤ :data:`MAX_PIXELS`) is checked from the header,
    before the pixels are decoded (a small file that decodes to a huge image is refused)."""
    import io

    if not data:
        raise PyinvError(f"image file is empty: {label}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = _open(io.BytesIO(data), label, max_pixels)
        try:
            out = _finish(img, label)
            return out.copy() if out is img else out
        finally:
            img.close()


def _finish(img: Image.Image, label: str) -> Image.Image:
    """``img`` checked for size, turned upright and converted to 8-bit RGB."""
    _check_size(img, label)
    upright = _upright(img, label)
    try:
        return _to_rgb(upright, label)
    except (ValueError, OSError, TypeError) as exc:
        raise PyinvError(f"cannot convert image mode {img.mode} to RGB: {label} ({exc})") from None


def _upright(img: Image.Image, label: str) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says (phone photos are stored sideways)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes about odd EXIF data
            return ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001 - malformed EXIF data fails in many ways
        raise PyinvError(f"image has damaged EXIF data: {label} ({exc})") from None


def _open(path, label: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and decode ``path`` (or a binary file object, named ``label``) with Pillow; every
    failure is one clear error, and the file is closed. Pillow's decoders raise many kinds of
    exception on malformed data (OSError, ValueError, SyntaxError, struct.error, EOFError, …),
    so any exception is a damaged file."""
    label = path if label is None else label
    try:
        img = Image.open(path)
    except Image.DecompressionBombError:
        raise PyinvError(f"image is too large (over {MAX_PIXELS // 1_000_000} megapixels): {label}") from None
    except UnidentifiedImageError:
        raise PyinvError(f"not an image file (or an unsupported format): {label}") from None
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise PyinvError(f"cannot read image {label}: {exc}") from None
    try:
        _check_size(img, label, max_pixels)
        img.load()
    except PyinvError:
        img.close()
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        img.close()
        raise PyinvError(f"image file is damaged or truncated: {label} ({exc})") from None
    return img


def _check_size(img: Image.Image, label: str, max_pixels: int = MAX_PIXELS) -> None:
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise PyinvError(f"image is too small ({w}x{h}); each side must be at least {MIN_SIDE} px: {label}")
    if w * h > max_pixels:
        raise PyinvError(f"image is too large ({w}x{h}, over {max_pixels / 1e6:g} megapixels): {label}")


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square (the shorter side), then resize to ``size``² (bicubic),
    as the references' ``load_512`` does."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """``(1, 3, H, W)`` float32 in ``[-1, 1]`` from an RGB PIL image."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """PIL images from ``(B, 3, H, W)`` in ``[-1, 1]``."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


def check_writable(path: str | os.PathLike) -> str:
    """Fail early, before any work, if ``path`` cannot be written; returns it as a string.

    Beyond permissions, a probe file is created (and removed) in the folder, so special
    file systems (``/proc``), read-only mounts and full disks are caught, and the name's
    length is checked against the file system's limit.
    """
    path = os.fspath(path)
    if not path:
        raise PyinvError("empty output path")
    if "\0" in path:
        raise PyinvError(f"output path contains a NUL character: {path!r}")
    if os.path.isdir(path):
        raise PyinvError(f"output path is a folder: {path}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise PyinvError(f"output folder does not exist: {folder} (for {path})")
    name = os.path.basename(path)
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(name)) > limit:
        raise PyinvError(f"output file name is too long ({len(os.fsencode(name))} bytes, at most {limit}): {path}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise PyinvError(f"output file is not writable: {path}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".pyinv-", dir=folder)
    except OSError as exc:
        raise PyinvError(f"cannot write {path}: output folder is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.remove(probe)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename,
    on failure it is removed, so ``path`` is never left half-written. A failure to write is
    a :class:`PyinvError` that names ``path`` (not the temporary file)."""
    path = check_writable(path)
    folder = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    try:
        fd, tmp = tempfile.mkstemp(prefix=".pyinv-", suffix=suffix, dir=folder)
    except OSError as exc:
        raise PyinvError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        try:
            yield tmp
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
            os.replace(tmp, path)
        except OSError as exc:
            raise PyinvError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


IMAGE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


def image_format(path: str | os.PathLike) -> str:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in IMAGE_FORMATS:
        raise PyinvError(f"unsupported output image type {ext or '(none)'!r}; use one of {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[ext]


def save_image(img: Image.Image, path: str | os.PathLike) -> None:
    """Write ``img`` atomically; the format follows the extension."""
    fmt = image_format(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt)
