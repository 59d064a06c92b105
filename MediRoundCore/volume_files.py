"""Reading a volume file or DICOM folder so that it loads exactly as described, or is refused with what is wrong.

SimpleITK alone loads some damaged files silently: a truncated NIfTI (plain or gzipped) or one whose header
claims more slices than it holds comes back zero-filled; a DICOM series with a missing or unreadable slice
comes back with a stretched spacing; a folder of several series yields one of them unannounced. So, before
SimpleITK reads:
- the path is checked with os.stat (a named pipe, device or socket would block or make no sense; a symlink loop
  or a dangling link is said as such);
- a NIfTI header's voxel count is compared with the data the file holds;
- a DICOM folder's series are listed (several: the caller chooses one, by number or SeriesInstanceUID), and its
  slices checked for one size and even spacing along the slice normal (a gap is named by its files).
ITK's own messages (some go to stderr only) are captured and summarised.
"""

from __future__ import annotations

import errno
import gzip
import os
import re
import stat
import struct
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import FileFormatError, VolumeError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def read_image(path: Path, series: str | None = None):
    """A SimpleITK image of `path` (file or DICOM folder)."""
    kind = check_path(path)
    if kind == "dir":
        return read_dicom_folder(path, series)
    if series is not None:
        raise FileFormatError(f"{path}: --series chooses a series in a DICOM folder; this is a single file")
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        check_nifti(path)
    return _itk_read(path, lambda sitk: sitk.ReadImage(str(path)))


# -- the path ---------------------------------------------------------------------------------------------
def check_path(path: Path) -> str:
    """"file" or "dir", or a FileFormatError for anything that cannot be a volume (never opens it)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileFormatError(f"{path}: a loop of symbolic links (the link points back to itself); point "
                                  f"it at the volume file") from None
        if exc.errno == errno.ENOENT:
            if os.path.islink(path):
                raise FileFormatError(f"{path}: broken symbolic link (its target {os.readlink(path)!r} does not "
                                      f"exist)") from None
            raise FileFormatError(f"{path}: file not found") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise FileFormatError(f"{path}: permission denied; the file cannot be read by this user") from None
        if exc.errno == errno.ENOTDIR:
            raise FileFormatError(f"{path}: file not found (a part of the path is a file, not a folder)") from None
        raise FileFormatError(f"{path}: cannot be opened ({exc.strerror})") from None
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISFIFO(mode):
        raise FileFormatError(f"{path}: is a named pipe (FIFO), not a volume file; reading it would wait for a "
                              f"writer. Save the volume to a regular file first")
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise FileFormatError(f"{path}: is a device, not a volume file")
    if stat.S_ISSOCK(mode):
        raise FileFormatError(f"{path}: is a socket, not a volume file")
    if not stat.S_ISREG(mode):
        raise FileFormatError(f"{path}: is not a regular file")
    if st.st_size == 0:
        raise FileFormatError(f"{path}: the file is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise FileFormatError(f"{path}: permission denied; the file cannot be read by this user")
    return "file"


# -- NIfTI ------------------------------------------------------------------------------------------------
_NIFTI_TYPES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                1536: 16, 1792: 16, 2048: 32, 2304: 4}  # datatype code -> bytes per voxel


def check_nifti(path: Path) -> None:
    """Refuse a NIfTI-1/2 file whose voxel data is shorter than its header says (truncated, or a header that
    claims more slices than the file holds)."""
    gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as handle:
            header = handle.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise FileFormatError(f"{path}: cannot read as a medical image volume: the gzip stream is corrupt "
                              f"({exc})") from None
    parsed = _nifti_header(header)
    if parsed is None:
        return  # not a NIfTI header we know: SimpleITK says what it makes of it
    dims, bytes_per_voxel, offset, single_file = parsed
    if not single_file:
        return  # .hdr/.img pair: the data is in another file
    if not 1 <= dims[0] <= 7 or any(n < 1 for n in dims[1:dims[0] + 1]):
        shown = list(dims[:dims[0] + 1]) if 0 <= dims[0] <= 7 else list(dims)
        raise FileFormatError(f"{path}: corrupt NIfTI header (dimensions {shown})")
    sizes = dims[1:dims[0] + 1]
    needed = int(np.prod(sizes, dtype=np.int64)) * bytes_per_voxel
    held = _data_bytes(path, gz) - offset
    if held < needed:
        per_slice = needed // sizes[2] if len(sizes) >= 3 else needed
        slices = f" (data for {max(held, 0) // per_slice} of its {sizes[2]} slices)" if len(sizes) >= 3 else ""
        raise FileFormatError(f"{path}: the file is truncated: its header describes {' × '.join(map(str, sizes))} "
                              f"voxels ({needed} bytes) but the file holds {max(held, 0)} bytes of voxel data"
                              f"{slices}; the missing voxels would read as zeros. Copy the file again")


def _nifti_header(header: bytes):
    """(dims, bytes per voxel, data offset, single file) of a NIfTI-1 or -2 header, or None."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "hh", header[70:74])
            offset = struct.unpack(endian + "f", header[108:112])[0]
            magic = header[344:348]
            size = _NIFTI_TYPES.get(datatype, max(bitpix, 8) // 8)
            return dims, size, max(int(offset), 352), magic.startswith(b"n+1")
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "hh", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            magic = header[4:12]
            size = _NIFTI_TYPES.get(datatype, max(bitpix, 8) // 8)
            return dims, size, max(int(offset), 544), magic.startswith(b"n+2")
    return None


def _data_bytes(path: Path, gz: bool) -> int:
    """Bytes the (decompressed) file holds; a gzip stream that ends early is truncated."""
    if not gz:
        return path.stat().st_size
    total = 0
    try:
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(1 << 16):
                total += len(chunk)
    except EOFError:
        raise FileFormatError(f"{path}: the file is truncated: its gzip stream ends early (an interrupted copy "
                              f"or download?); copy the file again") from None
    except (OSError, zlib.error) as exc:
        raise FileFormatError(f"{path}: the gzip stream is corrupt after {total} bytes ({exc})") from None
    return total


# -- DICOM ------------------------------------------------------------------------------------------------
def read_dicom_folder(folder: Path, series: str | None):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    ids = list(_itk_read(folder, lambda _: reader.GetGDCMSeriesIDs(str(folder))))
    if not ids:
        raise FileFormatError(f"{folder}: folder holds no DICOM series")
    listing = [(uid, list(reader.GetGDCMSeriesFileNames(str(folder), uid))) for uid in ids]
    if series is None and len(ids) > 1:
        lines = "; ".join(f"{n}: {uid} ({_describe_series(files)})" for n, (uid, files) in enumerate(listing, 1))
        raise FileFormatError(f"{folder}: the folder holds {len(ids)} DICOM series; choose one with --series "
                              f"NUMBER or --series UID: {lines}")
    if series is None:
        uid, names = listing[0]
    else:
        chosen = [item for n, item in enumerate(listing, 1) if series in (str(n), item[0])]
        if not chosen:
            raise FileFormatError(f"{folder}: no series {series!r} here; the folder's series are "
                                  + "; ".join(f"{n}: {uid}" for n, (uid, _) in enumerate(listing, 1)))
        uid, names = chosen[0]
    check_dicom_slices(folder, names, [f for _, files in listing for f in files])
    reader.SetFileNames(names)
    return _itk_read(folder, lambda _: reader.Execute())


def _header(file: str) -> dict[str, str]:
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(file)
    r.ReadImageInformation()
    return {k: r.GetMetaData(k).strip() for k in r.GetMetaDataKeys()}


def _describe_series(files: list[str]) -> str:
    try:
        h = _header(files[0])
    except RuntimeError:
        return f"{len(files)} file(s)"
    parts = [h.get("0008|0060", ""), h.get("0008|103e", ""), f"{len(files)} slice(s)",
             f"{h.get('0028|0011', '?')}×{h.get('0028|0010', '?')}"]
    return ", ".join(p for p in parts if p)


def _floats(text: str | None, n: int):
    try:
        values = [float(v) for v in (text or "").split("\\")]
    except ValueError:
        return None
    return np.asarray(values) if len(values) == n and np.all(np.isfinite(values)) else None


def check_dicom_slices(folder: Path, names: list[str], in_series: list[str]) -> None:
    """One size for every slice, and slices evenly spaced along their normal (a gap is refused, named by the
    files on both sides)."""
    headers = []
    for name in names:
        try:
            headers.append(_header(name))
        except RuntimeError as exc:
            raise FileFormatError(f"{name}: unreadable DICOM slice ({_summary(str(exc))})") from None
    sizes = {(h.get("0028|0011"), h.get("0028|0010")) for h in headers}
    if len(sizes) > 1:
        by_size = {}
        for name, h in zip(names, headers):
            by_size.setdefault((h.get("0028|0011"), h.get("0028|0010")), []).append(Path(name).name)
        detail = "; ".join(f"{c}×{r}: {len(files)} slice(s), e.g. {files[0]}" for (c, r), files in by_size.items())
        raise VolumeError(f"{folder}: the series' slices differ in size ({detail}); a volume needs slices of one "
                          f"size")
    if len(names) < 3:
        return
    orientation = _floats(headers[0].get("0020|0037"), 6)
    positions = [_floats(h.get("0020|0032"), 3) for h in headers]
    if orientation is None or any(p is None for p in positions):
        return  # no geometry to check (e.g. secondary capture): SimpleITK stacks them
    for name, h in zip(names, headers):
        other = _floats(h.get("0020|0037"), 6)
        if other is not None and np.max(np.abs(other - orientation)) > 1e-3:
            raise VolumeError(f"{folder}: the slices are not parallel: {Path(name).name} has orientation "
                              f"{np.round(other, 3).tolist()}, {Path(names[0]).name} "
                              f"{np.round(orientation, 3).tolist()}; a volume needs one orientation")
    normal = np.cross(orientation[:3], orientation[3:])
    z = np.asarray([float(p @ normal) for p in positions])
    order = np.argsort(z)
    z, files = z[order], [names[i] for i in order]
    steps = np.diff(z)
    step = float(np.median(steps))
    if step <= 1e-6:
        raise VolumeError(f"{folder}: several slices lie at one position ({Path(files[0]).name} and "
                          f"{Path(files[1]).name} at {z[0]:.2f} mm); the series is not one volume")
    uneven = np.flatnonzero(np.abs(steps - step) > max(0.01 * step, 1e-3))
    if len(uneven):
        i = int(uneven[0])
        others = sorted(p.name for p in folder.iterdir()
                        if p.is_file() and str(p) not in set(in_series) and not p.name.startswith("."))
        unreadable = f"; files in the folder that are not readable DICOM of any series: {', '.join(others[:5])}" \
            if others else ""
        missing = round(steps[i] / step) - 1
        what = f"{missing} slice(s) missing" if missing >= 1 and abs(steps[i] - (missing + 1) * step) < 0.05 * step \
            else "uneven spacing"
        raise VolumeError(f"{folder}: the slices are not evenly spaced: {steps[i]:.2f} mm between "
                          f"{Path(files[i]).name} (at {z[i]:.2f} mm) and {Path(files[i + 1]).name} (at "
                          f"{z[i + 1]:.2f} mm) where the others are {step:.2f} mm apart ({what}){unreadable}. "
                          f"A volume needs the complete series")


# -- SimpleITK's messages ------------------------------------------------------------------------------------
@contextmanager
def _captured_stderr(box: list):
    """ITK writes some reasons (and warnings) to the process's stderr only: collect them instead."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box.append(tmp.read().decode(errors="replace"))


def _itk_read(path: Path, read):
    import SimpleITK as sitk

    box: list[str] = []
    try:
        with _captured_stderr(box):
            return read(sitk)
    except RuntimeError as exc:
        raise FileFormatError(f"{path}: cannot read as a medical image volume: "
                              f"{_read_failure(str(exc), ''.join(box))}") from None


def _summary(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "unknown reason"


def _read_failure(message: str, stderr: str = "") -> str:
    """The cause of a SimpleITK read failure in words (truncated data, unknown format, bad geometry)."""
    text = " ".join(line.strip() for line in (message + "\n" + stderr).splitlines() if line.strip())
    if "Unable to determine ImageIO reader" in text:
        return "not a recognised image format (NRRD, NIfTI, MHA, DICOM, …)"
    m = re.search(r"ideal = (\d+) : actual = (\d+)", text)
    if m:
        return (f"the file is truncated: its voxel data is shorter than its header says ({m.group(2)} of "
                f"{m.group(1)} bytes)")
    if re.search(r"fread got only|expected \d+ bytes but received|premature|unexpected end|truncat|"
                 r"data not read completely", text, re.I):
        return f"the file is truncated: its voxel data is shorter than its header says ({_summary(message)[:160]})"
    if re.search(r"Cannot open data file|ElementDataFile|nrrdIoStateDataFileIterNext", text):
        return ("the voxel data file its header names (e.g. the .raw of an .mhd, the data file of an .nhdr) is "
                "missing or unreadable; keep the two files together")
    if re.search(r"Zero-valued spacing", text):
        return ("the header gives a voxel spacing of 0 (or one that is not a number) along an axis, so the voxels "
                "have no size; fix the spacing in the header")
    if re.search(r"Failed to allocate memory|bad_alloc|MemoryError", text):
        return ("its header describes more voxels than this machine's memory holds (a wrong size in the header, "
                "or a volume to crop or resample first)")
    if re.search(r"determinant is 0|Bad direction", text):
        return ("the header's direction matrix (the axes' orientation, e.g. NRRD 'space directions') is singular: "
                "two axes point the same way or one has zero length, so the voxels have no valid position in "
                "space; fix the orientation in the header")
    if re.search(r"orthonormal direction cosines|not orthonormal", text, re.I):
        return "the header's direction cosines are not orthonormal (a sheared or invalid orientation)"
    m = re.search(r"ITK ERROR: [^:]*\): (.*)", text)
    detail = m.group(1) if m else _summary(message)
    return f"corrupt or unsupported file ({detail[:300]})"
