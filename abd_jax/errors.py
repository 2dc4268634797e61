"""The failures a user can fix (a bad setting, missing data, a diverged loss, a busy workdir,
a full or read-only disk) and the one line that reports each: what failed and the fix."""
from __future__ import annotations

import errno
from typing import Optional

from abd_jax import checkpoint as ckpt_lib
from abd_jax import driver

FIXES = {
    errno.EROFS: "pass a --workdir on a writable disk",
    errno.EACCES: "pass a --workdir you may write to",
    errno.ENOSPC: ("free space on that disk (or move the workdir to a larger one) and rerun "
                   "the same command: it resumes from the newest checkpoint"),
}


def os_error_message(err: OSError) -> str:
    """One line: what failed, where, and the fix."""
    what = err.strerror or str(err)
    where = f" ({err.filename})" if err.filename else ""
    fix = FIXES.get(err.errno, "check that path, then rerun the same command to resume")
    return f"{what}{where}; {fix}"


def one_line(err: BaseException) -> Optional[str]:
    """`error: <what and the fix>` for a failure the user can fix; None for any other (a bug,
    whose traceback should show)."""
    if isinstance(err, (ValueError, FileNotFoundError, driver.Diverged, ckpt_lib.WorkdirBusy)):
        return f"error: {err}"
    if isinstance(err, OSError):
        return f"error: {os_error_message(err)}"
    return None
