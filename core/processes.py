"""Child processes that die with their parent (Linux), so none outlives the one that started
it as an orphan.

A worker's django-q2 cluster forks a sentinel, which forks a pusher, a monitor and the pool
processes that run the jobs. Killed with SIGKILL (the OOM killer, kill -9, a supervisor out
of patience), the worker cannot stop them: they lived on with parent 1, finished their
training run while the service showed it lost, and took new jobs from the queue. With
`forked_children_die_with_parent()` called first, every process forked afterwards, at any
depth, gets SIGKILL from the kernel when the process that forked it ends.

Linux only (prctl PR_SET_PDEATHSIG); elsewhere these are no-ops and a killed worker's
children can outlive it.
"""

import ctypes
import os
import signal
import sys

# prctl(2) option: the signal this process gets when its parent ends.
_PR_SET_PDEATHSIG = 1
_LINUX = sys.platform.startswith("linux")
_forking_parent: int | None = None
_registered = False


def die_with_parent(parent: int | None = None) -> None:
    """This process gets SIGKILL when its parent ends; if `parent` (its pid, as seen before
    the fork) has ended already, now. For `subprocess.Popen(preexec_fn=...)` too."""
    if not _LINUX:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The parent may have ended between the fork and the prctl: no signal would come then.
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def forked_children_die_with_parent() -> None:
    """Makes every process forked from now on with os.fork (multiprocessing's fork context,
    as django-q2 uses), by this process or by its children in turn, die with its parent.

    The kernel ties the signal to the *thread* that forked, so fork only from threads that
    live as long as the process does (the main thread, as django-q2 does)."""
    global _registered
    if _registered or not _LINUX:
        return
    os.register_at_fork(before=_remember_forking_parent, after_in_child=_die_with_forker)
    _registered = True


def _remember_forking_parent() -> None:
    global _forking_parent
    _forking_parent = os.getpid()


def _die_with_forker() -> None:
    die_with_parent(_forking_parent)
