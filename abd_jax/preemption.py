"""Stop requests (SIGTERM from a scheduler, Ctrl-C) honoured between jitted calls.

The signal handler only records the request. Host loops call `check()` between device calls;
it raises `Preempted` (a `KeyboardInterrupt`) in ordinary Python code, never inside XLA or a
garbage-collection callback, so the task loop can save a checkpoint and exit 130 within one
call's time. A second signal exits at once (status 130) without saving.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Optional

_requested: Optional[int] = None


class Preempted(KeyboardInterrupt):
    """Raised by `check()` once a stop was requested."""


def _on_signal(signum, frame) -> None:
    global _requested
    if _requested is not None:
        sys.stderr.write(f"signal {signum} again: exiting now without saving\n")
        sys.stderr.flush()
        os._exit(130)
    _requested = signum
    sys.stderr.write(f"signal {signum}: stopping after the current step (a checkpoint will "
                     "be saved; send it again to exit at once)\n")
    sys.stderr.flush()


def install() -> None:
    """Route SIGTERM and SIGINT to the flag (call once, from the main thread)."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def requested() -> bool:
    return _requested is not None


def check() -> None:
    """Raise `Preempted` if a stop was requested."""
    if _requested is not None:
        raise Preempted(f"signal {_requested}")


def request(signum: int = signal.SIGTERM) -> None:
    """Record a stop request as the handler would (for tests)."""
    global _requested
    _requested = signum


def clear() -> None:
    global _requested
    _requested = None
