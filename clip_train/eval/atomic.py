"""Writing a file so that readers see the old one or the new one, never half of either: a suite
or a probe cache interrupted mid-write must not leave a result that looks complete."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..file_modes import respect_umask


def atomic_write(path, write: Callable[[Any], None], binary: bool = False) -> Path:
    """Run write(file) on a temporary file beside `path`, then move it over `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # newline="" because the csv module writes its own line endings.
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="")) as f:
            write(f)
        os.replace(respect_umask(Path(tmp)), path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
