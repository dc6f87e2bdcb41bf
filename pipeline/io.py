"""Reading user images and writing outputs without ever leaving a half-written file."""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image

from data.images import ImageError, as_array, decode
from pipeline.interruption import held, put_in_place

_filling: list[Path] = []  # the temporary folders of the open folder_at_once blocks
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the new one.
    A symbolic link is followed: its target gets the data, and the link stays. Ctrl+C and SIGTERM wait
    for the rename (`pipeline.interruption.held`, firm)."""
    named, path = path, Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        partial.write_bytes(data)
        with held(f"writing {path.name}", firm=True):  # a stop between rename and note would be reported wrong
            os.replace(partial, path)
            if not any(folder in path.parents for folder in _filling):
                put_in_place(named)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def folder_at_once(path: str | Path):
    """Write a folder's files into a temporary folder, which replaces `path` only when the block ends
    without an error: an interrupted command leaves the old folder whole, never a mix. A symbolic
    link is followed: the folder it points to is replaced, and the link stays. Processes writing one
    folder at once take turns to replace it (a lock file beside it, `.<name>.lock`, which stays):
    the last one's folder is the one left. Ctrl+C and SIGTERM wait for the two renames (all of them: a
    stop between them would leave neither folder at `path`), not for the lock."""
    named, path = path, Path(path).resolve()
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _filling.append(partial)
    try:
        yield partial
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        with FileLock(path.with_name(f".{path.name}.lock")):  # released by the system if this process dies
            with held(f"putting {path.name} in place", firm=True):
                if path.exists():
                    os.replace(path, old)
                os.replace(partial, path)
                put_in_place(named)
                shutil.rmtree(old, ignore_errors=True)
    finally:
        _filling.remove(partial)
        shutil.rmtree(partial, ignore_errors=True)


def save_png(path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())


def save_gif(path, frames: list[np.ndarray], ms_per_frame: int = 250) -> None:
    pictures = [Image.fromarray(f.squeeze(-1) if f.shape[-1] == 1 else f) for f in frames]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=ms_per_frame, loop=0)
    atomic_write(path, buffer.getvalue())


def save_npz(path, **arrays) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write(path, buffer.getvalue())


def save_json(path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_image(path: str | Path, channels: int, background: str = "white") -> np.ndarray:
    """One image file -> (H, W, C) uint8 with C = `channels`, decoded by `data.images` (orientation,
    bit depth, transparency onto `background`, palette and other modes). Raises FileNotFoundError or
    ValueError with one line."""
    if not str(path).strip():  # make's INPUT= left unset
        raise ValueError("no input given: INPUT=<an image file>")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give the path of one image file in it")
    if not path.is_file():
        raise FileNotFoundError(f"no image file {path}: give the path of an image file")
    try:
        image, transparent = decode(path, channels, background)
    except ImageError as error:
        raise ValueError(f"cannot use {path}: {error}") from error
    if transparent:
        print(f"note: {path} has transparent pixels, composited onto {background} (data.background)", file=sys.stderr)
    return as_array(image)


def image_files(folder: str | Path) -> list[Path]:
    """The image files of a folder, by name; raises ValueError when there are none."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_npz_images(path: Path) -> np.ndarray:
    """The `images` array of an .npz file. Raises ValueError in one line for a file that is not a whole
    .npz (cut short, empty, another format) or whose arrays only unpickling would read (never done here)."""
    remedy = "give an .npz written by numpy.savez with a uint8 'images' array (N, H, W, C), or a folder of images"
    with open(path, "rb") as file:
        head = file.read(6)
    if head and not head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):  # numpy reads others as pickles
        raise ValueError(f"cannot read {path}: not an .npz file (it does not begin as a zip archive does); {remedy}")
    try:
        archive = np.load(path)  # allow_pickle=False: a file from elsewhere cannot run code
        if isinstance(archive, np.lib.npyio.NpzFile):
            with archive:
                images = archive["images"] if "images" in archive.files else None
                names = archive.files
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError) as error:  # ValueError: pickled data
        reason = str(error).split(". ")[0]  # numpy's first sentence; its advice to unpickle is not ours
        raise ValueError(f"cannot read {path}: not a whole .npz file of arrays ({type(error).__name__}: {reason}); "
                         f"{remedy}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"cannot read {path}: it holds one unnamed array (an .npy file), not an .npz; {remedy}")
    if images is None:
        raise ValueError(f"{path} has no 'images' array (it has {', '.join(names) or 'none'}); {remedy}")
    return images


def read_images(path: str | Path, channels: int, background: str = "white") -> np.ndarray:
    """An .npz with `images` (N, H, W, C) uint8, a single image, or a folder of images -> (N, H, W, C).
    Raises ValueError when no path is given or the images are unusable, FileNotFoundError when missing."""
    if not str(path).strip():
        raise ValueError("no input given: INPUT=<an image, a folder of images, or an .npz with 'images'>")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no file or folder {path}: give an image, a folder of images, "
                                f"or an .npz with 'images'")
    if path.is_dir():
        images = [read_image(f, channels, background) for f in image_files(path)]
        if len({im.shape for im in images}) > 1:
            raise ValueError(f"images in {path} differ in shape; give images of one shape")
        return np.stack(images)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"no file {path}: give IMAGES=<.npz with an 'images' array, or a folder>")
        images = read_npz_images(path)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"{path}: 'images' must be uint8 of shape (N, H, W, C), got {images.dtype} {images.shape}")
        return images
    return read_image(path, channels, background)[None]


def check_shape(images: np.ndarray, expected: tuple[int, int, int], what: str) -> None:
    """Raise ValueError naming the shape wanted when images (N, H, W, C) are not of shape `expected`."""
    if tuple(images.shape[1:]) != tuple(expected):
        h, w, c = expected
        raise ValueError(f"{what} has shape {tuple(images.shape[1:])} (H, W, C), expected {expected}: "
                         f"give {h} x {w} images with {c} channel{'s' if c > 1 else ''} ({'RGB' if c == 3 else 'grey'})")
