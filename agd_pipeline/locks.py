"""One writer per output folder: an advisory lock file inside the folder.

``FolderLock(folder, "generate")`` takes an exclusive ``flock`` on ``<folder>/.agd.lock`` for as
long as the run lasts; a second writer is refused at once with the holder named (its command, pid,
host and start time are written into the file). Readers that must not see a folder change under
them (training reads the store) take a shared lock: any number of readers, no writer.

The kernel releases a ``flock`` when its process dies, SIGKILL included, so a killed run never
leaves a stale lock; the file itself stays (it is listed in ``.dvcignore``, so it never counts in
DVC's hash of the folder). A folder replaced as a whole is guarded by a sibling file instead
(``lock_file=".<name>.agd.lock"`` in its parent), removed on release so nothing is left beside the
folder; a run that opened it just before it was removed sees that (the path no longer names the
file it locked) and is refused rather than holding a lock nobody else can see.

Why not ``filelock``: its ``UnixFileLock`` is the same exclusive ``flock`` but has no shared mode, and
its ``ReadWriteLock`` is an SQLite database, which cannot be opened in a read-only folder (a store in
a hub cache, say), leaves journal files inside the folder it guards, and cannot name its holder; an
exclusive filelock beside our shared flock would not exclude each other. So readers and writers keep
this one mechanism.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import AgdError

LOCK_FILE = ".agd.lock"
HOLDER_WAIT_POLLS = 20  # x 50 ms: how long an empty lock file is read again before it counts as a reader's


class LockError(AgdError):
    """Another process holds the folder."""


def _describe_holder(text: str) -> str:
    if not text.strip():  # readers record nothing (there may be many)
        return "another process reading it"
    try:
        holder = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return "another process (no details recorded)"
    if not isinstance(holder, dict):
        return "another process (no details recorded)"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            # the recorded writer is gone, so the lock is held by a reader (or its child)
            return "another process reading it"
        except PermissionError:
            pass
    return (f"{holder.get('purpose', 'a run')} (pid {holder.get('pid')} on {holder.get('host')}, started "
            f"{holder.get('started')}: {holder.get('command')})")


class FolderLock:
    """Exclusive (writers) or shared (readers) lock on a folder; use as a context manager."""

    def __init__(self, folder: str | os.PathLike, purpose: str, shared: bool = False, create: bool = True,
                 lock_file: str = LOCK_FILE):
        self.folder = Path(folder)
        self.lock_file = lock_file  # another name: a lock for a sibling that is replaced as a whole
        self.purpose = purpose
        self.shared = shared
        self.create = create
        self._file = None

    def acquire(self) -> FolderLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise LockError(f"{self.folder} is a file, not a folder: choose another path for the {self.purpose} output")
        try:
            if self.create:
                self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / self.lock_file
            self._file = open(path, "r+" if path.exists() else "a+")
        except OSError as err:
            if self.shared and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT):
                self._file = None  # a read-only folder: nobody can write it under us either
                return self
            raise LockError(f"{self.folder}: cannot create the lock file {self.lock_file} "
                            f"({err.strerror or err})") from None
        try:
            fcntl.flock(self._file.fileno(), (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(self._holder_record())
            self._file.close()
            self._file = None
            verb = "read" if self.shared else "written"
            what = self.folder if self.lock_file == LOCK_FILE else self.folder / self.lock_file[1:-len(LOCK_FILE)]
            raise LockError(f"{what} is in use by {holder}; it cannot be {verb} by this "
                            f"{self.purpose} run at the same time. Wait for that run to finish (or stop it), "
                            "then run this command again.") from None
        if self.lock_file != LOCK_FILE and not self._still_linked():
            # a sibling lock is removed on release: this one was removed between our open and our lock
            self._file.close()
            self._file = None
            raise LockError(f"{self.folder / self.lock_file}: released by another run while this one took it; "
                            "run this command again")
        if not self.shared:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(json.dumps({
                "purpose": self.purpose, "pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:300]}) + "\n")
            self._file.flush()
        return self

    def _holder_record(self) -> str:
        """What the holder wrote into the lock file. A writer writes it right after taking the
        lock, so an empty file is read again for a moment before it is taken for a reader's."""
        for _ in range(HOLDER_WAIT_POLLS):
            self._file.seek(0)
            text = self._file.read()
            if text.strip():
                return text
            time.sleep(0.05)
        return text

    def _still_linked(self) -> bool:
        """Whether the lock file's path still names the file this process opened."""
        try:
            return os.stat(self.folder / self.lock_file).st_ino == os.fstat(self._file.fileno()).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._file is None:
            return
        try:
            if not self.shared:
                self._file.seek(0)
                self._file.truncate()
            if self.lock_file != LOCK_FILE:  # a sibling of the folder it guards: no litter beside it
                (self.folder / self.lock_file).unlink(missing_ok=True)
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        finally:
            self._file.close()
            self._file = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
