"""Thumbnails against real files: only regular files inside OUTPUT_DIR are read, never
through a symbolic link, a FIFO or a path outside it; a JPEG is made small at a reduced
scale; what is not a JPEG, or too large to decode, gives none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import simplejpeg

from returner.console import thumbs
from returner.console.thumbs import LocalFiles, shrink, source_jpeg
from tests.conftest import random_frame


def jpeg(height: int, width: int, seed: int = 0) -> bytes:
    return bytes(simplejpeg.encode_jpeg(random_frame((height, width, 3), seed=seed), 80))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    directory = tmp_path / "out"
    (directory / "2026-12-03").mkdir(parents=True)
    (directory / "page_1.jpg").write_bytes(jpeg(64, 48))
    (directory / "2026-12-03" / "page_2.jpg").write_bytes(jpeg(64, 48, 1))
    return directory


@pytest.fixture
def files(out: Path) -> LocalFiles:
    made = LocalFiles(out)
    yield made  # type: ignore[misc]
    made.close()


def test_a_file_inside_output_dir_is_read_flat_or_daily(out: Path, files: LocalFiles) -> None:
    assert files.read(str(out / "page_1.jpg")) == (out / "page_1.jpg").read_bytes()
    daily = out / "2026-12-03" / "page_2.jpg"
    assert files.read(str(daily)) == daily.read_bytes()
    assert files.read(str(out / "missing.jpg")) is None


def test_nothing_outside_output_dir_is_read(tmp_path: Path, out: Path, files: LocalFiles
                                            ) -> None:
    (tmp_path / "secret.jpg").write_bytes(b"not yours")
    for path in (tmp_path / "secret.jpg", out / ".." / "secret.jpg", Path("/etc/passwd"),
                 out, out / "2026-12-03" / ".." / ".." / "secret.jpg"):
        assert files.read(str(path)) is None, path


def test_links_fifos_and_directories_under_a_jpegs_name_are_refused(
    tmp_path: Path, out: Path, files: LocalFiles
) -> None:
    (tmp_path / "secret.jpg").write_bytes(b"not yours")
    os.symlink(tmp_path / "secret.jpg", out / "link.jpg")
    os.symlink(tmp_path, out / "2026-12-04")  # a day directory that is a link
    os.mkfifo(out / "fifo.jpg")  # opened without O_NONBLOCK, this would wait for ever
    (out / "dir.jpg").mkdir()
    for name in ("link.jpg", "2026-12-04/secret.jpg", "fifo.jpg", "dir.jpg"):
        assert files.read(str(out / name)) is None, name


def test_output_dir_is_held_once_opened(tmp_path: Path, out: Path, files: LocalFiles) -> None:
    assert files.read(str(out / "page_1.jpg")) is not None
    # Swapped for another directory (or a link to one): what is read stays the first's.
    os.rename(out, tmp_path / "moved")
    (out / "2026-12-03").mkdir(parents=True)
    (out / "page_1.jpg").write_bytes(b"planted")
    assert files.read(str(out / "page_1.jpg")) == (tmp_path / "moved" / "page_1.jpg").read_bytes()


def test_only_a_completed_records_file_is_a_source(out: Path, files: LocalFiles) -> None:
    path = str(out / "page_1.jpg")
    assert source_jpeg({"status": "completed", "file_path": path}, files) is not None
    assert source_jpeg({"status": "failed", "file_path": path}, files) is None
    assert source_jpeg({"status": "completed", "file_path": None}, files) is None


@pytest.mark.parametrize(("height", "width"), [(1448, 1024), (1024, 1448), (300, 200),
                                               (100, 60), (4000, 40)])
def test_shrink_decodes_at_a_reduced_scale(height: int, width: int) -> None:
    small = shrink(jpeg(height, width))
    assert small is not None
    h, w, _, _ = simplejpeg.decode_jpeg_header(small)
    longer, px = max(h, w), thumbs.THUMB_PX
    assert longer >= min(px, max(height, width))
    assert longer < 2 * px or longer == -(-max(height, width) // 8)  # 1/8: the smallest
    assert (h >= w) == (height >= width)


def test_shrink_refuses_what_is_not_a_jpeg_or_too_large(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    assert shrink(b"\xff\xd8 not really a JPEG") is None
    assert shrink(b"") is None
    monkeypatch.setattr(thumbs, "MAX_DECODED_PIXELS", 100)
    assert shrink(jpeg(200, 200)) is None
