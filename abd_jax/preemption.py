"""Stop requests (SIGTERM from a scheduler, Ctrl-C) honoured between jitted calls.

The signal handler only records the request. Host loops call `check()` between device calls;
it raises `Preempted` (a `KeyboardInterrupt`) in ordinary Python code, never inside XLA or a
garbage-collection callback, so the task loop can save a checkpoint and exit 130 within one
call's time. A second signal exits at once (status 130) without saving.

With several processes a request is agreed (`hosts.agree`, one small cross-process max per
`requested()` call, which every process makes at the same point of the same loop): a signal
to any process stops all of them at the same call, so they save the same checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Optional

import jax

from abd_jax import hosts

_requested: Optional[int] = None  # the signal this process received
_agreed = False  # a stop agreed by all processes (several processes only)


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
    """A stop was requested (of any process, with several: every process must call this at
    the same point)."""
    global _agreed
    if jax.process_count() == 1:
        return _requested is not None
    _agreed = _agreed or hosts.agree(_requested is not None)
    return _agreed


def check() -> None:
    """Raise `Preempted` if a stop was requested (see `requested`)."""
    if requested():
        raise Preempted(f"signal {_requested}" if _requested is not None else
                        "stop requested by another process")


def request(signum: int = signal.SIGTERM) -> None:
    """Record a stop request as the handler would (for tests)."""
    global _requested
    _requested = signum


def clear() -> None:
    global _requested, _agreed
    _requested, _agreed = None, False
