"""File modes as a plain ``open()`` or ``mkdir()`` would give them: temporary files and folders
(``tempfile``) are private (0600 / 0700) whatever the umask, so a model or report written through
one would be unreadable by the rest of a team on a shared filesystem."""
from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask can only be
    read by setting it, which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def respect_umask(path: Path) -> Path:
    """Give ``path`` (a file, or a folder and everything in it) the modes the umask allows."""
    mask = current_umask()
    path = Path(path)
    targets = [path, *path.rglob("*")] if path.is_dir() else [path]
    for target in targets:
        if target.is_symlink():
            continue
        target.chmod((0o777 if target.is_dir() else 0o666) & ~mask)
    return path
