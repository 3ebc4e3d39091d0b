"""Write outputs under a temporary name and rename them into place, so nothing is ever half-written."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import SurgeryError

__all__ = ["atomic_dir", "atomic_file", "check_writable", "output_errors", "remove_stale_temps",
           "staging_dir", "temp_prefix"]



def check_writable(path: str | os.PathLike, force: bool) -> Path:
    """Refuse an output that exists (unless ``force``) or cannot be written, before any work starts.

    Args:
        path: the output file or folder.
        force: whether an existing output may be replaced.

    Returns:
        ``path`` as a Path; nothing is created.
    """
    given, path = os.fspath(path), Path(path)
    if path.name in ("", ".", "..") or path.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise SurgeryError(f"--out {given!r} is the current folder or one above it; name a new folder to write")
    if path.exists() and not force:
        raise SurgeryError(f"{path} already exists; pass --force (force=True) to overwrite it")
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise SurgeryError(f"{path} is a device or other special file, which --force never replaces; choose another --out")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise SurgeryError(f"cannot write {path}: {folder} is a file, not a folder; choose another --out")
    with output_errors(path):
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    return path


@contextlib.contextmanager
def output_errors(path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into one line naming the output, not a temporary name.

    Args:
        path: the output being written.

    Returns:
        A context manager.
    """
    try:
        yield
    except OSError as e:
        raise SurgeryError(f"cannot write {path}: {e.strerror or e}; choose another --out") from None


def temp_prefix(path: Path) -> str:
    """Temporary names beside ``path`` carry this process's id, so a later run can tell stale ones.

    Args:
        path: the output.

    Returns:
        The prefix of its temporary names.
    """
    return f".{path.name}.{os.getpid()}."


@contextlib.contextmanager
def staging_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a private work folder beside ``path``, removed on exit; named so that a later writer of ``path``
    removes it if this process is killed.

    Args:
        path: the output the staged files are for; its parent folder is created if missing.

    Returns:
        A context manager yielding the empty work folder.
    """
    path = Path(path)
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".export", dir=path.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def remove_stale_temps(path: Path) -> None:
    """Remove temporary files and folders of ``path`` whose writer process no longer runs (killed runs).

    Args:
        path: the output whose temporary names to look for beside it.
    """
    # .NAME.<pid>.<8 random characters>.tmp|.export: tempfile's names with the writer's process id
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.[a-z0-9_]{8}\.(?:tmp|export)")
    for candidate in path.parent.iterdir():
        match = pattern.fullmatch(candidate.name)
        if not match or not _stale(candidate, match.group(1)):
            continue
        shutil.rmtree(candidate, ignore_errors=True) if candidate.is_dir() else candidate.unlink(missing_ok=True)


def _stale(candidate: Path, pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, FileNotFoundError) as e:
        return isinstance(e, ProcessLookupError)  # a dead writer's; or already gone
    except (PermissionError, OverflowError):
        return False  # alive under another user, or not a process id
    return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool) -> None:
    """Give a temporary file or folder the permissions a plain open()/mkdir() would have (mkstemp, mkdtemp
    and some writers, like safetensors, make them private to the owner)."""
    path.chmod((0o777 if directory else 0o666) & ~_umask())


def _publish_tree(root: Path) -> None:
    _publish_mode(root, directory=True)
    for p in root.rglob("*"):
        if not p.is_symlink():
            _publish_mode(p, directory=p.is_dir())


def _appeared(path: Path) -> SurgeryError:
    return SurgeryError(f"{path} appeared while this ran (another writer?) and was kept; "
                        "pass --force (force=True) to replace it, or choose another --out")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, on error it is removed.

    Without ``force`` an output that appeared meanwhile (another writer) is never replaced.

    Args:
        path: the output folder.
        force: whether an existing folder may be replaced.

    Returns:
        A context manager yielding the temporary folder.
    """
    path = check_writable(path, force)
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        with output_errors(path):
            _publish_tree(tmp)
            _replace_dir(tmp, path, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, path: Path, force: bool) -> None:
    if not force:
        # rename() refuses a non-empty folder or a file in the way; check first for an empty folder.
        if path.exists() or path.is_symlink():
            raise _appeared(path)
        try:
            tmp.rename(path)
        except OSError:
            if path.exists():
                raise _appeared(path) from None
            raise
        return
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)) / "old"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old.parent, ignore_errors=True)
    else:
        tmp.rename(path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; on success it is renamed onto ``path``.

    Without ``force`` a file that appeared meanwhile (another writer) is never replaced.

    Args:
        path: the output file.
        force: whether an existing file may be replaced.

    Returns:
        A context manager yielding the temporary file name.
    """
    path = check_writable(path, force)
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with output_errors(path):
            _publish_mode(tmp, directory=False)
            if force:
                os.replace(tmp, path)
            else:
                _link_new(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _link_new(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path`` only if nothing is there: link() fails atomically on an existing name."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _appeared(path) from None
    except OSError:
        # A file system without hard links: check, then rename (a narrow window remains).
        if path.exists():
            raise _appeared(path) from None
        os.replace(tmp, path)
        return
    tmp.unlink()
