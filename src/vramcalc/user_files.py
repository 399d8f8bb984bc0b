"""The user's files: read one as text, write one without harming what is there.

Every file vramcalc writes goes through `replacing` (`calibrate fit --out`, `sweep --plot`,
the calibration run files, `calibrate multi`'s folder), and every file a user names as input
(`-m`, `--from-config`, `--matrix`, `VRAMCALC_CORRECTIONS`) through `read_text`. The rules:

- Only a regular file or a new path is written. A directory, character or block device,
  FIFO or socket is refused with one line (`OutputFileError`), and so is a symbolic link to
  one of them.
- A symbolic link to a regular file is written through: its target is replaced and the
  link stays a link. A link to nothing (dangling) is refused.
- Permissions are respected. A file the user cannot write (`os.access`, then an actual
  `open` for writing that changes nothing), a file with no write bit at all (root included:
  someone made it read-only on purpose), or a folder the user cannot create files in is an
  error, never a replacement.
- The bytes go to a temporary file in the target's folder (flushed, fsynced), renamed over
  the target by `os.replace`: an interrupted write leaves the old file whole, and the temporary
  file is removed.
- A replaced file keeps its mode (and, written by root, its owner); a new file gets
  0o666 minus the umask (`tempfile.mkstemp` makes 0600: fixed before the rename).

Reading: only a regular file is read (a FIFO would block, a device never ends); a file that
is not UTF-8 text, or that cannot be opened, is one line of the caller's error class.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vramcalc.errors import OutputFileError, VramcalcError

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def kind_of(mode: int) -> str:
    """'a folder', 'a character device', ... for a `st_mode` that is not a regular file."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _reason(err: OSError) -> str:
    """The OS's own words for `err` (`Permission denied`), without the path it repeats."""
    return err.strerror or str(err)


def umask() -> int:
    """The process umask (os has no getter: set and restore it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target(path: Path, what: str) -> tuple[Path, os.stat_result | None]:
    """(the file a write to `path` replaces or creates, its stat or None when new)."""
    label = f"{what} {path}"
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        link = None
    except NotADirectoryError:
        raise OutputFileError(f"{label}: {_first_non_folder(path)} is not a folder") from None
    except OSError as err:
        raise OutputFileError(f"{label}: cannot reach it: {_reason(err)}") from None
    real = Path(os.path.realpath(path))
    try:
        st: os.stat_result | None = os.stat(real)
    except FileNotFoundError:
        st = None
    except OSError as err:
        raise OutputFileError(f"{label}: cannot reach it: {_reason(err)}") from None
    if link is not None and stat.S_ISLNK(link.st_mode) and st is None:
        raise OutputFileError(f"{label}: a symbolic link to {real}, which does not exist; "
                              "remove the link or give the file name it should point to")
    if st is not None and not stat.S_ISREG(st.st_mode):
        via = f" (the link's target {real})" if real != Path(os.path.abspath(path)) else ""
        raise OutputFileError(f"{label}: {kind_of(st.st_mode)}{via}, not a regular file; "
                              "nothing written: give a new file name or a regular file")
    return real, st


def _first_non_folder(path: Path) -> Path:
    """The first part of `path` that exists and is not a folder (ENOTDIR's cause)."""
    for part in reversed(path.parents):
        if part.exists() and not part.is_dir():
            return part
    return path.parent


def _check_replaceable(path: Path, real: Path, st: os.stat_result, what: str) -> None:
    label = f"{what} {path}"
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o222:
        raise OutputFileError(f"{label}: read-only file (mode {mode:04o}); not replaced: make "
                              "it writable or give another name")
    if not os.access(real, os.W_OK):
        raise OutputFileError(f"{label}: read-only file for you (mode {mode:04o}, owner uid "
                              f"{st.st_uid}); not replaced: give another name")
    try:  # the actual check: open for writing, no truncation, nothing written
        fd = os.open(real, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as err:
        raise OutputFileError(f"{label}: cannot write it: {_reason(err)}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the stat above
            raise OutputFileError(f"{label}: not a regular file; nothing written")
    finally:
        os.close(fd)


def _folder_for(path: Path, real: Path, what: str) -> Path:
    """The target's folder, created if missing, after checking files can be made in it."""
    label = f"{what} {path}"
    folder = real.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputFileError(f"{label}: {folder} is not a folder") from None
    except OSError as err:
        raise OutputFileError(f"{label}: cannot create the folder {folder}: "
                              f"{_reason(err)}") from None
    if not folder.is_dir():
        raise OutputFileError(f"{label}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputFileError(f"{label}: cannot create files in the folder {folder}: "
                              "Permission denied")
    return folder


def check_writable(path: Path, what: str) -> Path:
    """The regular file (existing or new) a write to `path` goes to, symlinks followed;
    OutputFileError (one line) for anything the rules of this module refuse. Changes
    nothing: a missing folder is checked through its nearest existing parent (created by
    the write itself), an existing one by making and removing a temporary file in it."""
    real, st = _target(path, what)
    if st is not None:
        _check_replaceable(path, real, st, what)
    if not real.parent.exists():
        output_folder(real.parent, what, create=False)
        return real
    folder = _folder_for(path, real, what)
    _make_temporary(folder, real, f"{what} {path}").unlink()  # the actual check
    return real


def _make_temporary(folder: Path, real: Path, label: str) -> Path:
    """An empty temporary file in `folder` (tempfile.mkstemp: mode 0600, closed)."""
    import tempfile  # writers only: `plan` reads through this module

    try:
        fd, name = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise OutputFileError(f"{label}: cannot create a file in {folder}: "
                              f"{_reason(err)}") from None
    os.close(fd)
    return Path(name)


@contextmanager
def replacing(path: Path, what: str) -> Iterator[Path]:
    """A temporary path in the target's folder to write the whole file to; when the block
    ends without an exception it is fsynced, given its mode and renamed over the target
    (see the module docstring). `what` names the file in errors ('--plot', '--out')."""
    real, st = _target(path, what)
    if st is not None:
        _check_replaceable(path, real, st, what)
    folder = _folder_for(path, real, what)
    label = f"{what} {path}"
    tmp = _make_temporary(folder, real, label)
    try:
        yield tmp
        _finish(tmp, st)
        os.replace(tmp, real)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputFileError(f"{label}: {_reason(err)}; the old file is unchanged") from None
        raise OutputFileError(f"{label}: cannot write it: {_reason(err)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _finish(tmp: Path, old: os.stat_result | None) -> None:
    """fsync the written temporary file and give it the mode (and owner) it must have."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is None:
        os.chmod(tmp, 0o666 & ~umask())
        return
    os.chmod(tmp, stat.S_IMODE(old.st_mode))
    if os.geteuid() == 0 and (old.st_uid, old.st_gid) != (0, 0):
        try:
            os.chown(tmp, old.st_uid, old.st_gid)
        except OSError:
            pass  # a file system without owners (vfat): the content is what matters


def write_bytes(path: Path, data: bytes, what: str) -> None:
    """`data` to `path` by the rules of this module."""
    with replacing(path, what) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str, what: str) -> None:
    write_bytes(path, text.encode("utf-8"), what)


def write_json(path: Path, obj: object, what: str) -> None:
    """JSON (indent 1, newline at the end) to `path`; a `.gz` path is written
    gzip-compressed and compact (the allocator traces)."""
    with replacing(path, what) as tmp:
        if path.suffix == ".gz":
            import gzip  # only the calibrate worker writes these

            with gzip.open(tmp, "wt", encoding="utf-8") as gz:
                json.dump(obj, gz, separators=(",", ":"))
        else:
            with tmp.open("w", encoding="utf-8") as fh:
                json.dump(obj, fh, indent=1)
                fh.write("\n")


def output_folder(path: Path, what: str, *, create: bool = True) -> Path:
    """A folder to write files into: an existing folder or a new path (created unless
    `create` is False: then only checked, through its nearest existing parent). A file,
    device, FIFO or socket there, or a folder the user cannot write into, is an
    OutputFileError."""
    label = f"{what} {path}"
    probe_at = path
    while True:
        try:
            st = os.stat(probe_at)
            break
        except (FileNotFoundError, NotADirectoryError):
            if probe_at.parent == probe_at:
                raise OutputFileError(f"{label}: no folder on the way exists") from None
            probe_at = probe_at.parent
        except OSError as err:
            raise OutputFileError(f"{label}: cannot reach it: {_reason(err)}") from None
    if not stat.S_ISDIR(st.st_mode):
        kind = "a file" if stat.S_ISREG(st.st_mode) else kind_of(st.st_mode)
        if probe_at == path:
            raise OutputFileError(f"{label}: {kind}, not a folder; give a folder or a new path")
        raise OutputFileError(f"{label}: {probe_at} is {kind}, not a folder")
    if not os.access(probe_at, os.W_OK | os.X_OK):
        raise OutputFileError(f"{label}: cannot create files in {probe_at}: Permission denied")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputFileError(f"{label}: cannot create the folder: "
                                  f"{_reason(err)}") from None
    return path


def read_text(path: Path, what: str, error: type[VramcalcError]) -> str:
    """The UTF-8 text of the regular file `path`; anything else is one `error` line
    starting with `what` (e.g. '--from-config x.yaml')."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise error(f"{what}: cannot read: {_reason(err)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what}: {kind_of(st.st_mode)}, not a regular file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise error(f"{what}: cannot read: {_reason(err)}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{what}: not UTF-8 text (byte {err.start}: {data[err.start]:#04x}); "
                    "give a text file") from None


def probe(path: Path, what: str, error: type[VramcalcError]) -> os.stat_result | None:
    """`os.stat(path)`, None when nothing is there; a path that cannot be reached
    (a locked folder on the way) is one `error` line, where Path.is_file() would raise."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise error(f"{what}: cannot reach it: {_reason(err)}") from None
