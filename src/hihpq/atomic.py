"""Atomic file writes that destroy nothing but our own files.

A write goes to a recognisable temporary file beside the target (``.<name>.hihpq-tmp-<pid>.<random>``), is fsynced
and renamed over it. The target is checked first: never a device, FIFO, socket or folder, and an existing regular
file only when it is of the kind being written (or with ``force``). Temporary files left by a killed writer are
removed by the next write to the same target. Files get the permissions of the umask. No torch here: the index
package writes through this module too.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path


class TargetRefused(ValueError):
    """A write would destroy something that is not ours: a device, FIFO or folder, or a file of another kind."""


_TMP_TAG = ".hihpq-tmp-"


def temp_name(path: Path, pid: int | None = None) -> str:
    """The name of a temporary file beside ``path``: recognisable, and carrying its writer's pid, so that the next
    write to the same target removes those left by a killed writer (:func:`remove_stale_temps`)."""
    return f".{path.name}{_TMP_TAG}{os.getpid() if pid is None else pid}.{os.urandom(4).hex()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's live process (or an absurd pid): leave the file alone
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files of ``path`` whose writer process is gone; returns them."""
    prefix = f".{path.name}{_TMP_TAG}"
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def check_target(
    path: str | Path, *, looks_like: Callable[[Path], bool] | None = None, what: str = "file", force: bool = False
) -> None:
    """Refuse a write target that exists and is not a regular file (device, FIFO, folder, socket), or, unless
    ``force``, a regular file for which ``looks_like(path)`` is False (a file of another kind)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TargetRefused(f"cannot write {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise TargetRefused(f"{path} is a folder; give a file name to write the {what} to")
    if not stat.S_ISREG(st.st_mode):
        raise TargetRefused(f"{path} is {kind_of(st.st_mode)}, not a regular file; refusing to replace it")
    if looks_like is not None and not force and st.st_size and not looks_like(path):
        raise TargetRefused(f"{path} exists and is not a {what}; refusing to overwrite it (pass --force to replace it)")


def check_output(
    path: str | Path,
    *,
    looks_like: Callable[[Path], bool] | None = None,
    what: str = "file",
    force: bool = False,
    make_parents: bool = False,
) -> None:
    """Everything :func:`atomic_path` will check, for a command to call before its work starts: the folder exists
    (or can be made, with ``make_parents``) and the target may be written (:func:`check_target`)."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        if parent.exists():
            raise TargetRefused(f"{parent} is not a folder (writing {path})")
        if not make_parents:
            raise FileNotFoundError(f"folder {parent} does not exist (writing {path}); create it first")
    check_target(path, looks_like=looks_like, what=what, force=force)


def kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError:
        return False


def is_torch_file(path: Path) -> bool:
    """A file written by torch.save (a zip archive holding data.pkl)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("data.pkl") for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def is_npz_file(path: Path) -> bool:
    return _starts_with(path, b"PK\x03\x04")


def is_json_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(64).lstrip()
    except OSError:
        return False
    return head[:1] in (b"{", b"[")


#: What an existing file must look like to be overwritten, by suffix (the ``looks_like="auto"`` of atomic_path).
KINDS: dict[str, tuple[Callable[[Path], bool], str]] = {
    ".pt": (is_torch_file, "PyTorch file"),
    ".pth": (is_torch_file, "PyTorch file"),
    ".json": (is_json_file, "JSON file"),
    ".npz": (is_npz_file, "NumPy .npz file"),
}


@contextlib.contextmanager
def atomic_path(
    path: str | Path,
    *,
    looks_like: Callable[[Path], bool] | str | None = "auto",
    what: str = "file",
    force: bool = False,
    make_parents: bool = True,
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``.

    A crash or an exception mid-write leaves the previous file untouched and no partial file behind (a kill -9
    leaves a ``.<name>.hihpq-tmp-<pid>.*`` file that the next write to ``path`` removes). The target is checked
    first (:func:`check_target`): never a device, FIFO or folder, and a regular file only when ``looks_like`` it
    (or ``force``); "auto" picks the check from the suffix (:data:`KINDS`: .pt, .json, .npz; none for others).
    The file gets the umask's permissions. ``make_parents=False``: a missing folder is an error.
    """
    path = Path(path)
    if looks_like == "auto":
        looks_like, what = KINDS.get(path.suffix.lower(), (None, what))
    check_output(path, looks_like=looks_like, what=what, force=force, make_parents=make_parents)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp_path = path.parent / temp_name(path)
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 & ~umask, unlike mkstemp
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        check_target(path, looks_like=looks_like, what=what, force=force)  # it may have appeared meanwhile
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # make the rename itself durable; not possible on every filesystem
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
