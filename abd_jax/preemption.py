"""Stop requests (SIGTERM from a scheduler, Ctrl-C) honoured between jitted calls.

`StopRequests.install()` routes both signals to the object: a handler only records the
request, and host loops call `check()` between device calls, which raises `Preempted` (a
`KeyboardInterrupt`) in ordinary Python code, never inside XLA or a garbage-collection
callback. The loop that owns the state then saves a checkpoint and the run exits 130 within
one call's time. A second signal exits at once (status 130) without saving.

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


class Preempted(KeyboardInterrupt):
    """Raised by `StopRequests.check()` once a stop was requested."""


class StopRequests:
    """The stop requests of one session (see the module docstring)."""

    def __init__(self):
        self.signal: Optional[int] = None  # the signal this process received
        self._agreed = False  # a stop agreed by all processes (several processes only)

    def _on_signal(self, signum, frame) -> None:
        del frame
        if self.signal is not None:
            sys.stderr.write(f"signal {signum} again: exiting now without saving\n")
            sys.stderr.flush()
            os._exit(130)
        self.signal = signum
        sys.stderr.write(f"signal {signum}: stopping after the current step (a checkpoint "
                         "will be saved; send it again to exit at once)\n")
        sys.stderr.flush()

    def install(self) -> None:
        """Route SIGTERM and SIGINT here (call once, from the main thread)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def requested(self) -> bool:
        """A stop was requested (of any process; with several, every process must call this
        at the same point)."""
        if jax.process_count() == 1:
            return self.signal is not None
        self._agreed = self._agreed or hosts.agree(self.signal is not None)
        return self._agreed

    def check(self) -> None:
        """Raise `Preempted` if a stop was requested (see `requested`)."""
        if self.requested():
            raise Preempted(f"signal {self.signal}" if self.signal is not None else
                            "stop requested by another process")

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Record a stop request as the handler would (tests, tools)."""
        self.signal = signum
