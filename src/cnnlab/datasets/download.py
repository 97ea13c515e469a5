"""Downloading one file safely: progress bar, md5 check, atomic write.

The body goes to a hidden temporary file in the destination folder, is
fsynced, checked against the expected length and md5, then renamed over the
destination with os.replace. On any failure, Ctrl-C included, the temporary
file is removed, so a partial file is never left behind. A download killed
outright (kill -9, power loss) leaves its `.cnnlab-tmp-...part` file; the next
download into that folder removes it (see `cnnlab.atomic`) and starts afresh.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from ..atomic import atomic_writer
from .base import DatasetError

TIMEOUT = 30.0  # seconds without data before giving up
CHUNK = 1 << 20


class DownloadError(DatasetError):
    """One file could not be downloaded; the message is the reason."""


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def progress_bar(total, desc: str, enabled: bool, unit: str = "B"):
    """A tqdm counter on stderr (bytes unless unit says otherwise), or a silent stand-in."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    scale = dict(unit_scale=True, unit_divisor=1024) if unit == "B" else {}
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, **scale)


def md5_of(path, chunk: int = CHUNK) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fetch(url, f, h, name, progress, timeout):
    """Stream url into the open file f, updating the hash h; DownloadError on failure."""
    got, total = 0, None
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "cnnlab"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length", "")
            total = int(length) if length.strip().isdigit() else None
            bar = progress_bar(total, name, progress)
            try:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            finally:
                bar.close()
    except urllib.error.HTTPError as e:
        raise DownloadError(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"cannot connect: {e.reason}") from None
    except (http.client.HTTPException, OSError) as e:  # cut connection, timeout, reset
        raise DownloadError(f"connection failed after {got} bytes: {e or type(e).__name__}") from None
    if total is not None and got != total:
        raise DownloadError(f"connection closed after {got} of {total} bytes")


def download_file(url: str, dest, md5: str | None = None, progress: bool = True,
                  timeout: float = TIMEOUT) -> Path:
    """Fetch url into dest (atomically); raise DownloadError with the reason on failure."""
    dest = Path(dest)
    h = hashlib.md5(usedforsecurity=False)
    try:
        with atomic_writer(dest, suffix=".part") as f:  # a failure leaves no partial file
            _fetch(url, f, h, dest.name, progress, timeout)
            if md5 and h.hexdigest() != md5.lower():
                raise DownloadError(f"checksum mismatch: got md5 {h.hexdigest()}, "
                                    f"expected {md5}")
    except OSError as e:
        raise DownloadError(f"cannot write to {dest.parent}: {e.strerror or e}") from None
    _fsync_dir(dest.parent)
    return dest
