"""Writing a model folder made from other folders: all of it or nothing, and never over what it reads.

The folder is written beside its destination (`<out>.tmp`) and renamed into place, so an error, a full disk or
Ctrl-C leaves the old destination as it was and no partial folder behind. The destination may not be an input,
hold one or lie inside one, and an existing destination is replaced only when it looks like a model folder
(`is_model_folder`): a mistyped `out` (`runs`, `.`) is refused, not deleted.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import CheckpointError


def is_model_folder(folder: Path) -> bool:
    """Empty, or holding a config.json or weights (*.safetensors) of its own: what a model folder, a snapshot or
    a folder of parts beside the weights (a lesion finder, a reference scorer) looks like."""
    return (folder / "config.json").is_file() or any(folder.glob("*.safetensors")) or not any(folder.iterdir())


def check_destination(out: str | Path, inputs=()) -> Path:
    """`out` as a Path, or CheckpointError when writing it would touch an input or a folder that is not a
    model's."""
    out = Path(out)
    where = out.resolve()
    if not where.name:
        raise CheckpointError(f"{out}: write to a folder of its own, not the file system's root")
    for source in inputs:
        source = Path(source).resolve()
        if where == source or where in source.parents or source in where.parents:
            raise CheckpointError(f"{out}: write to a folder of its own, not over, inside or around an input "
                                  f"({source})")
    if out.exists() and not (out.is_dir() and is_model_folder(out)):
        raise CheckpointError(f"{out}: exists and is not a model folder; choose another destination or remove it")
    return out


def write_folder(out: str | Path, write: Callable[[Path], None], inputs=()) -> Path:
    """Call `write(tmp)` on a fresh `<out>.tmp`, then put it in place of `out`; returns `out`."""
    out = check_destination(out, inputs)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def copy_file_groups(groups, sources, dest: Path) -> None:
    """Copy into `dest` each group of file names (files that belong together, e.g. a scorer's config and weights)
    from the first of the `sources` folders that has every file of it; a group no source has in full is left out."""
    for group in groups:
        source = next((Path(f) for f in sources if all((Path(f) / name).is_file() for name in group)), None)
        for name in group if source is not None else ():
            shutil.copy2(source / name, dest / name)
