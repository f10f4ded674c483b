"""One job per run directory: `<run>/LOCK` names the job that trains in it.

Rank 0 creates the file atomically (O_CREAT | O_EXCL) with its host, pid, process start time, start
date, SLURM job id and restart count, and a background thread refreshes its mtime (a heartbeat)
while the job runs; the job removes it when `train` returns or fails. A second job finds the file:

- holder alive -> refused at once, naming the holder and what to do;
- holder dead (same host: its pid is gone, or is another process; another host: no heartbeat for
  `checkpoint.lock_stale_s`) -> the stale lock is taken over with a warning (kill -9, node loss);
- holder is this job's own predecessor (same SLURM job id, an earlier restart: a requeue that starts
  before the preempted attempt has exited) -> wait up to `checkpoint.lock_wait_s` for it to release.

Taking over is serialised by an exclusive `LOCK.break` file, and the contender holding it removes the
stale lock only if it is still the file it judged; then exactly one exclusive create succeeds, so two
jobs that find the same stale lock cannot both start. What this needs from a
shared filesystem is in docs/cluster.md ("One job per run directory").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from rsmoe.config import CheckpointArgs
from rsmoe.distributed import collectives
from rsmoe.errors import UserError

log = logging.getLogger(__name__)

LOCK = "LOCK"
HEARTBEAT_S = 15.0
POLL_S = 1.0
UNWRITTEN_GRACE_S = 10.0  # a lock file still empty this long after its creation belongs to a dead writer


class RunDirLocked(UserError):
    """Another live job holds the run directory."""

    same_on_every_rank = True


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if no such process: together with
    the pid it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass
class Holder:
    host: str
    pid: int
    proc_start: str | None
    started: float
    job: str
    restart: int
    token: str

    @classmethod
    def this_process(cls) -> "Holder":
        env = os.environ
        return cls(socket.gethostname(), os.getpid(), _proc_start(os.getpid()), time.time(),
                   env.get("SLURM_JOB_ID", ""), int(env.get("SLURM_RESTART_COUNT", 0) or 0), uuid.uuid4().hex)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        job = f", SLURM job {self.job}" + (f" (restart {self.restart})" if self.restart else "") if self.job else ""
        return f"host {self.host}, pid {self.pid}, started {when}{job}"


class RunLock:
    def __init__(self, run_dir: str | Path, stale_after_s: float = 120.0, wait_s: float = 300.0):
        self.path = Path(run_dir) / LOCK
        self.stale_after_s = stale_after_s
        self.wait_s = wait_s
        self.me = Holder.this_process()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ------------------------------------------------------------ reading a holder
    def _read(self) -> tuple[Holder | None, float | None, tuple | None]:
        """(holder, age of its last heartbeat in s, the file's identity); holder None for a file with no
        complete record yet; (None, None, None) when there is no file. The identity (inode, size, record)
        tells a contender whether the file it judged stale is still the one there."""
        try:
            st = self.path.stat()
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None, None
        age, ident = time.time() - st.st_mtime, (st.st_ino, st.st_size, text)
        try:
            return Holder(**json.loads(text)), age, ident
        except (ValueError, TypeError):
            return None, age, ident

    def _stale(self, holder: Holder | None, age: float) -> str | None:
        """Why the lock is stale, or None while its holder may be alive."""
        if holder is None:
            return "its file was never written completely" if age > UNWRITTEN_GRACE_S else None
        if holder.host == self.me.host:
            if _proc_start(holder.pid) != holder.proc_start:
                return f"pid {holder.pid} is not running on this host"
            return None
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s (checkpoint.lock_stale_s={self.stale_after_s:g})"
        return None

    def _predecessor(self, holder: Holder | None) -> bool:
        return holder is not None and bool(self.me.job) and holder.job == self.me.job and holder.restart < self.me.restart

    # ------------------------------------------------------------ taking it
    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(self.me)))
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, reason: str, holder: Holder | None, ident: tuple) -> None:
        """Remove the stale lock `ident`, unless it changed meanwhile. Contenders serialise on an
        exclusive `LOCK.break` file, and the winner checks the lock is still the one it judged, so two
        jobs that found the same stale lock cannot both remove a fresh one."""
        breaker = self.path.with_name(f"{LOCK}.break")
        try:
            os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:  # a breaker left by a contender that died in these few lines goes stale fast
                if time.time() - breaker.stat().st_mtime > UNWRITTEN_GRACE_S:
                    breaker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(POLL_S)
            return
        try:
            if self._read()[2] != ident:
                return  # released, or taken by someone else since we looked: decide again
            self.path.unlink(missing_ok=True)
            log.warning("%s: taking over a stale lock (%s) of %s", self.path.parent, reason,
                        holder.describe() if holder else "an unknown job")
        finally:
            breaker.unlink(missing_ok=True)

    def acquire(self) -> None:
        """Take the lock, or raise RunDirLocked. Waits only for this job's own predecessor."""
        deadline = None
        while True:
            if self._create():
                self._start_heartbeat()
                return
            holder, age, ident = self._read()
            if age is None:
                continue  # released between our create and read
            reason = self._stale(holder, age)
            if reason:
                self._take_over(reason, holder, ident)
                continue
            if holder is None:  # being written right now
                time.sleep(POLL_S)
                continue
            if self._predecessor(holder):
                if deadline is None:
                    deadline = time.monotonic() + self.wait_s
                    log.warning("%s is held by this job's previous attempt (%s); waiting up to %.0f s for it to exit",
                                self.path.parent, holder.describe(), self.wait_s)
                if time.monotonic() < deadline:
                    time.sleep(POLL_S)
                    continue
            raise RunDirLocked(self._refusal(holder, waited=deadline is not None))

    def check(self) -> None:
        """Read-only and at once (preflight, on every rank): raise RunDirLocked if a live job other than
        this job's predecessor holds the directory. `acquire` decides for good after the process group."""
        holder, age, _ = self._read()
        if holder is None or age is None or self._stale(holder, age) or self._predecessor(holder):
            return
        raise RunDirLocked(self._refusal(holder, waited=False))

    def _refusal(self, holder: Holder, waited: bool) -> str:
        return (f"{self.path.parent} is in use by another job: {holder.describe()}"
                f"{f' (waited {self.wait_s:.0f} s for it to exit)' if waited else ''}. Wait for it to finish "
                f"or stop it, or train into another --run-dir; if that job is gone for good (its node lost), "
                f"the lock goes stale after {self.stale_after_s:g} s without heartbeat, or delete {self.path}")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    pass

        self._beat = threading.Thread(target=beat, name="rsmoe-run-lock", daemon=True)
        self._beat.start()

    def release(self) -> None:
        """Remove the lock if it is still ours (never another job's that took over a stale one)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        holder, _, _ = self._read()
        if holder is not None and holder.token == self.me.token:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def holding(run_dir: str | Path, ckpt: CheckpointArgs) -> Iterator[None]:
    """Collective: rank 0 takes the run directory's lock for the block; every rank gets its verdict,
    so a refused job stops on every rank with the same one line."""
    lock = RunLock(run_dir, ckpt.lock_stale_s, ckpt.lock_wait_s) if ckpt.lock and collectives.rank() == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except RunDirLocked as exc:
            error = str(exc)
    error = collectives.broadcast_object(error)
    if error:
        raise RunDirLocked(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
