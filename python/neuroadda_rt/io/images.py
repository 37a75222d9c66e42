"""The one decoder of 2-D image files (TIFF via tifffile, PNG/JPEG via Pillow).

Everything that reads a single image file -- slice folders, QC tiles, painted annotation labels --
goes through :func:`read_image_2d` or :func:`read_image_stack`, so one file always decodes to the
same array, under one documented colour rule:

``kind="image"`` (intensities)
    Grey images (Pillow modes ``1``, ``L``, ``I;16``, ``I``, ``F``; single-sample TIFF) are
    returned in the file's dtype. An alpha channel is dropped. Colour images become their
    luminance, ITU-R 601-2 ``L = 0.299 R + 0.587 G + 0.114 B`` (Pillow's ``convert("L")``),
    rounded back to the file's dtype. Grey values stored in colour channels (R = G = B, how
    the shared EM data sets save them) are returned exactly, unchanged.
``kind="labels"`` (instance ids)
    Ids are never mixed: a luminance of ids is a different, meaningless id. Grey and indexed
    (palette) images give their stored values (the palette index *is* the id; the colours are
    only for display). A colour image is accepted only when R = G = B (ids saved as grey by a
    paint program); a colour-coded label image is refused with :class:`FormatError` (save the
    ids as a single-channel or indexed PNG/TIFF instead). JPEG is lossy and refused for labels.
    Float files must hold whole numbers; ids must be non-negative. The result is uint32 (uint64
    when an id does not fit).

Axis order is NumPy's: ``(y, x)`` for one image, ``(n, y, x)`` for a stack.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import FormatError, InputValueError, ShapeError, require

__all__ = ["read_image_2d", "read_image_stack", "image_dtype", "IMAGE_SUFFIXES", "TIFF_SUFFIXES"]

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *TIFF_SUFFIXES)
_KINDS = ("image", "labels")
# ITU-R 601-2 luma weights, as Pillow's convert("L")
_LUMA = np.array([0.299, 0.587, 0.114])


def read_image_2d(path, *, kind: str = "image") -> np.ndarray:
    """Decode one 2-D image file into a single-channel array.

    Parameters
    ----------
    path : str or Path
        ``.tif``/``.tiff`` (one page; singleton axes added by ImageJ/napari are dropped),
        ``.png``, ``.jpg``/``.jpeg``.
    kind : {"image", "labels"}
        How colour is reduced to one channel; see the module docstring: luminance for
        ``"image"``, never mixed for ``"labels"`` (colour-coded labels are refused).

    Returns
    -------
    numpy.ndarray
        ``(H, W)``, a new C-contiguous array: the file's dtype for ``"image"``, uint32 (or
        uint64) for ``"labels"``.

    Raises
    ------
    FormatError
        Unknown suffix, a truncated or unreadable file, a colour-coded or non-integer label image.
    ShapeError
        The file holds several pages (use :func:`read_image_stack`).

    Examples
    --------
    >>> read_image_2d("slice_000.png").shape                    # doctest: +SKIP
    (1024, 1024)
    >>> read_image_2d("tile_000_y0_x0.tif", kind="labels").dtype  # doctest: +SKIP
    dtype('uint32')
    """
    stack = read_image_stack(path, kind=kind)
    if stack.shape[0] != 1:
        raise ShapeError(f"{path}: expected a 2-D image, got a stack of {stack.shape[0]} pages of {stack.shape[1:]}")
    return stack[0]


def read_image_stack(path, *, kind: str = "image") -> np.ndarray:
    """Decode an image file into a stack of single-channel images (every page of a TIFF).

    Same colour rule and errors as :func:`read_image_2d`; a one-page file gives ``(1, H, W)``.

    Returns
    -------
    numpy.ndarray
        ``(N, H, W)``, a new C-contiguous array.
    """
    if kind not in _KINDS:
        raise InputValueError(f"expected kind in {_KINDS}, got {kind!r}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise FormatError(f"{path}: unknown image format {suffix!r}; expected one of {IMAGE_SUFFIXES}")
    if kind == "labels" and suffix in (".jpg", ".jpeg"):
        raise FormatError(f"{path}: JPEG is lossy and cannot hold label ids; save labels as PNG or TIFF")
    try:
        pages, channels = _decode_tiff(path) if suffix in TIFF_SUFFIXES else _decode_pillow(path, kind)
    except (FormatError, ShapeError):
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile and Pillow raise many types on a cut file
        raise FormatError(f"{path}: cannot read image (truncated or not an image?): {exc}") from exc
    pages = pages.astype(pages.dtype.newbyteorder("="), copy=False)  # Pillow gives big-endian I;16B
    out = _one_channel(pages, channels, kind, path)
    if kind == "labels":
        out = _as_ids(out, path)
    return np.ascontiguousarray(out)


# Pillow modes whose decoded dtype (kind="image") is known from the header alone
_PIL_MODE_DTYPES = {"1": "bool", "L": "uint8", "LA": "uint8", "P": "uint8", "PA": "uint8", "RGB": "uint8",
                    "RGBA": "uint8", "RGBX": "uint8", "CMYK": "uint8", "YCbCr": "uint8", "LAB": "uint8",
                    "HSV": "uint8", "I": "int32", "F": "float32", "I;16": "uint16", "I;16L": "uint16",
                    "I;16B": "uint16", "I;16N": "uint16"}


def image_dtype(path, *, decode: bool = True) -> np.dtype | None:
    """The dtype :func:`read_image_2d` (``kind="image"``) returns for ``path``, from the file's header
    where it says so (a TIFF's sample format, a Pillow mode), else by decoding the file.

    With ``decode=False`` only the header is read, and ``None`` comes back when it does not tell
    (an unreadable header or an unusual Pillow mode); otherwise errors are those of
    :func:`read_image_2d` (:class:`FormatError` naming the file).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in TIFF_SUFFIXES:
            tifffile = require("tifffile", "io")
            with tifffile.TiffFile(str(path)) as tf:
                return np.dtype(tf.series[0].dtype).newbyteorder("=")
        if suffix in IMAGE_SUFFIXES:
            Image = require("PIL.Image", "io")
            with Image.open(path) as im:
                name = _PIL_MODE_DTYPES.get(im.mode)
            if name is not None:
                return np.dtype(name)
    except Exception:  # noqa: BLE001, S110 - an unreadable header: the decoder names the problem
        pass
    return read_image_stack(path).dtype if decode else None


def _decode_tiff(path: Path) -> tuple[np.ndarray, bool]:
    """Pages ``(N, H, W[, S])`` and whether the last axis holds colour samples."""
    tifffile = require("tifffile", "io")
    with tifffile.TiffFile(str(path)) as tf:
        series = tf.series[0]
        axes = series.axes
        arr = series.asarray()
    channels = "S" in axes
    if channels:  # samples last, whatever the planar configuration
        arr = np.moveaxis(arr, axes.index("S"), -1)
    core = 3 if channels else 2
    if arr.ndim < core:
        raise ShapeError(f"{path}: expected a 2-D image, got shape {arr.shape}")
    return arr.reshape(-1, *arr.shape[arr.ndim - core:]), channels


def _decode_pillow(path: Path, kind: str) -> tuple[np.ndarray, bool]:
    Image = require("PIL.Image", "io")
    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode in ("P", "PA") and kind == "image":
            im = im.convert("RGBA")  # palette colours, then the luminance rule
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            if kind == "labels":
                raise FormatError(f"{path}: a {mode} colour image cannot hold label ids; save them as a "
                                  "single-channel or indexed PNG/TIFF")
            im = im.convert("RGB")
        arr = np.asarray(im)
    return arr[None], arr.ndim == 3


def _one_channel(pages: np.ndarray, channels: bool, kind: str, path: Path) -> np.ndarray:
    """Apply the colour rule to ``(N, H, W[, C])`` pages."""
    if not channels:
        return pages
    c = pages.shape[-1]
    if c in (1, 2):  # grey (+ alpha): nothing to mix
        return pages[..., 0]
    if c not in (3, 4):
        raise FormatError(f"{path}: expected 1 to 4 colour samples per pixel, got {c}")
    rgb = pages[..., :3]  # alpha dropped
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0]  # grey stored as colour: exact
    if kind == "labels":
        raise FormatError(f"{path}: a colour-coded label image (R, G, B differ); ids must not be mixed into a "
                          "grey value: save them as a single-channel or indexed (palette) PNG/TIFF")
    luma = rgb.astype(np.float64) @ _LUMA
    if rgb.dtype.kind in "ui":
        info = np.iinfo(rgb.dtype)
        return np.clip(np.rint(luma), info.min, info.max).astype(rgb.dtype)
    return luma.astype(rgb.dtype)


def _as_ids(a: np.ndarray, path: Path) -> np.ndarray:
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise FormatError(f"{path}: expected integer label ids, got non-integer float values")
    elif a.dtype.kind not in "uib":
        raise FormatError(f"{path}: expected integer label ids, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise FormatError(f"{path}: expected non-negative label ids, got minimum {a.min()}")
    if a.size and a.max() >= 2**32:
        return a.astype(np.uint64)
    return a.astype(np.uint32)
