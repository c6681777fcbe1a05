"""Files written so that a crash never leaves half of one: the project's one place for file I/O.

- :func:`atomic_file` / :func:`atomic_directory`: write under a temporary sibling name, fsync, rename.
- :func:`save_tensors` / :func:`load_tensors`: safetensors only; nothing is ever unpickled.
- :func:`read_json` / :func:`write_json`: JSON objects with an error that names the file.
- :func:`sha256_file`: the one file hash (memoised on path, size and mtime).
- :func:`check_output_folder` / :func:`mark_output_folder`: the one rule for output folders (a command
  writes only into an empty, absent or own folder; ``--force`` writes its own files and deletes nothing).
- :func:`lock_folder`: one writer per run folder (``fcntl.flock``, released by the OS on any exit).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from selfflow.errors import CheckpointError, ConfigError


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames) to disk; a no-op where the OS does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks; memoised on (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_MEMO[memo] = digest.hexdigest()
    return _SHA_MEMO[memo]


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a flat dict of tensors as safetensors (copies to CPU, breaks shared storage)."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    try:
        save_file(flat, str(path), metadata=metadata)
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
    except (SafetensorError, OSError) as exc:  # a full disk, a read-only folder
        reason = getattr(exc, "strerror", None) or str(exc)
        raise CheckpointError(f"could not write {path}: {reason}{free_space(Path(path).parent)}") from None


def free_space(folder: Path) -> str:
    """'; N MB free on its disk' for an error message ('' when the folder's disk cannot be asked)."""
    for place in (folder, *folder.parents):
        if place.exists():
            try:
                return f"; {shutil.disk_usage(place).free / 1e6:.1f} MB free on its disk"
            except OSError:
                return ""
    return ""


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: refusing to load a non-safetensors file (pickles can run code)")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); truncated or corrupt?") from None


def write_json(obj: Any, path: str | Path) -> None:
    path = Path(path)
    with open(path, "w") as handle:
        json.dump(obj, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())


def read_json(path: str | Path, error: type[Exception] = CheckpointError, missing: str = "missing checkpoint file") -> dict:
    """The JSON object in ``path``; anything else raises ``error`` naming the file.

    ``missing`` is the message for an absent file (the path is appended), so each caller can say
    what the file should have been; checkpoints, shard manifests and autoencoder folders share this.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{missing}: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc}); truncated or corrupt?") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def merge_directory(tmp: Path, target: Path) -> None:
    """Move every entry of the complete folder ``tmp`` into ``target`` (each file in one rename),
    replacing only same-named entries: files in ``target`` that ``tmp`` does not hold are kept."""
    fsync_dir(tmp)
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(tmp.iterdir()):
        destination = target / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if destination.is_dir() and not destination.is_symlink():
                merge_directory(entry, destination)
                continue
            if destination.exists() or destination.is_symlink():
                raise ConfigError(f"{destination}: a file is in the way of the folder {entry.name} this command writes")
        elif destination.is_dir() and not destination.is_symlink():
            raise ConfigError(f"{destination}: a folder is in the way of the file {entry.name} this command writes")
        os.replace(entry, destination)
    shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(target)


def replace_directory(tmp: Path, target: Path) -> None:
    """Move the complete folder ``tmp`` to ``target``, replacing any previous ``target``."""
    fsync_dir(tmp)
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_directory(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success its files move into ``target``.

    ``replace=False`` (default, any folder a user names): each file replaces its namesake in one
    rename and every other file in ``target`` is kept. ``replace=True`` (a folder wholly the
    command's own, e.g. ``checkpoints/step_N``): the folder replaces ``target`` in one rename.
    On any error the temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise CheckpointError(f"cannot write to {target.parent}: {exc.strerror or exc}") from None
    try:
        yield tmp
        (replace_directory if replace else merge_directory)(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = "the previous checkpoint is untouched" if replace else "the files already there are untouched"
        if isinstance(exc, OSError):
            raise CheckpointError(f"could not write {target}: {exc.strerror or exc}{free_space(target.parent)}; {kept}") from None
        if isinstance(exc, CheckpointError) and str(exc).startswith("could not write"):  # save_tensors's (names the file)
            raise CheckpointError(f"{exc}; {kept}") from None
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it is fsynced and renamed to ``path``.

    On any error the temporary file is removed, ``path`` is left as it was, and the error propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def cache_root() -> Path:
    """The default cache folder: $SELFFLOW_CACHE, else ~/.cache/selfflow."""
    return Path(os.environ.get("SELFFLOW_CACHE", Path.home() / ".cache" / "selfflow"))


# --------------------------------------------------------------------------------------------
# the output-folder rule and the run-folder lock
# --------------------------------------------------------------------------------------------
OUTPUT_MARKER = ".selfflow-output.json"  # {"purpose": ...}: what wrote the folder
LOCK_FILE = ".selfflow.lock"  # flock'ed while a process writes the folder; holds its pid
_OWN_ENTRIES = (OUTPUT_MARKER, LOCK_FILE)


def output_purpose(folder: str | Path) -> str | None:
    """The purpose recorded in ``folder``'s marker, or None (no marker, or an unreadable one)."""
    try:
        data = json.loads((Path(folder) / OUTPUT_MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data.get("purpose") if isinstance(data, dict) and isinstance(data.get("purpose"), str) else None


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_folder(folder: str | Path, purpose: str, *, force: bool = False, reads: tuple = (),
                        recognise: tuple[str, ...] = (), also: tuple[str, ...] = (), flag: str = "--out") -> bool:
    """Refuse (ConfigError, one line naming the folder and what is in it) to write into ``folder``
    unless it is absent, empty, or its marker names ``purpose`` (or one of ``also``); a folder
    without a marker that holds one of the ``recognise`` entries (written before markers existed)
    counts as own. ``force``: write anyway (the command replaces only its own files). A folder that
    is or holds one of ``reads`` (paths the command reads) is always refused. Writes nothing;
    returns whether the folder was absent or empty (the command then owns all of it)."""
    folder = Path(folder)
    resolved = folder.resolve()
    for read in reads:  # what is read lies in the folder written (a subfolder written inside a read one is fine)
        if read and _within(Path(read).resolve(), resolved):
            raise ConfigError(f"{flag} {folder}: the command reads {read} and would write into it; choose another {flag}")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder}: a file is in the way (a folder is written there)")
    if not folder.exists():
        return True
    entries = sorted(p.name for p in folder.iterdir() if p.name not in _OWN_ENTRIES)
    if not entries:
        return True
    own = output_purpose(folder)
    if own in (purpose, *also) or (own is None and any((folder / name).exists() for name in recognise)) or force:
        return False
    shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
    whose = f"written by `{own}`" if own else "not written by selfflow"
    hint = (", or pass --force to write this command's files there (nothing else is deleted)" if flag.startswith("--")
            else "")
    raise ConfigError(f"{flag} {folder}: holds {shown} ({whose}); choose an empty or new folder{hint}")


def check_output_file(path: str | Path, purpose: str, *, force: bool = False, flag: str = "--out") -> None:
    """A report file: absent, or a JSON object whose ``"written_by"`` is ``purpose``; else refused unless ``force``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: a folder is in the way (a file is written there)")
    if not path.exists() or force:
        return
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        data = None
    if not (isinstance(data, dict) and data.get("written_by") == purpose):
        raise ConfigError(f"{flag} {path}: the file exists and is not a `{purpose}` report; choose another {flag}, "
                          f"or pass --force to replace it")


def mark_output_folder(folder: str | Path, purpose: str) -> None:
    """Record ``purpose`` in ``folder``'s marker (no-op when the folder is absent or already marked so)."""
    folder = Path(folder)
    if folder.is_dir() and output_purpose(folder) != purpose:
        with atomic_file(folder / OUTPUT_MARKER) as tmp:
            tmp.write_text(json.dumps({"purpose": purpose}) + "\n")


_HELD_LOCKS: set[int] = set()  # descriptors of the folder locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a data worker), close the inherited lock descriptors.

    A flock belongs to the open file description, so a forked worker would otherwise keep the folder
    locked after its parent is killed; closing the child's copy leaves the parent's lock in place.
    """
    for fd in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


class FolderLock:
    """An exclusive ``fcntl.flock`` on ``folder/.selfflow.lock`` for the life of the holder.

    The OS drops the lock when the process ends in any way (kill -9 included), so a stale lock file
    never blocks; forked workers close their inherited copy, so they never outlive it with the lock.
    A second holder is refused with one line naming the first one's process id.
    """

    def __init__(self, folder: str | Path, what: str = "run folder") -> None:
        self.folder, self.what, self._fd = Path(folder), what, None

    def __enter__(self) -> "FolderLock":
        import fcntl

        self._created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"{self.folder}: cannot create the {self.what} ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"{self.folder}: the {self.what} is in use by process {other}; wait for it to finish "
                              f"or write elsewhere") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        _HELD_LOCKS.add(fd)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            _HELD_LOCKS.discard(self._fd)
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race a new holder)
            self._fd = None
            if self._created and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:  # nothing written: as before
                with contextlib.suppress(OSError):
                    (self.folder / LOCK_FILE).unlink()
                    self.folder.rmdir()


def lock_folder(folder: str | Path, what: str = "run folder") -> FolderLock:
    return FolderLock(folder, what)
