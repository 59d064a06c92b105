"""Volumes in and out (SimpleITK), slice extraction in radiologist view, windowing, and masks back.

Conventions: arrays are numpy (k, j, i) as SimpleITK gives them; geometry is ITK's (LPS, direction columns =
voxel axes i, j, k in patient space). A slice is shown as a radiologist sees it: axial from the feet with
patient left on image right and anterior at the top; coronal from the front, superior at the top; sagittal
from the patient's left, anterior on image left. On an oblique volume the voxel plane nearest the view is used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import VolumeError

VIEWS = ("axial", "coronal", "sagittal")
# Patient (LPS) axis that is the normal of each view, and the patient axes along display columns and rows,
# each with the sign that points right / down on screen.
_VIEW_NORMAL = {"axial": 2, "coronal": 1, "sagittal": 0}
_VIEW_COLUMNS = {"axial": (0, +1), "coronal": (0, +1), "sagittal": (1, +1)}
_VIEW_ROWS = {"axial": (1, +1), "coronal": (2, -1), "sagittal": (2, -1)}
MAX_SLICE_PIXELS = 4096 * 4096
CT_WINDOW = (40.0, 400.0)  # the fallback window (level, width) of a CT slice whose region is unknown
# The windows training slices are shown with, per body region (the generator's, data/anatomy.py CT_WINDOWS; a
# model's config carries its own copy, `ct_windows`). A CT volume's region is guessed from its values.
CT_REGION_WINDOWS = {"abdomen": (40.0, 400.0), "chest": (-350.0, 1400.0), "brain": (40.0, 100.0)}
_SAMPLE_VOXELS = 1 << 21


@dataclass
class Volume:
    """A 3D scalar volume with ITK (LPS) geometry."""

    array: np.ndarray  # (k, j, i)
    spacing: tuple[float, float, float]  # (i, j, k) in mm
    origin: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))  # columns: i, j, k axes in LPS
    modality: str | None = None
    name: str = "volume"
    region: str | None = None  # CT body region ("chest", "abdomen", "brain"): picks the window; guessed if None
    window: tuple[float, float] | None = None  # an explicit CT window (level, width) for every slice

    def __post_init__(self):
        self.array = validate_volume_array(self.array, self.name)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        self.spacing, self.origin = validate_geometry(self.spacing, self.origin, self.direction, self.name)
        if self.modality is None:
            self.modality = guess_modality(self.array)
        if self.modality == "CT" and self.region is None and self.window is None:
            self.region = guess_ct_region(self.array)

    @classmethod
    def from_ijk_to_ras(cls, array: np.ndarray, ijk_to_ras: np.ndarray, **kwargs) -> "Volume":
        """From a Slicer-style array (k, j, i) and its 4×4 IJK→RAS matrix."""
        m = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
        lps = np.diag([-1.0, -1.0, 1.0]) @ m[:3, :3]
        spacing = np.linalg.norm(lps, axis=0)
        if np.any(spacing <= 0):
            raise VolumeError("IJK→RAS matrix has a zero-length axis")
        origin = np.diag([-1.0, -1.0, 1.0]) @ m[:3, 3]
        return cls(array, tuple(spacing), tuple(origin), lps / spacing, **kwargs)

    def ijk_to_lps(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.direction * np.asarray(self.spacing)
        m[:3, 3] = self.origin
        return m

    def fingerprint(self) -> str:
        """Size, spacing, origin, direction and a hash of the voxels: identifies the volume of a session."""
        h = hashlib.sha256()
        h.update(str(self.array.shape).encode() + str(self.array.dtype).encode())
        h.update(np.round(np.r_[self.spacing, self.origin, self.direction.ravel()], 4).astype(np.float64).tobytes())
        h.update(np.ascontiguousarray(self.array).tobytes())
        return h.hexdigest()[:16]

    def view_axis(self, view: str) -> int:
        """The voxel axis (0=i, 1=j, 2=k) nearest to the normal of `view`."""
        if view not in VIEWS:
            raise VolumeError(f"unknown view {view!r}; expected one of {', '.join(VIEWS)}")
        return int(np.argmax(np.abs(self.direction[_VIEW_NORMAL[view], :])))

    def num_slices(self, view: str) -> int:
        return self.array.shape[2 - self.view_axis(view)]


@dataclass
class SliceImage:
    """One voxel plane of a volume, oriented for display. `pixels` are raw values (HU for CT)."""

    pixels: np.ndarray  # (rows, cols) float32 (float64 beyond float32's range) in display orientation
    view: str
    index: int  # voxel index along `axis`
    axis: int  # voxel axis 0=i, 1=j, 2=k
    transpose: bool  # display = transpose(plane) before flips
    flip_rows: bool
    flip_cols: bool
    modality: str = "CT"
    spacing: tuple[float, float] = (1.0, 1.0)  # (row, col) mm
    region: str | None = None  # CT body region of the volume (picks the window)
    window: tuple[float, float] | None = None  # explicit CT window (level, width); wins over the region's
    # the slice centre's patient coordinates (mm) along the display's down and right directions; None: unknown
    centre_mm: tuple[float, float] | None = None

    def to_plane(self, mask: np.ndarray) -> np.ndarray:
        """A display-oriented 2D mask back into the array plane (order of the remaining array axes)."""
        m = mask
        if self.flip_cols:
            m = m[:, ::-1]
        if self.flip_rows:
            m = m[::-1, :]
        if self.transpose:
            m = m.T
        return np.ascontiguousarray(m)

    def frame_extent(self, fields_mm: dict | None) -> tuple[float, float] | None:
        """The slice's physical height and width as shares of a model's field of view for its region
        (`MediRoundConfig.field_of_view_mm`), or None when the model has none or the region is unknown (MR):
        then the slice fills the model's frame (`model/processing.py: frame_shares`)."""
        field_mm = (fields_mm or {}).get(self.region) if self.region else None
        if not field_mm:
            return None
        rows, cols = np.shape(self.pixels)
        return rows * float(self.spacing[0]) / field_mm, cols * float(self.spacing[1]) / field_mm

    def frame_shift(self, fields_mm: dict | None) -> tuple[float, float] | None:
        """The slice centre's offset from the patient origin, down and right, as shares of the model's field for
        its region (`model/field_placement.py`), or None when `frame_extent` is None or the position unknown."""
        field_mm = (fields_mm or {}).get(self.region) if self.region else None
        if not field_mm or self.centre_mm is None:
            return None
        return float(self.centre_mm[0]) / field_mm, float(self.centre_mm[1]) / field_mm

    def ct_window(self, windows: dict | None = None) -> tuple[float, float] | None:
        """The (level, width) this slice is shown with: the explicit window, else its region's in `windows`
        (a model's training windows; default CT_REGION_WINDOWS), else CT_WINDOW; None unless CT."""
        if self.modality != "CT":
            return None
        if self.window is not None:
            return tuple(map(float, self.window))
        table = CT_REGION_WINDOWS if windows is None else windows
        return tuple(map(float, table.get(self.region, CT_WINDOW) if self.region else CT_WINDOW))

    def normalized(self, windows: dict | None = None) -> np.ndarray:
        """The slice in [0,1]: CT through `ct_window(windows)`, MR by percentiles."""
        try:
            return normalize_intensity(self.pixels, self.modality, self.ct_window(windows) or CT_WINDOW)
        except VolumeError as exc:  # name the slice
            raise VolumeError(f"{self.view} slice {self.index}: {exc}") from None


def validate_volume_array(array, name: str = "volume") -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3:
        raise VolumeError(f"{name}: expected a 3D scalar volume, got an array of shape {array.shape}"
                          + (" (RGB or multi-component volumes are not supported)" if array.ndim == 4 else ""))
    if array.size == 0:
        raise VolumeError(f"{name}: the volume is empty (shape {array.shape})")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating) or array.dtype == bool):
        raise VolumeError(f"{name}: unsupported voxel type {array.dtype}")
    return array


def validate_geometry(spacing, origin, direction: np.ndarray, name: str = "volume"):
    """(spacing, origin) as float tuples, or a VolumeError: spacing finite and > 0, origin finite, direction
    finite and not singular."""
    try:
        spacing = tuple(float(v) for v in spacing)
        origin = tuple(float(v) for v in origin)
    except (TypeError, ValueError):
        raise VolumeError(f"{name}: spacing and origin must be three numbers each, got {spacing!r}, "
                          f"{origin!r}") from None
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise VolumeError(f"{name}: voxel spacing {spacing} is not three positive numbers (mm); fix the spacing")
    if len(origin) != 3 or not all(np.isfinite(origin)):
        raise VolumeError(f"{name}: origin {origin} is not three finite numbers (mm)")
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise VolumeError(f"{name}: the direction matrix (axis orientation) is singular or not finite "
                          f"({np.round(direction, 4).tolist()}): two axes point the same way or one has zero length")
    return spacing, origin


def _sample(array: np.ndarray) -> np.ndarray:
    """Up to ~2 M voxels of the volume (an even stride), as float64."""
    flat = np.asarray(array).ravel()
    step = max(1, flat.size // _SAMPLE_VOXELS)
    return flat[::step].astype(np.float64)


def _without_fill(x: np.ndarray) -> np.ndarray | None:
    """The voxels of a CT-like sample without scanner fill: values below -1100 HU occur in a CT only as
    padding outside the reconstructed field of view (-3024, -2048, -2000, ...), a few distinct values.
    None when the values below -1100 are many distinct ones (not a fill: not Hounsfield units)."""
    below = x < -1100
    if not below.any():
        return x
    if np.unique(x[below]).size > 3:
        return None
    return x[~below]


def guess_modality(array: np.ndarray) -> str:
    """CT when the values look like Hounsfield units whatever the scanner's fill value: apart from the fill,
    ≥ 99 % of voxels in [-1100, 4000] HU, ≥ 1 % air or lung (≤ -500 HU: outside the body, lungs, bowel
    gas) and ≥ 5 % fat or soft tissue ([-200, 300] HU). Otherwise MR (bool and uint8 arrays are never HU)."""
    array = np.asarray(array)
    if array.dtype == bool or array.dtype == np.uint8:
        return "MR"
    x = _without_fill(_sample(array))
    if x is None or x.size == 0 or not np.all(np.isfinite(x)):
        return "MR"
    in_range = np.mean((x >= -1100) & (x <= 4000))
    air = np.mean(x <= -500)
    tissue = np.mean((x >= -200) & (x <= 300))
    return "CT" if in_range >= 0.99 and air >= 0.01 and tissue >= 0.05 else "MR"


def guess_ct_region(array: np.ndarray) -> str:
    """The body region of a CT volume, for its window: "chest" when lung ([-950, -600] HU) is ≥ 5 % of the
    voxels (fill excluded); "brain" when the body (> -500 HU) holds ≥ 3 % bone (> 300 HU) and < 5 % fat
    ([-200, -30] HU): a skull around brain; else "abdomen"."""
    x = _without_fill(_sample(array))
    if x is None or x.size == 0:
        return "abdomen"
    if np.mean((x > -950) & (x < -600)) >= 0.05:
        return "chest"
    body = x[x > -500]
    if body.size and np.mean(body > 300) >= 0.03 and np.mean((body >= -200) & (body < -30)) < 0.05:
        return "brain"
    return "abdomen"


def normalize_intensity(pixels: np.ndarray, modality: str = "CT", window: tuple[float, float] = CT_WINDOW) -> np.ndarray:
    """Raw slice → float32 [0,1]: CT by a window (level, width), MR by its 0.5–99.5 percentiles,
    "normalized" (values already in [0,1], e.g. PNG datasets) by clipping only.
    NaN/Inf voxels are an error; a constant image maps to zeros."""
    x = np.asarray(pixels)
    if x.ndim != 2 or min(x.shape) < 1:
        raise VolumeError(f"expected a 2D slice, got shape {x.shape}")
    if x.size > MAX_SLICE_PIXELS:
        raise VolumeError(f"slice of {x.shape[0]}×{x.shape[1]} pixels is larger than the supported "
                          f"{int(MAX_SLICE_PIXELS ** 0.5)}² (resample the volume first)")
    if x.dtype == bool:
        x = x.astype(np.float32)
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise VolumeError(f"slice contains {int((~np.isfinite(x)).sum())} NaN or infinite voxel value(s)")
    if modality == "normalized":  # already display values in [0, 1]
        return np.clip(x, 0.0, 1.0).astype(np.float32)
    if modality == "CT":
        level, width = window
        lo, hi = level - width / 2, level + width / 2
    else:
        peak = float(np.max(np.abs(x)))
        if peak > 1e300:  # keep hi - lo finite (±1e308 values): percentiles do not depend on the scale
            x = x / peak
        lo, hi = np.percentile(x, [0.5, 99.5])
    if hi <= lo:
        return np.zeros(x.shape, np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def as_slice_pixels(plane) -> np.ndarray:
    """A slice's pixels as float32, or float64 where finite values lie beyond float32's range (±3.4e38) and would
    otherwise turn into infinities."""
    plane = np.asarray(plane)
    wide = plane.dtype == np.float64 and bool(np.any(np.abs(plane[np.isfinite(plane)]) > np.finfo(np.float32).max))
    return np.ascontiguousarray(plane, dtype=np.float64 if wide else np.float32)


def extract_slice(volume: Volume, view: str, index: int) -> SliceImage:
    """The voxel plane `index` along the axis nearest the view normal, oriented as a radiologist sees it."""
    axis = volume.view_axis(view)
    n = volume.array.shape[2 - axis]
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
        raise VolumeError(f"slice index must be a whole number, got {index!r}")
    if not 0 <= index < n:
        raise VolumeError(f"slice index {index} is out of range for the {view} view (0..{n - 1})")
    plane = np.take(volume.array, int(index), axis=2 - axis)  # remaining array axes, in array order
    in_plane = [a for a in (2, 1, 0) if a != axis]  # voxel axes of plane rows, cols (array order k,j,i minus axis)
    row_axis, col_axis = in_plane
    col_patient, col_sign = _VIEW_COLUMNS[view]
    # Which in-plane voxel axis goes along the display columns: the one most aligned with that patient axis.
    d = volume.direction
    transpose = abs(d[col_patient, row_axis]) > abs(d[col_patient, col_axis])
    if transpose:
        plane = plane.T
        row_axis, col_axis = col_axis, row_axis
    row_patient, row_sign = _VIEW_ROWS[view]
    flip_cols = np.sign(d[col_patient, col_axis]) != col_sign
    flip_rows = np.sign(d[row_patient, row_axis]) != row_sign
    if flip_rows:
        plane = plane[::-1, :]
    if flip_cols:
        plane = plane[:, ::-1]
    spacing = (float(volume.spacing[row_axis]), float(volume.spacing[col_axis]))
    return SliceImage(as_slice_pixels(plane), view, int(index), axis, bool(transpose),
                      bool(flip_rows), bool(flip_cols), volume.modality, spacing, volume.region, volume.window,
                      _display_centre_mm(volume, axis, int(index), row_axis, col_axis, flip_rows, flip_cols))


def _display_centre_mm(volume: Volume, axis: int, index: int, row_axis: int, col_axis: int, flip_rows: bool,
                       flip_cols: bool) -> tuple[float, float]:
    """The patient coordinates (mm) of a displayed slice's centre along its down and right directions: the
    centre voxel position projected on the in-plane voxel axes as the display orients them."""
    size = volume.array.shape[::-1]  # voxels along i, j, k
    ijk = [(n - 1) / 2.0 for n in size]
    ijk[axis] = float(index)
    centre = volume.ijk_to_lps() @ np.r_[ijk, 1.0]
    down = volume.direction[:, row_axis] * (-1.0 if flip_rows else 1.0)
    right = volume.direction[:, col_axis] * (-1.0 if flip_cols else 1.0)
    return float(centre[:3] @ down), float(centre[:3] @ right)


def mask_into_volume(volume: Volume, slice_image: SliceImage, mask: np.ndarray) -> np.ndarray:
    """A (k, j, i) uint8 label array, zero except `mask` on the slice's voxel plane."""
    out = np.zeros(volume.array.shape, np.uint8)
    idx = [slice(None)] * 3
    idx[2 - slice_image.axis] = slice_image.index
    out[tuple(idx)] = slice_image.to_plane(mask.astype(bool)).astype(np.uint8)
    return out


# -- files ----------------------------------------------------------------------------------------------
def load_volume(path: str | Path, modality: str | None = None, series: str | None = None) -> Volume:
    """NRRD / NIfTI / MHA file, or a DICOM series folder, through SimpleITK. A volume loads exactly as its file
    describes it, or a FileFormatError / VolumeError says what is wrong with it (volume_files.py)."""
    from .volume_files import read_image

    path = Path(path)
    image = read_image(path, series)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or "
                          f"vector image); a scalar volume is needed")
    if image.GetDimension() != 3:
        raise VolumeError(f"{path}: is {image.GetDimension()}D; a 3D volume is needed")
    import SimpleITK as sitk

    return Volume(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(),
                  np.asarray(image.GetDirection()).reshape(3, 3), modality=modality, name=path.name)


def to_sitk(volume: Volume, array: np.ndarray | None = None):
    """A SimpleITK image with the volume's geometry (and its voxels, or `array`)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume.array if array is None else array)
    image.SetSpacing(tuple(float(s) for s in volume.spacing))
    image.SetOrigin(tuple(float(o) for o in volume.origin))
    image.SetDirection(tuple(float(v) for v in volume.direction.ravel()))
    return image
