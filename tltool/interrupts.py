"""Stopping on SIGTERM at a safe point.

Raising from a signal handler lands wherever the main thread happens to be, and in TensorFlow that can
be a finalizer (where Python ignores the exception and the run goes on) or a callback from C++ (where it
aborts the process). So the handler only records the request, and the training loop and the feature
extraction call `check()` between batches, where unwinding is safe. A second SIGTERM raises at once.
"""

from __future__ import annotations

import contextlib
import signal


class Interrupted(BaseException):
    """Raised at a safe point after SIGTERM, so the work unwinds like on Ctrl-C.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it.
    """


_requested = False


def check() -> None:
    """Raise `Interrupted` if SIGTERM has arrived since `install`."""
    if _requested:
        raise Interrupted()


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
