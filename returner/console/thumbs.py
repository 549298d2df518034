"""Thumbnails of the JPEGs that records name: where a record's JPEG is read from, and
how it is made small.

A file is read only from inside OUTPUT_DIR, through a descriptor of the directory held
once opened, one path component at a time with O_NOFOLLOW: a symbolic link or a FIFO
planted under a JPEG's name, or a record naming a file elsewhere, gives no thumbnail,
never another file. A JPEG is decoded at a reduced scale (libjpeg's DCT scaling: an
eighth of the pixels at a fraction of a full decode), then encoded small.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path, PurePath
from typing import Any

import simplejpeg

from returner.errors import ObjectStoreUnavailable
from returner.objectstore import ObjectStore

THUMB_PX = 240  # the longer side is at least this (about twice the size shown)
THUMB_QUALITY = 70
MAX_JPEG_BYTES = 64 * 1024 * 1024
# A frame of MAX_PIXELS still decodes to 100M / 64 pixels at the smallest scale: more
# than this is not worth a thumbnail (nor the memory).
MAX_DECODED_PIXELS = 4_000_000
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
# O_NONBLOCK: opening a FIFO planted under the name returns at once instead of waiting.
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


class LocalFiles:
    """The JPEGs in OUTPUT_DIR, as the service wrote them; safe to share between threads."""

    def __init__(self, directory: Path) -> None:
        self.root = directory.resolve()
        self._fd: int | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _root_fd(self) -> int:
        """A descriptor of OUTPUT_DIR, opened on first use (the service may create the
        directory after the console starts) and held from then on. Raises OSError."""
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.root, _DIRECTORY)
            return self._fd

    def relative(self, file_path: str) -> PurePath | None:
        """A record's absolute path as a path inside OUTPUT_DIR; None if it is not one."""
        try:
            inside = PurePath(file_path).relative_to(self.root)
        except ValueError:
            return None
        if not inside.parts or any(p in ("", ".", "..") for p in inside.parts):
            return None
        return inside

    def read(self, file_path: str) -> bytes | None:
        """The bytes of a regular file inside OUTPUT_DIR, reached without following any
        link; None if there is no such file."""
        inside = self.relative(file_path)
        if inside is None:
            return None
        opened: list[int] = []
        try:
            fd = self._root_fd()
            for part in inside.parts[:-1]:
                fd = os.open(part, _DIRECTORY, dir_fd=fd)
                opened.append(fd)
            fd = os.open(inside.parts[-1], _FILE, dir_fd=fd)
            opened.append(fd)
            return _read_regular(fd)
        except OSError:
            return None
        finally:
            for fd in opened:
                os.close(fd)


def _read_regular(fd: int) -> bytes | None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_JPEG_BYTES:
        return None
    chunks, left = [], info.st_size
    while left > 0 and (chunk := os.read(fd, left)):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def source_jpeg(
    record: dict[str, Any], files: LocalFiles, objects: ObjectStore | None = None
) -> bytes | None:
    """The JPEG of a completed record, wherever it was put: its file in OUTPUT_DIR, or
    its object in the object store (through its image_url); None if it cannot be read."""
    if record.get("status") != "completed":
        return None
    path, url = record.get("file_path"), record.get("image_url")
    if isinstance(path, str):
        return files.read(path)
    key = objects.config.key_of(url) if objects is not None and isinstance(url, str) else None
    if objects is None or key is None:
        return None
    try:
        return objects.get(key)
    except ObjectStoreUnavailable:
        return None


def shrink(jpeg: bytes, px: int = THUMB_PX) -> bytes | None:
    """A small JPEG of `jpeg`, its longer side at least `px` (and below twice that,
    unless an eighth, the smallest scale, is larger still); None if it is not a JPEG
    one can decode, or too large even at the smallest scale."""
    with contextlib.suppress(ValueError):
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
        wanted = {"min_height": px} if height >= width else {"min_width": px}
        small_h, small_w, _, _ = simplejpeg.decode_jpeg_header(jpeg, **wanted)
        if small_h * small_w > MAX_DECODED_PIXELS:
            return None
        pixels = simplejpeg.decode_jpeg(
            jpeg, colorspace="RGB", fastdct=True, fastupsample=True, **wanted
        )
        return bytes(simplejpeg.encode_jpeg(pixels, quality=THUMB_QUALITY, colorsubsampling="420"))
    return None
