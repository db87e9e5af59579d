"""Safe file names and atomic writes: a crash at any instant leaves no half-written file."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from atlas.errors import AtlasError

log = logging.getLogger(__name__)

IMAGE_FORMATS = {"webp": "WEBP", "png": "PNG"}


def safe_name(text: str) -> str:
    """A file name for a layer or unit id: no separators, no traversal, readable."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "_"
    return name[:150]


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write to a temporary file in the same folder, fsync (when durable), then rename over
    `path`. Rendered pages skip the fsync: they can always be rendered again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; atlases are meant to be published
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_arrays(path: Path, meta: dict, **arrays: np.ndarray) -> None:
    """Arrays and their JSON-able metadata as one .npz file, written atomically (how a
    layer's samples, dictionary and activation atlas are stored)."""
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    atomic_write_bytes(Path(path), buffer.getvalue())


def read_arrays(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """What write_arrays stored: (metadata, arrays by name). A damaged file raises what
    np.load raises (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)."""
    with np.load(Path(path)) as saved:
        meta = json.loads(saved["meta"].tobytes())
        return meta, {name: saved[name] for name in saved.files if name != "meta"}


def atomic_write_json(path: Path, value: object, *, indent: int | None = 2) -> None:
    """Sorted keys, indented for people; the manifest (megabytes, for the site) is not."""
    atomic_write_bytes(path, (json.dumps(value, indent=indent, sort_keys=True) + "\n").encode())


def encode_image(pixels: np.ndarray, fmt: str = "webp", quality: int = 90) -> bytes:
    """uint8 [H, W, 3] -> WebP (q90: ~6x smaller than PNG for these images) or PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=IMAGE_FORMATS[fmt], quality=quality)
    return buffer.getvalue()


def decode_image(data: bytes, like: np.ndarray | None = None) -> np.ndarray:
    """Image bytes -> uint8 [H, W, 3]; resized to the shape of `like` when given and different
    (the picture of a checkpoint made at another size)."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        if like is not None and image.size != (like.shape[1], like.shape[0]):
            image = image.resize((like.shape[1], like.shape[0]), Image.Resampling.BILINEAR)
        return np.array(image)


def encode_animation(
    frames: list[np.ndarray], frame_ms: int = 80, hold_ms: int = 1500, quality: int = 80
) -> bytes:
    """uint8 [H, W, 3] frames -> a looping animated WebP that holds its last frame. Smaller
    frames (earlier octaves) are scaled up to the last frame's size."""
    size = frames[-1].shape[1], frames[-1].shape[0]
    images = [Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="WEBP",
        save_all=True,
        append_images=images[1:],
        duration=[frame_ms] * (len(images) - 1) + [hold_ms],
        loop=0,
        quality=quality,
    )
    return buffer.getvalue()


# what a write gets from a folder it may not write to (a read-only mount, permissions, a full disk)
WRITE_ERRORS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


def writable_folder(path: str | Path, below: Iterable[str] = ()) -> Path:
    """Create `path` if needed and prove it writable, and each of the folders `below` it (globs)
    that exist, or raise one clear AtlasError naming the first that is not."""
    path = Path(path)
    folder = path
    try:
        path.mkdir(parents=True, exist_ok=True)
        for folder in [path, *(f for pattern in below for f in sorted(path.glob(pattern)))]:
            if folder.is_dir():
                with tempfile.TemporaryFile(dir=folder):
                    pass
    except OSError as error:
        raise AtlasError(f"cannot write to {folder}: {error.strerror or error}") from error
    return path


@contextlib.contextmanager
def naming_unwritable(out: Path, consequence: str) -> Iterator[None]:
    """A write under `out` that fails for want of permission or space ends in one AtlasError
    naming the folder and `consequence`, not a traceback from deep in a writer."""
    try:
        yield
    except OSError as error:
        target = os.path.abspath(error.filename) if isinstance(error.filename, str) else None
        if error.errno not in WRITE_ERRORS or target is None:
            raise
        if not Path(target).is_relative_to(out.absolute()):
            raise
        folder = Path(target).parent
        raise AtlasError(f"cannot write to {folder}: {error.strerror}; {consequence}") from error


def remove_temporaries(folder: Path, *, below: bool = False) -> int:
    """Delete the `.NAME.*.tmp` files a killed writer left in `folder` (and, with `below`, in
    every folder inside it); only for a caller that holds the folder's lock. Returns how many."""
    removed = 0
    for path in folder.rglob(".*.tmp") if below else folder.glob(".*.tmp"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _open_lock_file(path: Path) -> tuple[int, bool]:
    """A descriptor on the lock file and whether it is writable: in a folder shared between
    users the file may belong to whoever ran first, and flock works on a read-only descriptor."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True
    except PermissionError:
        try:
            return os.open(path, os.O_RDONLY), False
        except OSError as error:
            raise AtlasError(f"cannot open the lock file {path}: {error.strerror}") from error
    except OSError as error:
        raise AtlasError(f"cannot open the lock file {path}: {error.strerror or error}") from error


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on `path` for the block. With `busy`, another holder makes it
    raise AtlasError(busy + its pid) at once; without, it waits its turn. The kernel releases
    the lock when its holder dies, even by SIGKILL, so a crash never leaves a stale lock.
    Yields whether the lock is held: False, after a warning, on a file system that cannot lock
    (some NFS, FUSE and SMB mounts); the caller must then not assume it is alone."""
    fd, writable = _open_lock_file(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
            held = True
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise AtlasError(f"{busy} (pid {holder}); wait for it or stop it first") from None
        except OSError as error:
            log.warning("cannot lock %s (%s); nothing keeps writers apart", path, error.strerror)
            held = False
        if held and writable:
            mark = f"{os.getpid()}\n".encode()
            os.pwrite(fd, mark, 0)  # then truncate: a reader never sees an empty file
            os.ftruncate(fd, len(mark))
        yield held
    finally:
        os.close(fd)
