"""How every command ends when it is stopped: Ctrl-C (SIGINT), SIGTERM (``kill``, a scheduler or CI
stopping the job) and SIGHUP (the terminal or SSH session closed) end in one line and the shell's exit
status for the signal, after the same clean-up (``finally`` blocks, locks released, a subprocess's
process group stopped). No heavy imports: ``stages.experiments`` uses it too."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable


class Interrupted(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler or CI stopping the job) or SIGHUP (the terminal or SSH session
    closed), raised where the program is, as Ctrl-C raises KeyboardInterrupt: the same clean-up runs
    (``finally`` blocks, locks released, a subprocess group stopped, the queue's runs killed)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_as_interrupts():
    """Inside: SIGTERM and SIGHUP raise :class:`Interrupted`; the previous handlers come back
    afterwards. A signal ignored when the process started (SIGHUP under ``nohup``) stays ignored. Only
    the main thread can set handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, interrupt) for signum in STOP_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interrupted_status(err: KeyboardInterrupt) -> int:
    """The shell's exit status of a process ended by the signal: 130 for Ctrl-C (SIGINT), 143 for
    SIGTERM, 129 for SIGHUP (128 + the signal's number)."""
    return 128 + int(err.signum if isinstance(err, Interrupted) else signal.SIGINT)


def interruptible(main: Callable[[], int | None], advice: str) -> int:
    """Run a command's ``main`` with SIGTERM and SIGHUP handled as Ctrl-C is: interrupted, it ends
    with one line, ``interrupted (<signal>): <advice>`` (no traceback), and the exit status of
    :func:`interrupted_status`. Every ``python -m stages.X`` goes through here (via
    :func:`run_command` or directly)."""
    with signals_as_interrupts():
        try:
            return main() or 0
        except KeyboardInterrupt as err:
            # a second signal while saying so must not end in a traceback either; after SIGHUP the
            # terminal may be gone (writing to it fails)
            with _ignoring(signal.SIGINT, *STOP_SIGNALS), contextlib.suppress(OSError):
                name = signal.Signals(err.signum).name if isinstance(err, Interrupted) else "Ctrl-C"
                print(f"\ninterrupted ({name}): {advice}", file=sys.stderr, flush=True)
            return interrupted_status(err)


@contextlib.contextmanager
def _ignoring(*signals):
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def quiet_from_the_start() -> None:
    """For a process started as ``python -m stages.X`` (called by ``stages/__init__.py``, before the
    command's module is imported): SIGTERM and SIGHUP raise :class:`Interrupted` from the start, and a
    KeyboardInterrupt that no main caught (Ctrl-C while the command's imports load, say) ends in one
    line and the signal's exit status, not a traceback."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise Interrupted(signum)

    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:  # nohup's SIG_IGN is kept
            signal.signal(signum, interrupt)
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if not issubclass(kind, KeyboardInterrupt):
            return previous(kind, value, traceback)
        with _ignoring(signal.SIGINT, *STOP_SIGNALS), contextlib.suppress(OSError):
            name = signal.Signals(value.signum).name if isinstance(value, Interrupted) else "Ctrl-C"
            print(f"\ninterrupted ({name}): re-run the same command", file=sys.stderr, flush=True)
            sys.stdout.flush()
        os._exit(interrupted_status(value))

    sys.excepthook = hook


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_dvc() -> bool:
    """Under ``dvc repro`` (DVC sets DVC_STAGE for every stage command), on Linux: ask the kernel to
    send this process SIGTERM when its parent (dvc, or the shell it started) dies, so that a
    SIGKILLed ``dvc repro`` does not leave its stage running unseen. Outside DVC nothing is set: a
    command started with ``nohup ... &`` must outlive the shell it was started from. Returns
    whether it was set."""
    if not os.environ.get("DVC_STAGE") or not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return True
