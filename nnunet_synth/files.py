"""Files that are complete or absent: process-tagged temporaries and the removal of those a dead process left,
one creator per shared file, reports replaced as a whole, and truncation checks of the image files users give.

This module imports nothing of the project, so every layer can use it.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import socket
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from filelock import FileLock

# ``<anything>.pid<PID>@<HOST>``: the process that owns a temporary file or folder (hosts: parts of a bank may run
# on several machines sharing one file system, and a process id means nothing on another host)
_TAG = re.compile(r"\.pid(?P<pid>\d+)@(?P<host>[^/]+)$")
_NIFTI_GZIP_MAGIC = b"\x1f\x8b"


def process_tag() -> str:
    """``.pid<PID>@<HOST>``: appended to a temporary name, it makes the name per process and lets a later run
    tell whether its owner is still alive (see :func:`remove_stale`)."""
    return f".pid{os.getpid()}@{socket.gethostname()}"


def owner_alive(name: str) -> bool:
    """Whether the process whose :func:`process_tag` ends ``name`` may still be running (True for another host's
    processes and for names without a tag: only this host's dead processes are known dead)."""
    match = _TAG.search(name)
    if match is None or match["host"] != socket.gethostname():
        return True
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale(folder: Path, pattern: str = "*") -> list[Path]:
    """Removes the entries of ``folder`` matching ``pattern`` whose tagged owner process is dead (a killed run's
    leftovers); returns them."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(pattern):
        if _TAG.search(path.name) and not owner_alive(path.name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def creation_lock(path: Path) -> FileLock:
    """An inter-process lock for creating or updating ``path`` (lock file ``.<name>.lock`` beside it).

    Processes that start together (nnU-Net folds, DDP ranks, bank parts) take it in turn: the first creates the
    file, the others find it made. The lock is re-entrant within a process, so a function holding it may call
    another that takes it too.
    """
    path = Path(path)
    return FileLock(str(path.with_name(f".{path.name}.lock")), is_singleton=True)


def replace_report(staged: Path, output: Path, files: Sequence[str], marker: str, old_files: Sequence[str] = ()
                   ) -> None:
    """Moves a report's finished files from ``staged`` into ``output``, replacing an older report as a whole.

    The old report's ``marker`` file (its summary, written last, listing its files under ``report_files``) goes
    first, then every file it listed, then the new files with the new marker last: a run that dies on the way
    leaves no marker beside files of two reports, never an old summary beside new figures.

    Args:
        staged: folder holding the new report's ``files`` (removed afterwards).
        output: the report folder (created if missing).
        files: names of the new report's files, ``marker`` among them.
        marker: the summary file name.
        old_files: names an older report may hold besides those its marker lists (removed with them).
    """
    output.mkdir(parents=True, exist_ok=True)
    old = output / marker
    names = list(old_files)
    if old.is_file():
        try:
            listed = json.loads(old.read_text(encoding="utf-8")).get("report_files", {})
        except (OSError, ValueError):
            listed = {}
        names += [v for v in listed.values() if isinstance(v, str)]
        names += [n for v in listed.values() if isinstance(v, list) for n in v if isinstance(n, str)]
        old.unlink()
    for name in names:
        if Path(name).name == name and name != marker:  # a bare file name of this folder, nothing else
            (output / name).unlink(missing_ok=True)
    for name in sorted(files, key=lambda n: n == marker):
        os.replace(staged / name, output / name)
    shutil.rmtree(staged, ignore_errors=True)


def nifti_truncation(path: Path) -> str | None:
    """What is missing from a NIfTI file (``.nii``, ``.nii.gz``) shorter than its header says, else None.

    SimpleITK (and with it nnU-Net's reader) fills a truncated NIfTI with zeros and raises nothing; this check
    decompresses the whole file (a gzip stream that ends early is truncated) and compares the bytes with the
    header's voxel offset, dimensions and bits per voxel. Other files return None: their readers raise.
    """
    path = Path(path)
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return None
    with open(path, "rb") as f:
        compressed = f.read(2) == _NIFTI_GZIP_MAGIC
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            header = f.read(540)
            expected = _nifti_size(header)
            if expected is None:
                return f"the file ends inside its NIfTI header ({len(header)} bytes)"
            size = len(header)
            while chunk := f.read(1 << 22):
                size += len(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        return f"its gzip stream ends early ({err})"
    if size < expected:
        return f"it holds {size} of the {expected} bytes its header describes"
    return None


def _nifti_size(header: bytes) -> int | None:
    """Voxel offset plus voxel bytes of a NIfTI-1 or NIfTI-2 header, None for an incomplete header."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(f"{endian}i", header[:4])[0] == 348:
            dims = struct.unpack(f"{endian}8h", header[40:56])
            bitpix = struct.unpack(f"{endian}h", header[72:74])[0]
            offset = int(struct.unpack(f"{endian}f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(f"{endian}i", header[:4])[0] == 540:
            bitpix = struct.unpack(f"{endian}h", header[14:16])[0]
            dims = struct.unpack(f"{endian}8q", header[16:80])
            offset = struct.unpack(f"{endian}q", header[168:176])[0]
            break
    else:
        return None
    voxels = 1
    for d in dims[1:1 + max(0, min(int(dims[0]), 7))]:
        voxels *= max(int(d), 1)
    return max(offset, 348) + voxels * bitpix // 8
