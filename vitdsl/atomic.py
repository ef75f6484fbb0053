"""Write files and directories so that a failure leaves nothing half-written."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_modes(root: str) -> None:
    """mkdtemp/mkstemp create private 0700/0600 entries; give them ordinary modes."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def writable_parent(path: str, what: str = "output") -> str:
    """The nearest existing directory above `path`, where its files (and any missing
    directories) will be created; a SpecError unless it is a writable directory."""
    from .errors import SpecError

    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise SpecError(f"{what} {path} is not writable: {probe} is not a directory", filename=path)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SpecError(f"{what} {path} is not writable: permission denied on {probe}", filename=path)
    return probe


def probe_write(directory: str) -> None:
    """Create and remove a file in `directory`: the only sure test that files can be
    written there (permissions, read-only mounts, /proc); raises the OSError if not."""
    fd, tmp = tempfile.mkstemp(prefix=".vitdsl-probe-", dir=directory)
    os.close(fd)
    os.unlink(tmp)


def _as_given(e: OSError, staged: str, given: str) -> OSError:
    """`e` naming the path the user gave instead of the temporary one vitdsl wrote first
    (removed on error, so naming it would point the user at nothing)."""
    name = e.filename
    if isinstance(name, str) and (name == staged or name.startswith(staged + os.sep)):
        return OSError(e.errno, e.strerror, given + name[len(staged):])
    return e


def write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file in the same directory + rename."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory + rename;
    an OSError names `path`, never the temporary file."""
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(21, "Is a directory", path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".vitdsl-", suffix=".tmp", dir=d)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _as_given(e, tmp, path) from None
        raise


MARKERS = ("manifest.json", "report.json")  # files that identify a directory vitdsl wrote


def check_replaceable(out: str) -> None:
    """Refuse an output directory that holds files vitdsl did not write: it is replaced whole."""
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not any(
            os.path.exists(os.path.join(out, m)) for m in MARKERS):
        from .errors import SpecError

        raise SpecError(f"{out} exists and is not a vitdsl output directory; choose another -o "
                        "(vitdsl replaces only its own output directories)", filename=out)


@contextlib.contextmanager
def staged_dir(out: str) -> Iterator[str]:
    """Yield a temporary directory beside `out`; on success it replaces `out` whole,
    on any error it is removed and `out` is left as it was."""
    given, out = out, os.path.abspath(out)
    check_replaceable(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".partial", dir=parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, given) from None
    try:
        yield tmp
        _normal_modes(tmp)
        if os.path.isdir(out):
            old = tmp + ".old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        elif os.path.exists(out):
            raise FileExistsError(f"{out} exists and is not a directory")
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _as_given(e, tmp, given) from None
        raise
