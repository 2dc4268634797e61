"""Start-up noise control: keep the libraries' warnings and errors, drop their routine INFO
lines (orbax on every checkpoint write, TFDS on every dataset load, JAX's "Unable to
initialize backend 'tpu'") and TFDS's OpenCV advice, so the run's own lines stand out. Orbax's
errors from its background threads keep their first line, not their tracebacks: the run
reports the failure itself, in one line."""
from __future__ import annotations

import logging as py_logging

from absl import logging

_QUIET_INFO = ("orbax", "tensorflow_datasets", "jax/_src/xla_bridge")
_DROPPED = ("OpenCV is not installed",)


def _keep(record: py_logging.LogRecord) -> bool:
    path = record.pathname.replace("\\", "/")
    if record.levelno < py_logging.WARNING and any(lib in path for lib in _QUIET_INFO):
        return False
    if "orbax" in path and record.exc_info:
        record.exc_info, record.exc_text = None, None
    return not any(text in str(record.msg) for text in _DROPPED)


def quiet_library_logs() -> None:
    logging.get_absl_handler().addFilter(_keep)


def format_duration(seconds: float) -> str:
    """'1h 02m', '3m 20s' or '45s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"
