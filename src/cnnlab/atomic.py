"""Atomic file writes: a reader sees the old file or the new one, never a part.

The temporary file lives beside the target and is named

    .cnnlab-tmp-<host>-<pid>-<random>-<target name><suffix>

(<host>: 8 hex digits of a hash of the host name; the decoded-dataset cache
names its temporary folders the same way). A process killed while writing
(kill -9, power loss) leaves that file behind; the next write into the same
folder removes such leftovers: ours by name only, and only when stale,
that is when the process that wrote it is gone (same host, pid not running)
or when it has not been modified for STALE_AFTER seconds (another host, or a
pid reused since). Other files are never touched.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".cnnlab-tmp-"
STALE_AFTER = 3600.0  # seconds without modification after which any of our temp files is stale
_TEMP_RE = re.compile(r"^\.cnnlab-tmp-([0-9a-f]{8})-(\d+)-[^-]+-.+$")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _pid_running(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there; rely on age only
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0  # exists but belongs to someone else (or is absurd: keep the file)
    except OSError:
        return True
    return True


def temp_prefix() -> str:
    """The start of this process's temporary names: .cnnlab-tmp-<host>-<pid>-"""
    return f"{TEMP_PREFIX}{_host_tag()}-{os.getpid()}-"


def clean_stale_temp_files(folder, now: float | None = None) -> list:
    """Remove our stale temporary files in `folder` (see the module docstring).

    Returns the paths removed. Never raises: cleaning is best effort.
    """
    removed = []
    now = time.time() if now is None else now
    host = _host_tag()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP_RE.match(e.name)
        if m is None:
            continue
        try:
            st = e.stat(follow_symlinks=False)
            is_dir = e.is_dir(follow_symlinks=False)
            if not (is_dir or e.is_file(follow_symlinks=False)):
                continue
            old = now - st.st_mtime > STALE_AFTER
            dead = m.group(1) == host and int(m.group(2)) != os.getpid() \
                and not _pid_running(int(m.group(2)))
            if old or dead:
                if is_dir:
                    shutil.rmtree(e.path)
                else:
                    os.unlink(e.path)
                removed.append(Path(e.path))
        except (OSError, ValueError):
            continue
    return removed


@contextmanager
def atomic_writer(path, suffix: str = ".tmp"):
    """Yield a binary file beside `path`; when the block ends without error it is
    flushed, fsynced and renamed over `path`. On any error (Ctrl-C included, even
    one arriving while the temporary file is being created) the temporary file is
    removed and `path` is left as it was. Stale temporary files left in the folder
    by killed writers are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(path.parent)
    tmp = None
    fd = -1
    try:
        # name the file before creating it, so an interrupt at any point knows what to remove
        tmp = str(path.parent / f"{temp_prefix()}{secrets.token_hex(4)}-{path.name}{suffix}")
        # 0o666: the umask applies, so the file gets the permissions any new file would
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            fd = -1  # owned by f now
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        if tmp is not None and not isinstance(e, FileExistsError):  # not ours then
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
