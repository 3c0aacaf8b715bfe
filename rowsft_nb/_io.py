"""Atomic file writes and checked reads: a reader never sees a half-written report, plan,
adapter or checkpoint, and a damaged file fails with one error naming the file and the problem.

Writes go to a hidden temporary sibling (``.<name>.<pid>-<hex>.tmp``), are fsynced, then
renamed over the target (atomic on POSIX and Windows). Folders (training checkpoints) are
built in a hidden staging folder and renamed into place by :func:`publish_dir`. A writer
holds an advisory lock (``flock``) on its temporary while it works; a process killed
mid-write leaves only its unlocked temporary, which no reader opens and the next write to
the same target deletes (without ``fcntl``: once older than a day). Safetensors files
written here carry a sha256 per tensor in their metadata (``rowsft_sha256``), checked on
read; files without it (older versions) still load.

Usage::

    with atomic_path("plan.json") as tmp:
        tmp.write_text(text)
    write_safetensors("x.safetensors", {"w": w}, {"format": "mine"})
    tensors, meta = read_safetensors("x.safetensors")      # FileFormatError if damaged
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["FileFormatError", "atomic_path", "staging_dir", "publish_dir", "write_json",
           "read_json", "read_json_object", "write_safetensors", "read_safetensors", "read_safetensors_metadata",
           "verify_checksums", "tensor_sha256", "fsync_dir"]

CHECKSUM_KEY = "rowsft_sha256"


class FileFormatError(ValueError):
    """A saved file is missing pieces, truncated or garbled; the message names the file."""


def _lock(fd: int) -> bool:
    """Take an exclusive, non-blocking lock on an open file; False if another process holds
    it. The OS drops the lock when its holder dies, however it dies (SIGKILL included)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; staleness falls back to age
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _clean_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.<pid>-<hex>.tmp`` siblings of ``path`` left by writers that died:
    a live writer holds a lock on its temporary file (without ``fcntl``: older than a day)."""
    pattern = re.compile(r"^\." + re.escape(path.name) + r"\.\d+-[0-9a-f]+\.tmp$")
    try:
        entries = [e for e in path.parent.iterdir() if pattern.match(e.name)]
    except OSError:
        return
    for entry in entries:
        try:
            fd = os.open(entry, os.O_RDONLY)
        except OSError:
            continue
        try:
            if os.name == "posix":
                stale = _lock(fd)
            else:
                stale = time.time() - os.fstat(fd).st_mtime > 86400
            if stale:
                with contextlib.suppress(OSError):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
        finally:
            os.close(fd)


def _temporary_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a directory entry (a rename) to disk; a no-op where unsupported (Windows)."""
    if os.name != "posix":
        return
    fd = os.open(str(directory), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; fsync it and rename it over ``path`` on
    success, delete it on failure.

    >>> with atomic_path("out.json") as tmp: tmp.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temporaries(path)
    tmp_path = _temporary_name(path)
    fd = os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    if os.name == "posix":
        _lock(fd)  # held until we are done: marks the temporary as in use (see above)
    else:  # Windows cannot rename a file that is open
        os.close(fd)
        fd = None
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # the writer may have replaced the inode
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if fd is not None:
            os.close(fd)
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def staging_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty hidden folder next to ``path`` (``.<name>.<pid>-<hex>.tmp``),
    locked while in use and deleted on exit; move a finished result into place with
    :func:`publish_dir`. Staging folders of processes that died are deleted first.

    >>> with staging_dir("out/checkpoint-3") as tmp: ...; publish_dir(tmp / "x", "out/x")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temporaries(path)
    tmp = _temporary_name(path)
    tmp.mkdir()
    fd = os.open(tmp, os.O_RDONLY) if os.name == "posix" else None  # folders: POSIX only
    try:
        if fd is not None:
            _lock(fd)
        yield tmp
    finally:
        if fd is not None:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """fsync every file under the finished folder ``src``, then rename it to ``dst`` (one
    atomic step; an existing ``dst`` is renamed aside first and deleted after)."""
    src, dst = Path(src), Path(dst)
    for root, _, files in os.walk(src):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(root)
    aside = None
    if dst.exists():
        aside = _temporary_name(dst)
        os.replace(dst, aside)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically. Usage: ``write_json("a.json", {"x": 1})``"""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; ``FileFormatError`` naming the file when it is truncated/garbled.
    Usage: ``read_json("plan.json")``"""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path} is not UTF-8 text (byte {e.start}): the file is "
                              "garbled; re-create it") from None
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, "
                              f"column {e.colno}): the file is truncated or garbled; "
                              "re-create it") from None


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`read_json` that also requires a JSON object (``{...}``) at the top level."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise FileFormatError(f"{path} holds a JSON {_json_type(obj)}, expected an object "
                              "({...}): not a file written by rowsft_nb")
    return obj


def _json_type(obj: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null", dict: "object"}.get(type(obj), type(obj).__name__)


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 (hex) of a CPU tensor's raw bytes in C order."""
    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, Any] | None = None) -> None:
    """Save tensors (contiguous, on CPU) plus JSON metadata under the key ``rowsft`` and a
    sha256 per tensor under ``rowsft_sha256``, atomically.
    Usage: ``write_safetensors("x.safetensors", {"w": w}, {"format": "mine"})``"""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    sums = {k: tensor_sha256(v) for k, v in tensors.items()}
    meta = {"rowsft": json.dumps(metadata or {}),
            CHECKSUM_KEY: json.dumps(sums)}
    # serialize in memory and write through atomic_path: safetensors' own save_file renames a
    # `.tmpXXXXXX` file of its own into place, which a killed process would leave behind
    data = save(tensors, metadata=meta)
    with atomic_path(path) as tmp:
        with open(tmp, "r+b") as fh:
            fh.write(data)


def _unreadable(path: Path, err: Exception) -> FileFormatError:
    return FileFormatError(f"{path} is not a readable safetensors file ({err}): the file is "
                           "truncated or garbled; re-save it")


def read_safetensors_metadata(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """``(rowsft metadata, {tensor: sha256})`` from the header only (no tensor data read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(path, e) from None
    try:
        meta = json.loads(raw.get("rowsft", "{}"))
        sums = json.loads(raw.get(CHECKSUM_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}: the metadata in its header is not valid JSON "
                              f"({e.msg}); the file is garbled; re-save it") from None
    if not isinstance(meta, dict) or not isinstance(sums, dict):
        raise FileFormatError(f"{path}: the metadata in its header is not a JSON object; "
                              "not a file written by rowsft_nb")
    return meta, sums


def verify_checksums(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     sums: dict[str, str]) -> None:
    """Raise ``FileFormatError`` naming the first tensor whose bytes do not match ``sums``
    (files without checksums, written by older versions, pass)."""
    for key, expected in sums.items():
        if key not in tensors:
            raise FileFormatError(f"{path}: tensor {key!r} listed in the checksums is missing; "
                                  "the file is incomplete; re-save it")
        if tensor_sha256(tensors[key]) != expected:
            raise FileFormatError(f"{path}: tensor {key!r} fails its sha256 check: its bytes "
                                  "were changed after saving (disk or copy corruption); "
                                  "re-save it or restore a good copy")


def read_safetensors(path: str | os.PathLike, *, verify: bool = True
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`write_safetensors`: ``(tensors, metadata)``. ``FileFormatError``
    naming the file when it is truncated, garbled or (``verify``) fails its checksums.
    Usage: ``tensors, meta = read_safetensors("x.safetensors")``"""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta, sums = read_safetensors_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(path, e) from None
    if verify:
        verify_checksums(path, tensors, sums)
    return tensors, meta
