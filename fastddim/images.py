"""Image helpers shared by the CLI and ``fastddim.generate``: uint8 conversion, grids, files.

Conventions: model space is float (N, C, H, W) in [-1, 1]; files hold uint8 (N, H, W, C)
("NHWC", what FID tools read from ``arr_0`` of an ``.npz``). The conversion is
``round((x + 1) * 127.5)`` clamped to [0, 255] (round half to even, as ``torch.round``), done on
the CPU in float32 so it gives the same bytes whatever device made ``x``.

Every file is written atomically: to a temporary name in the same folder, flushed and fsynced,
then renamed over the target with ``os.replace``. A reader never sees a half-written file; a
crash leaves at most a hidden ``.NAME.tmp-*`` file, never a truncated ``NAME``.
"""
from __future__ import annotations

import contextlib
import math
import os
import uuid
import zipfile
from typing import IO, Iterable, Iterator

import numpy as np
import torch

__all__ = [
    "to_uint8", "from_uint8", "make_grid", "atomic_write", "save_npz", "save_npz_stream", "save_png", "save_images",
    "load_images", "tmp_name", "TMP_MARK",
]

TMP_MARK = ".tmp-"  # every temporary file is ".<final name>.tmp-<pid>-<random>"


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8, ``round((x + 1) * 127.5)`` clamped."""
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    u = ((x + 1.0) * 127.5).round().clamp_(0, 255).to(torch.uint8)
    return u.permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8(a: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [-1, 1] (``a / 127.5 - 1``)."""
    a = np.asarray(a)
    if a.ndim != 4 or a.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (N, H, W, C), got {a.dtype} {a.shape}")
    return torch.from_numpy(a.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def make_grid(a: np.ndarray, nrow: int | None = None, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into one (H', W', C) image, ``nrow`` images per row
    (default ceil(sqrt(N))), with ``padding`` pixels of ``pad_value`` around each."""
    n, h, w, c = a.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    H, W = ncol * (h + padding) + padding, nrow * (w + padding) + padding
    out = np.full((H, W, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        out[y:y + h, x:x + w] = a[i]
    return out


def tmp_name(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # not possible on every platform / file system
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[IO[bytes]]:
    """``with atomic_write(p) as f: f.write(...)``: p appears complete or not at all."""
    path = os.fspath(path)
    tmp = tmp_name(path)
    try:
        try:
            f = open(tmp, "wb")
        except OSError as e:  # name the file the user asked for, never the temporary
            raise _os_error(e, f"cannot write {path}") from None
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _os_error(e, f"cannot write {path}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _os_error(e: OSError, what: str) -> OSError:
    err = type(e)(f"{what}: {e.strerror or e}")  # one argument: str(err) is the message alone
    err.errno = e.errno
    return err


_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so equal arrays give byte-identical files


def _zip_entry(zf: zipfile.ZipFile, name: str):
    info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    return zf.open(info, "w", force_zip64=True)


def save_npz(path: str, **arrays) -> None:
    """Like ``np.savez`` (uncompressed, readable by ``np.load``), but atomic and deterministic:
    the zip entries carry a fixed timestamp, so the same arrays always give the same bytes."""
    with atomic_write(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, val in arrays.items():
            with _zip_entry(zf, name) as w:
                np.lib.format.write_array(w, np.asanyarray(val), allow_pickle=False)


def save_npz_stream(path: str, name: str, shape: tuple[int, ...], dtype, chunks: Iterable[np.ndarray], **small) -> None:
    """Write an ``.npz`` whose array ``name`` (``shape``, ``dtype``) is the concatenation of
    ``chunks`` along axis 0, holding one chunk in memory at a time; ``small`` arrays are added
    as further entries. Same bytes as ``save_npz`` of the concatenated array."""
    dtype = np.dtype(dtype)
    want = int(np.prod(shape)) * dtype.itemsize
    with atomic_write(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with _zip_entry(zf, name) as w:
            np.lib.format.write_array_header_1_0(
                w, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
            )
            done = 0
            for c in chunks:
                c = np.ascontiguousarray(c, dtype=dtype)
                if c.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"chunk of shape {c.shape} does not fit an array of shape {tuple(shape)}")
                w.write(c.tobytes())
                done += c.nbytes
            if done != want:
                raise ValueError(f"chunks hold {done} bytes, expected {want} for shape {tuple(shape)}")
        for k, val in small.items():
            with _zip_entry(zf, k) as w:
                np.lib.format.write_array(w, np.asanyarray(val), allow_pickle=False)


def _pil_image(hwc: np.ndarray):
    from PIL import Image

    c = hwc.shape[2]
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    if c not in modes:
        raise ValueError(f"cannot write {c}-channel images as PNG (1, 3 or 4 channels); write .npz instead")
    return Image.fromarray(hwc[:, :, 0] if c == 1 else hwc, modes[c])


def save_png(path: str, hwc: np.ndarray) -> None:
    """One (H, W, C) uint8 image as PNG, atomically."""
    img = _pil_image(hwc)
    with atomic_write(path) as f:
        img.save(f, format="PNG")


def save_images(path: str, a: np.ndarray, *, nrow: int | None = None, first_index: int = 0) -> str:
    """Write (N, H, W, C) uint8 images where ``path`` says; returns a description of what was written.

    - ``*.npz``: ``arr_0`` = the array (N, H, W, C) uint8.
    - a path ending in ``/`` or an existing folder: one PNG per image, ``{index:06d}.png``
      (index counted from ``first_index``).
    - ``*.png``: a grid of all images (``nrow`` per row, default ceil(sqrt(N))).
    """
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        os.makedirs(path, exist_ok=True)
        for i, img in enumerate(a):
            save_png(os.path.join(path, f"{first_index + i:06d}.png"), img)
        return f"{len(a)} PNG files in {path}"
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        save_npz(path, arr_0=a)
        return f"{path} (arr_0: uint8 {a.shape})"
    if ext == ".png":
        save_png(path, make_grid(a, nrow))
        return f"{path} ({len(a)} images in a grid)"
    raise ValueError(f"output {path!r}: use a .png (grid), .npz, or a folder (ending in '/')")


def load_images(paths: list[str], channels: int | None = None) -> np.ndarray:
    """Images from ``.npz`` files (``arr_0``, uint8 NHWC) and image files (PNG, JPEG, ...), as one
    (N, H, W, C) uint8 array. ``channels`` converts image files to 1 (L) or 3 (RGB) channels."""
    from PIL import Image, UnidentifiedImageError

    parts = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"no such file: {p}")
        if p.lower().endswith(".npz"):
            try:
                with np.load(p, allow_pickle=False) as z:
                    if "arr_0" not in z.files:
                        raise ValueError(f"{p}: no 'arr_0' array (has {z.files})")
                    a = z["arr_0"]
            except (OSError, EOFError, ValueError) as e:
                raise ValueError(f"cannot read {p}: {e}") from None
            if a.dtype != np.uint8 or a.ndim not in (3, 4):
                raise ValueError(f"{p}: arr_0 must be uint8 (N, H, W, C) images, got {a.dtype} {a.shape}")
            parts.append(a if a.ndim == 4 else a[..., None])
        else:
            try:
                with Image.open(p) as img:
                    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels or 0, None)
                    img = img.convert(mode) if mode else img.convert("RGB") if img.mode not in ("L", "RGB", "RGBA") else img
                    a = np.asarray(img, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"cannot read image {p}: {e}") from None
            parts.append((a[..., None] if a.ndim == 2 else a)[None])
    shapes = {q.shape[1:] for q in parts}
    if len(shapes) > 1:
        raise ValueError(f"input images have different shapes: {sorted(shapes)}")
    return np.concatenate(parts)
