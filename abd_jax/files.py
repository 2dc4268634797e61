"""Files written whole: readers see the old content or all of the new, never part of it."""
from __future__ import annotations

import os
import pathlib
import tempfile


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file(path: os.PathLike, data: bytes | str) -> None:
    """Write `data` (str: UTF-8) to a temp file in `path`'s folder, then `os.replace` it into
    place, readable as the umask allows (not mkstemp's private 0600: results are shared). A
    file that already holds `data` is left untouched, so a rerun rewrites nothing."""
    path = pathlib.Path(path)
    data = data.encode() if isinstance(data, str) else data
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass  # not there yet (or unreadable: replaced below)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
