"""The device-wide measurement lock: one agent measures at a time, so two runs never skew each other's figures.

An exclusive ``flock`` on one file (``$REDISTILL_AGENT_LOCK``, default ``redistill-agent.lock`` in the temp
folder). The kernel drops it when its holder dies, however it dies, so a killed agent never leaves a stale
lock; the file only names the current holder (pid, bundle, start time) for the refusal message.
"""

import fcntl
import json
import os
import tempfile
import time

from .common import AgentError
from .contract import LOCK_ENV


def lock_path():
    return os.environ.get(LOCK_ENV) or os.path.join(tempfile.gettempdir(), "redistill-agent.lock")


def _describe(info):
    """``pid 123, bundle NAME ID, started 12:00:00 UTC (40 s ago)`` from the holder's record, as far as it is known."""
    parts = []
    if info.get("pid"):
        parts.append("pid %s" % info["pid"])
    if info.get("bundle_name") or info.get("bundle_id"):
        parts.append("bundle %s %s" % (info.get("bundle_name") or "", (info.get("bundle_id") or "")[:12]))
    started = info.get("started")
    if isinstance(started, (int, float)):
        parts.append("started %s UTC, %d s ago" % (time.strftime("%H:%M:%S", time.gmtime(started)),
                                                    max(0, time.time() - started)))
    return ", ".join(p.strip() for p in parts) or "holder unknown"


class DeviceLock(object):
    """``acquire()`` takes the lock or refuses (AgentError ``busy``) naming the holder; ``release()`` lets it go."""

    def __init__(self, path, bundle_id, bundle_name):
        self.path = path
        self.info = {"pid": os.getpid(), "pgid": os.getpgrp(), "bundle_id": bundle_id, "bundle_name": bundle_name, "started": time.time()}
        self.fd = None

    def _open(self):
        d = os.path.dirname(self.path)
        if d and not os.path.isdir(d):
            os.makedirs(d)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except (IOError, OSError):
            return os.open(self.path, os.O_RDONLY), False  # another user's lock file: flock works read-only
        try:
            os.fchmod(fd, 0o666)  # any user's agent may take the lock next
        except (IOError, OSError):
            pass
        return fd, True

    def acquire(self):
        try:
            fd, writable = self._open()
        except (IOError, OSError) as e:
            raise AgentError("busy", "cannot open the measurement lock %s (%s): set %s to a writable file"
                             % (self.path, e, LOCK_ENV))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (IOError, OSError):
            try:
                holder = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
            except ValueError:
                holder = {}
            os.close(fd)
            holder = holder if isinstance(holder, dict) else {}
            pid, pgid = holder.get("pid"), holder.get("pgid")
            # a group leader (as redistill deploy runs it) is stopped with its measurement processes
            target = ("-%s" % pgid) if pid and pgid == pid else pid
            stop = ("stop it on the device with `kill -TERM %s`" % target) if target else "stop it on the device"
            raise AgentError("busy", "another agent is measuring on this device (%s), and two at once would skew "
                             "each other's figures: wait for it to finish and run again, or %s"
                             % (_describe(holder), stop))
        if writable:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(self.info).encode("utf-8"))
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except (IOError, OSError):
                pass
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
