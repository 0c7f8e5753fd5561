"""Worker processes that end with the process that started them, however it ends.

A forked pool worker waits on its task queue, and holds a copy of the queue's write end itself, so it never reads
an end of file there. A parent stopped by SIGTERM, SIGHUP or kill -9 has no chance to shut its pool down: its workers
were reparented to PID 1 and waited forever, each holding a copy of the parent's memory (issue #24).

So each worker ties itself to its parent when it starts (:func:`die_with_parent`): on Linux the kernel kills it when
the thread that forked it ends (``PR_SET_PDEATHSIG``), and everywhere a watchdog thread ends it within a fraction of
a second of seeing another parent (a dead parent's children are reparented). The parent still shuts its pool down
on every exit path it lives through (``finally``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_SECONDS = 0.2


def forked_from_main_thread() -> bool:
    """Whether a process forked now, from this thread, may ask to die with it: ``PR_SET_PDEATHSIG`` fires when the
    forking *thread* ends, which for the main thread is when the process does, and for any other thread too early."""
    return threading.current_thread() is threading.main_thread()


def die_with_parent(parent: int, pdeathsig: bool) -> None:
    """Run first in a worker process forked by ``parent``: end this process when the parent is gone."""
    # Ctrl-C reaches every process of the terminal's group: the parent stops the pool; a worker's own
    # KeyboardInterrupt would only print a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if pdeathsig and sys.platform.startswith("linux"):
        _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the kernel was told to kill this process with it
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), name="prmkit-parent-watch", daemon=True).start()


def _set_pdeathsig(sig: int) -> None:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # no prctl here: the watchdog alone ends the worker


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_SECONDS)
    os._exit(1)


def stop_pool(pool: Any, kill: bool) -> None:
    """Shut a ``ProcessPoolExecutor`` down; ``kill``: at once (an error, an interrupt), not after its running tasks."""
    if kill:
        # No public way before Python 3.14 (terminate_workers); the tasks are pure and their results unwanted.
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
    pool.shutdown(wait=True, cancel_futures=True)
