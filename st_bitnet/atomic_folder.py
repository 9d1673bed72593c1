"""Writing a model folder without losing data: never into a source, never over a non-empty folder by accident,
never half-written.

:func:`atomic_folder` builds the folder under a temporary name next to the target and renames it into place
when the writer finishes, so a kill (or an exception) leaves the previous target untouched and at most a
``.<name>.tmp-*`` folder beside it; a replaced folder keeps no stale files from before.

Example::

    with atomic_folder("out/model", overwrite=False, sources=["models/base"]) as tmp:
        model.save(str(tmp))
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

TEMP_INFIX = ".tmp-"


class OutputExistsError(FileExistsError):
    """The output folder is not empty (or is the source) and overwriting was not asked for."""


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(path: str | os.PathLike, *, overwrite: bool = False, sources: Iterable = ()) -> Path:
    """Raise unless ``path`` may receive a new folder; returns it resolved.

    Args:
        path: the output folder.
        overwrite: allow replacing a non-empty folder (never a source).
        sources: local folders the model is read from; ``path`` may not be one of them, inside one, or hold one.

    Raises:
        OutputExistsError: ``path`` is a source, or a non-empty folder without ``overwrite``.
        NotADirectoryError: ``path`` is a file.
    """
    target = Path(path).expanduser().resolve()
    for source in sources:
        if source is None or not Path(source).expanduser().exists():
            continue
        src = Path(source).expanduser().resolve()
        if _is_within(target, src) or _is_within(src, target):
            raise OutputExistsError(
                f"refusing to write {target}: it is (or contains, or is inside) the source model {src}; "
                "choose another output folder"
            )
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"output {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {target} is not empty; pass overwrite=True (CLI: --overwrite) to replace it "
            "(its current files are then removed), or choose another folder"
        )
    return target


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False, sources: Iterable = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``path``; on success it replaces ``path`` (see module docs).

    The checks of :func:`check_output` run first (and again just before the rename, in case the folder was
    filled meanwhile).
    """
    sources = list(sources)
    target = check_output(path, overwrite=overwrite, sources=sources)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TEMP_INFIX}", dir=target.parent))
    try:
        yield tmp
        check_output(target, overwrite=overwrite, sources=sources)
        if target.is_dir() and any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)  # move aside, then swap in: never a mix of old and new files
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if target.is_dir():
                target.rmdir()  # empty: nothing to lose (and Windows cannot rename onto a folder)
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
