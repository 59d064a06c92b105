"""Catalogue II, files that lie (issue 24): a volume either loads exactly as its file describes it, or the user gets
an error that says what is wrong with it. Real files (NIfTI, MHA, NRRD, DICOM series written by SimpleITK with
DICOM tags), real named pipes, devices and symlinks; every refusal leaves a saved session byte-identical, and
through the CLI is one "error:" line, a non-zero exit and no traceback.
"""

from __future__ import annotations

import locale
import os
import shutil
import struct
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from MediRoundCore import cli
from MediRoundCore.errors import FileFormatError, MediRoundError, VolumeError
from MediRoundCore.imaging import Volume, extract_slice, load_volume, to_sitk
from MediRoundCore.session import Session
from test_reliability_catalogue import SHAPE, check_message, one_round_session, run_cli, snapshot, write_nrrd

ROOT = Path(__file__).resolve().parents[1]
SERIES_UID = "1.2.826.0.1.3680043.2.1125.24.1"
OTHER_UID = "1.2.826.0.1.3680043.2.1125.24.2"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ct_array(shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(24)
    array = rng.normal(40, 30, size=shape).astype(np.int16)
    array[:, 10:30, 12:36] = 200
    array[0, 0, 0] = -1000
    return array


@contextmanager
def kept_locale():
    """GDCM's writer, given a slice's full copied header, leaves the C library's locale at "C" (ASCII): every
    later subprocess with text=True in this pytest process would then decode as ASCII. Put it back."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def write_dicom_series(folder: Path, array: np.ndarray, uid=SERIES_UID, description="CT abdomen",
                       spacing=(0.8, 0.8, 3.0), skip=(), sizes=None) -> Path:
    """One DICOM file per slice (SimpleITK's GDCM writer), with the tags a scanner writes: series/study UIDs,
    position along z, orientation, instance number, pixel spacing. `skip`: slices left out; `sizes`: slice
    index -> a replacement 2D array of another size."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        if k in skip:
            continue
        plane = (sizes or {}).get(k, array[k])
        image = sitk.GetImageFromArray(plane)
        image.SetSpacing(spacing[:2])
        tags = {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.24", "0020|000e": uid,
                "0008|103e": description, "0020|0032": f"-20\\15\\{40 + k * spacing[2]}",
                "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(k + 1), "0008|0018": f"{uid}.{k + 1}",
                "0028|0030": f"{spacing[1]}\\{spacing[0]}", "0018|0050": str(spacing[2])}
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid.rsplit('.', 1)[1]}_{k:03d}.dcm"))
        with kept_locale():
            writer.Execute(image)
    return folder


def write_volume(path: Path, array=None, spacing=(0.9, 0.9, 3.0)) -> Path:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(ct_array() if array is None else array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def truncate(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def nifti_claiming_slices(root: Path, slices: int) -> Path:
    path = write_volume(root / "claims.nii")
    data = bytearray(path.read_bytes())
    struct.pack_into("<h", data, 40 + 2 * 3, slices)  # dim[3] of the NIfTI-1 header
    path.write_bytes(bytes(data))
    return path


def written(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


def write_gz_nrrd(path: Path) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(ct_array()), str(path), useCompression=True)
    return path


def nrrd_claiming_slices(root: Path) -> Path:
    import SimpleITK as sitk

    path = root / "claims.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(ct_array()), str(path), useCompression=False)
    path.write_bytes(path.read_bytes().replace(b"sizes: 48 40 6", b"sizes: 48 40 60", 1))
    return path


def detached(root: Path, name: str, data_suffix: str) -> Path:
    """A header-and-data pair (.mhd + .raw, .nhdr + .raw) whose data file went missing."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(ct_array()), str(root / name))
    for data in root.glob(f"{Path(name).stem}{data_suffix}"):
        data.unlink()
    return root / name


def edited_mha(root: Path, old: bytes, new: bytes) -> Path:
    import SimpleITK as sitk

    path = root / "spacing.mha"
    image = sitk.GetImageFromArray(ct_array())
    image.SetSpacing((1, 1, 3))
    sitk.WriteImage(image, str(path), useCompression=False)
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, 1))
    return path


def tilted_series(root: Path) -> Path:
    """A series whose fifth slice is tilted (another ImageOrientationPatient)."""
    import SimpleITK as sitk

    folder = write_dicom_series(root / "dicom_tilted", ct_array())
    path = sorted(folder.iterdir())[4]
    image = sitk.ReadImage(str(path))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    for key in reader.GetMetaDataKeys():
        image.SetMetaData(key, reader.GetMetaData(key))
    image.SetMetaData("0020|0037", "1\\0\\0\\0\\0.8\\0.6")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    with kept_locale():
        writer.Execute(image)
    return folder


def singular_direction(root: Path) -> Path:
    path = write_volume(root / "sheared.nrrd", ct_array().astype(np.float32))
    path.write_bytes(path.read_bytes())  # uncompressed header we edit below
    import SimpleITK as sitk

    sitk.WriteImage(sitk.ReadImage(str(path)), str(path), useCompression=False)
    head, _, body = path.read_bytes().partition(b"\n\n")
    lines = [b"space directions: (0.9,0,0) (0.9,0,0) (0,0,3)" if line.startswith(b"space directions") else line
             for line in head.split(b"\n")]
    path.write_bytes(b"\n".join(lines) + b"\n\n" + body)
    return path


def corrupt_one_slice(root: Path) -> Path:
    folder = write_dicom_series(root / "dicom_corrupt", ct_array())
    victim = sorted(folder.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:300])
    return folder


def symlink_loop(root: Path) -> Path:
    os.symlink(root / "loop_b.nrrd", root / "loop_a.nrrd")
    os.symlink(root / "loop_a.nrrd", root / "loop_b.nrrd")
    return root / "loop_a.nrrd"


def dangling(root: Path) -> Path:
    os.symlink(root / "moved_away.nrrd", root / "link.nrrd")
    return root / "link.nrrd"


def fifo(root: Path) -> Path:
    os.mkfifo(root / "scan.nrrd")
    return root / "scan.nrrd"


def two_series(root: Path) -> Path:
    folder = write_dicom_series(root / "dicom_two", ct_array())
    write_dicom_series(folder, ct_array()[:4], uid=OTHER_UID, description="CT scout")
    return folder


@dataclass
class FileCase:
    id: str
    make: Callable[[Path], Path]
    exc: type
    words: tuple[str, ...]
    series: str | None = None


FILE_CASES = [
    FileCase("nifti-truncated", lambda r: truncate(write_volume(r / "cut.nii"), 0.6), FileFormatError,
             ("cut.nii", "truncated", "of its 6 slices", "zeros")),
    FileCase("nifti-gz-truncated", lambda r: truncate(write_volume(r / "cut.nii.gz"), 0.6), FileFormatError,
             ("cut.nii.gz", "truncated", "gzip")),
    FileCase("nifti-header-claims-more-slices", lambda r: nifti_claiming_slices(r, 60), FileFormatError,
             ("claims.nii", "truncated", "60", "6 of its 60 slices")),
    FileCase("mha-truncated", lambda r: truncate(write_volume(r / "cut.mha"), 0.7), FileFormatError,
             ("cut.mha", "truncated", "bytes")),
    FileCase("nrrd-gz-truncated", lambda r: truncate(write_gz_nrrd(r / "cut.nrrd"), 0.6), FileFormatError,
             ("cut.nrrd", "truncated")),
    FileCase("nrrd-header-claims-more-slices", nrrd_claiming_slices, FileFormatError, ("claims.nrrd", "truncated")),
    FileCase("mhd-data-file-missing", lambda r: detached(r, "scan.mhd", ".raw"), FileFormatError,
             ("scan.mhd", "voxel data file", "missing")),
    FileCase("nhdr-data-file-missing", lambda r: detached(r, "scan.nhdr", ".raw"), FileFormatError,
             ("scan.nhdr", "voxel data file", "missing")),
    FileCase("nifti-gz-not-gzip", lambda r: written(r / "noise.nii.gz", b"\x1f\x8b" + bytes(range(256))),
             FileFormatError, ("noise.nii.gz", "gzip stream is corrupt")),
    FileCase("mha-zero-spacing", lambda r: edited_mha(r, b"ElementSpacing = 1 1 3", b"ElementSpacing = 0 1 3"),
             FileFormatError, ("spacing.mha", "spacing of 0")),
    FileCase("mha-header-beyond-memory", lambda r: edited_mha(r, b"DimSize = 48 40 6", b"DimSize = 90000 90000 90000"),
             FileFormatError, ("spacing.mha", "more voxels than this machine's memory")),
    FileCase("dicom-slices-not-parallel", tilted_series, VolumeError, ("dicom_tilted", "not parallel", "1_004.dcm")),
    FileCase("nrrd-singular-direction", singular_direction, FileFormatError,
             ("sheared.nrrd", "direction", "singular")),
    FileCase("dicom-missing-slice", lambda r: write_dicom_series(r / "dicom_gap", ct_array(), skip=(3,)), VolumeError,
             ("dicom_gap", "not evenly spaced", "6.00 mm", "between 1_002.dcm", "and 1_004.dcm", "1 slice(s) missing")),
    FileCase("dicom-corrupt-slice", corrupt_one_slice, VolumeError,
             ("dicom_corrupt", "not evenly spaced", "missing", "not readable DICOM", "1_003.dcm")),
    FileCase("dicom-slices-of-two-sizes",
             lambda r: write_dicom_series(r / "dicom_sizes", ct_array(), sizes={2: np.zeros((20, 24), np.int16)}),
             VolumeError, ("dicom_sizes", "differ in size", "48×40", "24×20")),
    FileCase("dicom-two-series", two_series, FileFormatError,
             ("dicom_two", "2 DICOM series", "--series", SERIES_UID, OTHER_UID, "CT scout", "4 slice(s)")),
    FileCase("dicom-series-not-there", two_series, FileFormatError, ("dicom_two", "no series '7'", OTHER_UID),
             series="7"),
    FileCase("dicom-empty-folder", lambda r: (r / "no_dicom").mkdir() or r / "no_dicom", FileFormatError,
             ("no_dicom", "no DICOM series")),
    FileCase("series-on-a-file", lambda r: write_volume(r / "one.nrrd"), FileFormatError,
             ("one.nrrd", "--series", "single file"), series="1"),
    FileCase("path-named-pipe", fifo, FileFormatError, ("scan.nrrd", "named pipe")),
    FileCase("path-symlink-loop", symlink_loop, FileFormatError, ("loop_a.nrrd", "loop of symbolic links")),
    FileCase("path-dangling-symlink", dangling, FileFormatError, ("link.nrrd", "broken symbolic link",
                                                                 "moved_away.nrrd")),
    FileCase("path-device", lambda r: Path("/dev/null"), FileFormatError, ("/dev/null", "device")),
    FileCase("path-inside-a-file", lambda r: write_volume(r / "one.nrrd") / "x.nrrd", FileFormatError,
             ("one.nrrd/x.nrrd", "not found")),
]
assert len({c.id for c in FILE_CASES}) == len(FILE_CASES)


@pytest.fixture
def saved_session(tmp_path):
    """A good volume file and its session with one saved round (what a refusal must leave untouched)."""
    path = write_nrrd(Volume(ct_array(), (0.9, 0.9, 3.0), (0, 0, 0)), tmp_path / "good.nrrd")
    volume = load_volume(path)
    return one_round_session(tmp_path / "session", volume)


@pytest.mark.parametrize("case", FILE_CASES, ids=[c.id for c in FILE_CASES])
def test_core_refuses_lying_file(case, tmp_path, saved_session):
    path = case.make(tmp_path)
    before = snapshot(saved_session)
    with pytest.raises(MediRoundError) as info:
        load_volume(path, series=case.series)
    assert type(info.value) is case.exc, f"{type(info.value).__name__}: {info.value}"
    check_message(info.value, case.words)
    assert snapshot(saved_session) == before


@pytest.mark.parametrize("case", FILE_CASES, ids=[c.id for c in FILE_CASES])
def test_cli_refuses_lying_file(case, tmp_path, saved_session, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: pytest.fail("the model must not be needed"))
    path = case.make(tmp_path)
    before = snapshot(saved_session)
    argv = ["ask", str(path), "--slice", "2", "--query", "Segment the liver.", "--session", str(saved_session)]
    code, out, err = run_cli(argv + (["--series", case.series] if case.series else []), capsys)
    assert code == 2 and "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    check_message(Exception(lines[0]), case.words)
    assert snapshot(saved_session) == before


def test_cli_subprocess_never_hangs_on_a_pipe_or_loop(tmp_path, saved_session):
    """The installed command on a named pipe nobody writes, a symlink loop and a truncated NIfTI: each answers
    at once (a pipe opened for reading would block forever)."""
    command = [str(ROOT / ".venv" / "bin" / "mediround")] if (ROOT / ".venv" / "bin" / "mediround").exists() \
        else [sys.executable, "-m", "MediRoundCore.cli"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    before = snapshot(saved_session)
    for make, words in ((fifo, ("named pipe",)), (symlink_loop, ("loop of symbolic links",)),
                        (lambda r: truncate(write_volume(r / "cut.nii.gz"), 0.5), ("truncated",))):
        path = make(tmp_path)
        done = subprocess.run(command + ["ask", str(path), "--slice", "1", "--query", "Segment the liver.",
                                         "--session", str(saved_session)],
                              capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=60, stdin=subprocess.DEVNULL)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("error: ") and all(w in done.stderr for w in words), done.stderr
    assert snapshot(saved_session) == before


# -- what loads, loads exactly ---------------------------------------------------------------------------------
def test_dicom_series_loads_exactly(tmp_path):
    array = ct_array()
    volume = load_volume(write_dicom_series(tmp_path / "dicom", array))
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.spacing, (0.8, 0.8, 3.0))
    np.testing.assert_allclose(volume.origin, (-20, 15, 40))


def test_series_is_chosen_by_number_or_uid(tmp_path):
    folder = two_series(tmp_path)
    by_number = load_volume(folder, series="2")
    by_uid = load_volume(folder, series=OTHER_UID)
    assert by_number.array.shape == by_uid.array.shape == (4,) + SHAPE[1:]
    np.testing.assert_array_equal(load_volume(folder, series=SERIES_UID).array, ct_array())


def test_cli_series_option(tmp_path, capsys, tiny_engine, monkeypatch):
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: tiny_engine)
    folder = two_series(tmp_path)
    code, out, err = run_cli(["ask", str(folder), "--series", "2", "--slice", "3", "--query", "Segment the liver.",
                              "--session", str(tmp_path / "s")], capsys)
    assert code == 0, err
    session = Session.load(tmp_path / "s", load_volume(folder, series="2").fingerprint())
    assert [r.slice_index for r in session.rounds] == [3]


def test_intact_nifti_both_ways(tmp_path):
    for name in ("ok.nii", "ok.nii.gz"):
        volume = load_volume(write_volume(tmp_path / name))
        np.testing.assert_array_equal(volume.array, ct_array())


def test_huge_finite_values_are_not_called_nan(tmp_path, tiny_engine):
    """float64 voxels near ±1e308 are finite: they load, normalise and give a round (float32 would make them
    infinite)."""
    array = np.random.default_rng(0).normal(0, 1e307, SHAPE)
    array[2, 5, 5] = 1.7e308
    array[2, 6, 6] = -1.7e308
    path = write_nrrd(Volume(array, (1, 1, 1), (0, 0, 0)), tmp_path / "huge.nrrd")
    volume = load_volume(path)
    assert volume.array.dtype == np.float64 and np.isfinite(volume.array).all()
    image = extract_slice(volume, "axial", 2)
    pixels = image.normalized()
    assert np.isfinite(pixels).all() and 0 <= pixels.min() < pixels.max() <= 1
    session = Session(volume.fingerprint(), tmp_path / "s")
    session.volume = volume
    result = tiny_engine.ask(session, "Segment the liver.", image)
    assert result.mask.shape == SHAPE[1:]
    # a NaN is still refused, named as such
    array[2, 7, 7] = np.nan
    with pytest.raises(VolumeError, match="1 NaN or infinite"):
        extract_slice(Volume(array, (1, 1, 1), (0, 0, 0)), "axial", 2).normalized()


def test_unreadable_file_says_permission(tmp_path):
    """A file this user may not read (run without the root's override of permissions)."""
    path = write_volume(tmp_path / "private.nrrd")
    path.chmod(0)
    tmp_path.chmod(0o755)
    prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"] if os.geteuid() == 0 else []
    if prefix and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    code = ("import sys\nfrom MediRoundCore.imaging import load_volume\ntry:\n    load_volume(sys.argv[1])\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)\n")
    done = subprocess.run(prefix + [sys.executable, "-c", code, str(path)], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert done.stdout.startswith("FileFormatError") and "permission denied" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("spacing, origin, direction, words", [
    ((0.0, 1.0, 1.0), (0, 0, 0), np.eye(3), ("flat", "spacing", "positive")),
    ((1.0, -2.0, 1.0), (0, 0, 0), np.eye(3), ("flat", "spacing", "-2.0")),
    ((1.0, float("nan"), 1.0), (0, 0, 0), np.eye(3), ("flat", "spacing", "nan")),
    ((1.0, 1.0, 1.0), (0, float("inf"), 0), np.eye(3), ("flat", "origin", "finite")),
    ((1.0, 1.0, 1.0), (0, 0, 0), np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1.0]]), ("flat", "direction", "singular")),
])
def test_volume_geometry_that_lies(spacing, origin, direction, words):
    """In-memory volumes (the Slicer module's, a script's) get the same geometry checks as files."""
    with pytest.raises(VolumeError) as info:
        Volume(ct_array(), spacing, origin, direction, name="flat")
    check_message(info.value, words)
