"""Output folders: which ones tltool may write, replace or delete, and one writer at a time.

Every folder a command creates for its output (a run, an evaluation, an export, a search) gets a marker
file, `.tltool`, naming the kind of output it holds. `--force` (and `tune --overwrite`) replaces only a
folder whose marker says it is that command's own output: never a folder of the user's, never a run
directory from `evaluate --out RUN --force`. No output folder may be, or hold, one of the command's inputs,
nor sit inside a data folder (a later scan would read it as a class).

The marker is also the folder's lock: a command holds an exclusive `flock` on it while it writes, so a
second command on the same folder is refused at once instead of overwriting the first one's files.
Locks are advisory and per open file; they vanish with the process, so a kill -9 never leaves one behind.

`--force` never loses the old output before the new one is complete. An evaluation or an export is written
into a temporary folder beside `out` and put in place whole (`replacing_output_dir`); a run, which writes
into its folder as it goes, moves the old one beside it until it has finished (`claiming_keeping_previous`).
What a kill leaves behind is marked too, so the next command can tell it from a folder of the user's.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from tltool.errors import RunDirError, WorkerLostError
from tltool.files import fsync_dir, replace_dir

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; everything else still holds
    fcntl = None

MARKER = ".tltool"
KINDS = ("run", "evaluation", "export", "search", "stylization")
_WHAT = {"run": "a tltool run", "evaluation": "a tltool evaluation", "export": "a tltool export",
         "search": "a tltool search", "stylization": "a tltool stylization"}


class FileLock:
    """An advisory `flock` on one file, held until `release` (or the process ends)."""

    def __init__(self, path: Path, shared: bool = False, wait: bool = False):
        """Raises BlockingIOError when another process holds a conflicting lock (at once, unless `wait`)."""
        self.path = Path(path)
        self.fd = None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is not None:
            mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
            try:
                fcntl.flock(fd, mode | (0 if wait else fcntl.LOCK_NB))
            except BaseException:
                os.close(fd)
                raise
        self.fd = fd

    def still_current(self) -> bool:
        """Whether the locked file is still the one at `path` (not removed, or replaced, meanwhile)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def __del__(self):  # a lock whose owner is gone (an unclosed FeatureCache) must not outlive it
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def read_marker(folder: Path) -> dict | None:
    """The marker of `folder` ({"kind": ...}), or None when it has none (or one tltool cannot read)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("kind") in KINDS else None


def in_use(folder: Path) -> bool:
    """Whether another process holds the lock of `folder`'s marker right now."""
    marker = Path(folder) / MARKER
    if fcntl is None or not marker.is_file():
        return False
    try:
        with FileLock(marker):
            return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def check_output_dir(out: Path, kind: str, force: bool = False, resume: bool = False, resumable: bool = False,
                     inputs=(), data=(), flag: str = "--force") -> None:
    """Refuse `out` as the folder of a `kind` output, with one line saying why; never touches it.

    Args:
        out: the output folder asked for.
        kind: run, evaluation, export or search.
        force: the folder's contents will be replaced: allowed only for a folder marked as `kind`.
        resume: the folder's contents are kept and added to (an interrupted run).
        resumable: mention --resume in the message about a non-empty folder.
        inputs: paths the command reads (a run directory, a model, data folders): `out` must not be one of
            them, nor hold one.
        data: image folders: `out` must not sit inside one either.
        flag: how the user spells `force` in this command (`--force`, `--overwrite`).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder. Choose another --out.")
    where = out.resolve()
    for path in inputs:
        path = Path(path).resolve()
        if where == path or where in path.parents:
            raise RunDirError(f"--out {out} is or holds {path}, which this command reads. Choose another --out.")
    for folder in data:
        folder = Path(folder).resolve()
        if folder in where.parents:
            raise RunDirError(f"--out {out} is inside the data folder {folder}: later scans of that folder would "
                              f"read its files as a class. Choose an --out outside it.")
    if not out.is_dir() or not has_content(out):
        return
    if in_use(out):
        raise RunDirError(f"{out} is in use by another tltool command right now. Wait for it to finish, or "
                          f"choose another --out.")
    if resume:
        return
    if not force:
        hint = ", or --resume to continue that run" if resumable else ""
        raise RunDirError(f"Output folder {out} already exists and is not empty. Choose another --out or "
                          f"pass {flag} to replace it{hint}.")
    marker = read_marker(out)
    if marker is None:
        raise RunDirError(f"{flag} replaces only a folder tltool wrote, and {out} has no {MARKER} marker: it may "
                          f"hold files of yours. Delete it yourself if it can go, or choose another --out.")
    if marker["kind"] != kind:
        raise RunDirError(f"{out} holds {_WHAT[marker['kind']]}, not {_WHAT[kind]}: {flag} will not replace it. "
                          f"Choose another --out.")


def claim_output_dir(out: Path, kind: str, force: bool = False, resume: bool = False, keep: bool = False,
                     **checks) -> FileLock:
    """Create (or, with `force`, empty) `out` as the folder of a `kind` output, and lock it.

    Runs `check_output_dir` first, then again once the lock is held, so two commands starting together on
    one folder cannot both pass. Returns the lock: keep it while writing, `release` it when done.
    `keep`: checked as `force` is, but left as it is (for `claiming_keeping_previous` to move aside).
    """
    out = Path(out)
    force = force or keep
    check_output_dir(out, kind, force, resume, **checks)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    try:
        lock = FileLock(marker)
    except BlockingIOError:
        raise RunDirError(f"{out} is in use by another tltool command right now. Wait for it to finish, or "
                          f"choose another --out.") from None
    try:
        if read_marker(out) is None and has_content(out) and not resume:
            # An unmarked folder that filled up since the check (or the check's race): never ours to replace.
            raise RunDirError(f"Output folder {out} already exists and is not empty. Choose another --out.")
        if force and not resume and not keep:
            _empty_keeping_marker(out)
        if read_marker(out) is None:
            _write_marker(lock, kind)
    except BaseException:
        lock.release()
        raise
    return lock


def previous_dir(out: Path) -> Path:
    """Where `claiming_keeping_previous` keeps what `--force` replaces in `out`: hidden, beside it (not in
    it, which the new output fills, and so never inside a data folder either)."""
    out = Path(out)
    return out.parent / f".{out.name}.previous"


@contextlib.contextmanager
def claiming_keeping_previous(out: Path, kind: str, finished, say, force: bool = False, resume: bool = False,
                              **checks):
    """Claim `out`, as `claim_output_dir` does, for an output written in place as it goes (a run: its state
    is there, for --resume); what `--force` replaces is moved whole to `previous_dir(out)` meanwhile.

    It is removed once the block completes, put back if the block fails with an error, and left where it is
    on a kill or an interruption (the new output is then resumable): the next claim of `out` finds it, and
    keeps it as its own previous output, or removes it when `finished(out)` says `out` holds a finished one.
    """
    out = Path(out)
    lock = claim_output_dir(out, kind, resume=resume, keep=force, **checks)
    try:
        previous = _kept_from_before(out, kind, finished, say, resume)
        if force and not resume and has_content(out):
            if previous is None:
                lock, previous = _move_aside(out, kind, lock), previous_dir(out)
            else:  # the output of the interrupted --force: what this --force replaces
                _empty_keeping_marker(out)
        try:
            yield
        except Exception as exc:
            # A lost worker is an interruption too: the `tltool` program resumes the new run by itself.
            if previous is not None and not resume and not isinstance(exc, WorkerLostError):
                _put_back(previous, out, kind, say)
            raise
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    finally:
        lock.release()


def _kept_from_before(out: Path, kind: str, finished, say, resume: bool) -> Path | None:
    """The previous output an interrupted `--force` left in `previous_dir(out)`, if any, now this claim's own;
    removed instead when `out` holds a finished output (what replaced it)."""
    previous = previous_dir(out)
    if previous.is_symlink() or not previous.is_dir() or (read_marker(previous) or {}).get("kind") != kind \
            or in_use(previous):
        return None  # not provably what a --force of ours put there: left alone
    if finished(out):
        shutil.rmtree(previous)
        say(f"Removed {previous}: it kept the {kind} that --force replaced in {out}, and the new one has "
            f"finished.")
        return None
    fails = "" if resume else ", and put back if it fails"  # a resume that fails can be resumed again
    say(f"{previous} holds the {kind} that an interrupted --force replaced in {out}: kept until this one is "
        f"complete{fails}.")
    return previous


def _move_aside(out: Path, kind: str, lock: FileLock) -> FileLock:
    """Rename `out` to `previous_dir(out)`, in one step so that a kill leaves it whole in one place or the
    other, and make `out` afresh; returns the lock of the new `out`."""
    previous = previous_dir(out)
    if os.path.lexists(previous):
        raise RunDirError(f"{previous}, where --force keeps the {kind} it replaces until the new one is "
                          f"complete, holds something else: move it away, or choose another --out.")
    os.replace(out, previous)  # the lock goes with the old marker: `out` is new and unlocked until below
    fsync_dir(out.parent)
    lock.release()
    try:
        out.mkdir()
        lock = FileLock(out / MARKER)
    except (FileExistsError, BlockingIOError):
        raise RunDirError(f"Another command took {out} while --force moved its {kind} to {previous}; that is "
                          f"where it is now.") from None
    _write_marker(lock, kind)
    return lock


def _put_back(previous: Path, out: Path, kind: str, say) -> None:
    """Put the previous output back in place of the failed one; if that fails too, say where it is."""
    try:
        replace_dir(previous, out)
        say(f"The previous {kind} is back in {out}.")
    except OSError as exc:
        say(f"The previous {kind} of {out} could not be put back ({exc}); it is in {previous}.")


#: A temporary output folder this old was left by a command that was killed (an export takes minutes).
STALE_TEMPORARY_S = 6 * 3600


@contextlib.contextmanager
def replacing_output_dir(out: Path, kind: str):
    """A temporary folder beside `out` to write a `kind` output into, put in place of `out` whole once the
    block completes: a command that fails or is killed midway leaves whatever `out` held as it was.

    The temporary is marked and locked while it is written, so that a later command tells the leftover of a
    killed one (removed here once stale) from one still being written, or from a folder of the user's.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out, kind)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        lock = FileLock(tmp / MARKER)
        try:
            _write_marker(lock, kind)
            yield tmp
        finally:
            lock.release()  # before the rename: some systems refuse to rename a folder with a file open in it
        replace_dir(tmp, out)
        _remove_superseded(out, kind)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_superseded(out: Path, kind: str) -> None:
    """Remove the old outputs that commands killed inside `replace_dir` (between its two renames) left beside
    `out`: a `kind` output asked to be replaced, now replaced by the one just put in place. One without
    tltool's marker of that kind, or in use, is left alone."""
    for aside in out.parent.glob(f".{glob.escape(out.name)}.old.*"):
        if aside.is_dir() and not aside.is_symlink() and (read_marker(aside) or {}).get("kind") == kind \
                and not in_use(aside):
            shutil.rmtree(aside, ignore_errors=True)


def _remove_stale_temporaries(out: Path, kind: str) -> None:
    """Remove the temporaries of earlier commands on `out` that were killed (kill -9, power loss) before they
    could clean up. Only a stale one marked as `kind` and locked by nobody is theirs for sure: a recent one
    may still be written, and one without the marker is not tltool's to delete."""
    now = time.time()
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        try:
            stale = (leftover.is_dir() and not leftover.is_symlink()
                     and now - leftover.stat().st_mtime > STALE_TEMPORARY_S)
        except OSError:  # gone meanwhile
            continue
        if stale and (read_marker(leftover) or {}).get("kind") == kind and not in_use(leftover):
            shutil.rmtree(leftover, ignore_errors=True)


def _write_marker(lock: FileLock, kind: str) -> None:
    """Write the marker through the lock held on it, durably."""
    os.ftruncate(lock.fd, 0)
    os.pwrite(lock.fd, json.dumps({"kind": kind}).encode() + b"\n", 0)
    os.fsync(lock.fd)
    fsync_dir(lock.path.parent)


def has_content(folder: Path) -> bool:
    """Whether `folder` holds anything besides its marker."""
    return any(path.name != MARKER for path in folder.iterdir())


def _empty_keeping_marker(folder: Path) -> None:
    for path in folder.iterdir():
        if path.name == MARKER:
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    fsync_dir(folder)
