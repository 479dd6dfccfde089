"""Stopping on SIGTERM at a safe point.

Raising from a signal handler lands wherever the main thread happens to be, and in TensorFlow that can
be a finalizer (where Python ignores the exception and the run goes on) or a callback from C++ (where it
aborts the process). So the handler only records the request, and the training loop and the feature
extraction call `check()` between batches, where unwinding is safe. A second SIGTERM raises at once.

Ctrl-C (SIGINT) raises KeyboardInterrupt at once, as Python does, except within `ctrl_c_at_safe_points`: a
loop whose every step is a safe point (stylize's optimisation, which spends nearly all its time in
TensorFlow) records it there and raises KeyboardInterrupt at the next `check()`, so no finalizer swallows it.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Interrupted(BaseException):
    """Raised at a safe point after SIGTERM, so the work unwinds like on Ctrl-C.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it.
    """


_requested = False
_ctrl_c = False


def check() -> None:
    """Raise `Interrupted` if SIGTERM has arrived since `install`, KeyboardInterrupt if Ctrl-C has within
    `ctrl_c_at_safe_points`."""
    if _requested:
        raise Interrupted()
    if _ctrl_c:
        raise KeyboardInterrupt()


def install():
    """Handle SIGTERM by recording it; returns the previous handler (give it to `restore`)."""
    global _requested
    _requested = False

    def on_sigterm(signum, frame):
        global _requested
        if _requested:  # asked twice: do not wait for the next safe point
            raise Interrupted()
        _requested = True

    return signal.signal(signal.SIGTERM, on_sigterm)


def restore(previous) -> None:
    global _requested
    _requested = False
    signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_at_safe_points():
    """Within the block, SIGTERM stops the work at its next safe point by raising `Interrupted` there."""
    previous = install()
    try:
        yield
    finally:
        restore(previous)


@contextlib.contextmanager
def ctrl_c_at_safe_points():
    """Within the block, Ctrl-C is recorded and raised as KeyboardInterrupt by the next `check()`; a second
    Ctrl-C raises at once. Outside the main thread (where Python takes no signal handler) it changes nothing."""
    global _ctrl_c
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        global _ctrl_c
        if _ctrl_c:  # pressed twice: do not wait for the next safe point
            raise KeyboardInterrupt()
        _ctrl_c = True

    _ctrl_c = False
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _ctrl_c = False
