"""Synthetic CT-like and MR-like anatomy: 2D slices and 3D volumes with exact instance masks.

Slices come out in radiologist display orientation (axial, seen from the feet): patient LEFT on
image RIGHT, anterior at the top. Every instance records its patient side from its centroid in
patient coordinates (never from array order). Volumes are SimpleITK images in LPS with arbitrary
spacing, origin and (axis-flipping) direction; anatomy is placed in physical space, so left and right
stay correct whatever the direction matrix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from .scene import REGIONS, Scene, Structure, build_scene
from .shapes import erode, gaussian_blur, smooth_field

MODALITIES = ("CT", "MR")
FOV_MM = {"abdomen": 380.0, "chest": 380.0, "brain": 230.0}
CT_WINDOWS = {"abdomen": (40.0, 400.0), "chest": (-350.0, 1400.0), "brain": (40.0, 100.0)}
CT_NOISE_HU = {"abdomen": 40.0, "chest": 40.0, "brain": 12.0}  # noise sd at noise_level 1
MIN_AREA_PX = 12
SIDE_MARGIN = 0.05  # |u| below this (normalised) is "on the midline": side None


@dataclass
class Instance:
    """One segmentable structure on a slice: exact mask and what the dialogue generator needs to know."""

    name: str
    noun: str
    kind: str
    parent: str | None
    side: str | None          # "left" / "right" (patient side) or None on the midline
    mask: np.ndarray          # bool (H, W)
    centroid: tuple[float, float]  # normalised patient (u: +left, v: +posterior)
    area: int
    group: str | None = None
    function: str | None = None
    function_fact: str | None = None


@dataclass
class AnatomySlice:
    """A generated 2D slice: raw intensities (HU for CT), display image in [0, 1] and instances."""

    image: np.ndarray         # float32 (H, W): HU for CT, arbitrary units for MR
    instances: list[Instance]
    region: str
    modality: str
    seed: int
    spacing_mm: float
    params: dict = field(default_factory=dict)

    def instance(self, name: str) -> Instance:
        for inst in self.instances:
            if inst.name == name:
                return inst
        raise KeyError(f"no instance {name!r} on this slice")

    def display(self) -> np.ndarray:
        """The image windowed to [0, 1] as a radiologist would view it (CT window, MR percentiles)."""
        return window(self.image, self.modality, self.region)


def window(image: np.ndarray, modality: str, region: str) -> np.ndarray:
    """CT: the region's window (level, width); MR: 0.5-99.5 percentiles. Result float32 in [0, 1]."""
    if modality == "CT":
        level, width = CT_WINDOWS[region]
        lo, hi = level - width / 2, level + width / 2
    else:
        lo, hi = np.percentile(image, [0.5, 99.5])
        hi = hi if hi > lo else lo + 1.0
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _masks(scene: Scene, u: np.ndarray, v: np.ndarray, w: np.ndarray | float) -> dict[str, np.ndarray]:
    """Masks of all structures: children clipped to parents, instance siblings made disjoint."""
    masks: dict[str, np.ndarray] = {}
    occupied: dict[str | None, np.ndarray] = {}
    for st in scene.structures:
        m = np.zeros(u.shape, dtype=bool)
        for blob in st.blobs:
            m |= blob.inside(u, v, w)
        for blob in st.minus:
            m &= ~blob.inside(u, v, w)
        for name in st.clip_to:
            m &= masks[name]
        if st.halfspace is not None:
            nu, nv, c = st.halfspace
            m &= nu * u + nv * v > c
        if st.parent is not None:
            m &= masks[st.parent]
        if st.is_instance:
            taken = occupied.setdefault(st.parent, np.zeros(u.shape, dtype=bool))
            m &= ~taken
            taken |= m
        masks[st.name] = m
    return masks


def _tissue_value(st: Structure, modality: str, contrast: float, rng: np.random.Generator) -> float:
    base = st.ct if modality == "CT" else st.mr
    if modality == "CT":
        base += float(rng.normal(0, 6))
        if -200 < base < 400:
            base = 40.0 + contrast * (base - 40.0)
    else:
        base *= float(rng.uniform(0.93, 1.07))
        if base > 100:
            base = 400.0 + contrast * (base - 400.0)
    return base


def _paint(scene: Scene, masks: dict[str, np.ndarray], modality: str, rng: np.random.Generator, *,
           contrast: float, noise_level: float, blur: float) -> np.ndarray:
    """Intensities from tissue values, texture, rims, partial-volume blur, bias field (MR) and noise."""
    shape = next(iter(masks.values())).shape
    image = np.full(shape, -1000.0 if modality == "CT" else 5.0)
    texture = smooth_field(rng, shape, scale=3.0)
    for st in scene.structures:
        m = masks[st.name]
        if not m.any():
            continue
        value = _tissue_value(st, modality, contrast, rng)
        amp = st.texture * (150.0 if modality == "CT" else value)
        image[m] = value + amp * texture[m]
        if st.rim is not None:
            rim_ct, rim_mr, width = st.rim
            rim_value = rim_ct if modality == "CT" else rim_mr
            if modality == "CT" and -200 < rim_value < 400:
                rim_value = 40.0 + contrast * (rim_value - 40.0)
            edge = m & ~erode(m, width)
            image[edge] = rim_value + amp * texture[edge]
    image = gaussian_blur(image, blur)
    if modality == "CT":
        image = image + rng.normal(0, CT_NOISE_HU[scene.region] * noise_level, shape)
        return np.clip(image, -1024, 3071).astype(np.float32)
    image = image * (1.0 + 0.12 * smooth_field(rng, shape, scale=40.0))
    sd = 60.0 * noise_level
    image = np.hypot(image + rng.normal(0, sd, shape), rng.normal(0, sd, shape))
    return image.astype(np.float32)


def _side(cu: float) -> str | None:
    if cu > SIDE_MARGIN:
        return "left"
    if cu < -SIDE_MARGIN:
        return "right"
    return None


def _final_names(scene: Scene, sizes: dict[str, int], min_size: int) -> dict[str, str]:
    """Entity names: lesions become "cyst in the left kidney" or "larger/smaller ..." by size; tiny ones drop."""
    names: dict[str, str] = {}
    groups: dict[tuple[str, str], list[str]] = {}
    for st in scene.structures:
        if not st.is_instance:
            continue
        if sizes[st.name] < min_size:
            continue
        if "#" in st.name:
            groups.setdefault((st.noun, st.parent), []).append(st.name)
        else:
            names[st.name] = st.name
    for (noun, parent), members in groups.items():
        if len(members) == 1:
            names[members[0]] = f"{noun} in the {parent}"
            continue
        ordered = sorted(members, key=lambda n: -sizes[n])
        for rank, n in enumerate(ordered[:2]):
            names[n] = f"{'larger' if rank == 0 else 'smaller'} {noun} in the {parent}"
    return names


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised patient coordinates of display pixels: column -> patient left, row -> posterior."""
    t = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    v, u = np.meshgrid(t, t, indexing="ij")
    return u, v


def _apply_pose(scene_rng: np.random.Generator, u, v):
    """A random overall patient size and table position (whole anatomy scaled and shifted)."""
    scale = float(scene_rng.uniform(0.9, 1.04))
    du, dv = scene_rng.normal(0, 0.02, 2)
    return (u - du) / scale, (v - dv) / scale


def render_slice(scene: Scene, *, modality: str = "CT", size: int = 256, noise_level: float = 0.3,
                 contrast: float = 1.0, blur: float = 0.7, w: float = 0.0) -> AnatomySlice:
    """Render a scene at body level `w` on a size x size display grid."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    rng = np.random.default_rng([scene.seed, 7])
    u, v = _apply_pose(rng, *_grid(size))
    masks = _masks(scene, u, v, w)
    image = _paint(scene, masks, modality, rng, contrast=contrast, noise_level=noise_level, blur=blur)
    sizes = {name: int(m.sum()) for name, m in masks.items()}
    names = _final_names(scene, sizes, MIN_AREA_PX)
    instances = []
    for st in scene.structures:
        if st.name not in names:
            continue
        m = masks[st.name]
        cu, cv = float(u[m].mean()), float(v[m].mean())
        parent = names.get(st.parent) if st.parent else None
        instances.append(Instance(names[st.name], st.noun, st.kind, parent, _side(cu), m, (cu, cv), sizes[st.name],
                                  st.group, st.function, st.function_fact))
    params = {"noise_level": noise_level, "contrast": contrast, "blur": blur, "w": w}
    return AnatomySlice(image, instances, scene.region, modality, scene.seed, FOV_MM[scene.region] / size, params)


def generate_slice(region: str = "abdomen", seed: int = 0, *, modality: str = "CT", size: int = 256,
                   noise_level: float | None = None, contrast: float | None = None, blur: float = 0.7,
                   lesions: dict | None = None, paired: bool = False) -> AnatomySlice:
    """A random axial slice of `region` (deterministic per seed).

    noise_level in [0, 1] (CT: 40 HU standard deviation at 1, 12 HU for the brain; MR: Rician, 60 units at 1);
    contrast scales soft-tissue differences (1 = nominal, 0.5 = low contrast);
    None draws them at random. `lesions` overrides lesion counts per host organ; `paired` forces
    same-class lesions on both sides (kidneys, lungs, hemispheres).
    """
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    rng = np.random.default_rng([seed, 3])
    noise_level = float(rng.uniform(0.1, 0.6)) if noise_level is None else float(noise_level)
    contrast = float(rng.uniform(0.8, 1.2)) if contrast is None else float(contrast)
    scene = build_scene(region, seed, lesions=lesions, paired=paired)
    return render_slice(scene, modality=modality, size=size, noise_level=noise_level, contrast=contrast, blur=blur)


@dataclass
class GeneratedVolume:
    """A generated 3D volume (SimpleITK, LPS) with a label image; label values name instances."""

    image: "object"            # SimpleITK.Image: int16 HU for CT, float32 for MR
    labels: "object"           # SimpleITK.Image, uint8: the most specific instance at each voxel
    names: dict[int, str]      # label value -> entity name
    parents: dict[str, str | None]
    sides: dict[str, str | None]
    region: str
    modality: str

    def label_of(self, name: str) -> int:
        for value, n in self.names.items():
            if n == name:
                return value
        raise KeyError(f"no instance {name!r} in this volume")

    def mask(self, name: str) -> np.ndarray:
        """Full (k, j, i) mask of an instance, its descendants included (an organ includes its lesions)."""
        import SimpleITK as sitk

        wanted = {name}
        changed = True
        while changed:
            more = {n for n, p in self.parents.items() if p in wanted} - wanted
            wanted |= more
            changed = bool(more)
        arr = sitk.GetArrayViewFromImage(self.labels)
        return np.isin(arr, [v for v, n in self.names.items() if n in wanted])


def _physical_grid(shape_ijk, spacing, origin, direction):
    """Normalised patient coordinates (u, v, w) of every voxel, arrays shaped (k, j, i)."""
    n = np.asarray(shape_ijk, dtype=float)
    s = np.asarray(spacing, dtype=float)
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    o = np.asarray(origin, dtype=float)
    k, j, i = np.meshgrid(*(np.arange(int(x)) for x in shape_ijk[::-1]), indexing="ij")
    idx = np.stack([i, j, k]).reshape(3, -1).astype(float)
    p = o[:, None] + (d * s) @ idx
    centre = o + (d * s) @ ((n - 1) / 2)
    half = np.abs(d) @ (n * s) / 2
    inplane = max(half[0], half[1])
    u = ((p[0] - centre[0]) / inplane).reshape(k.shape)
    v = ((p[1] - centre[1]) / inplane).reshape(k.shape)
    w = ((p[2] - centre[2]) / half[2]).reshape(k.shape)
    return u, v, w


def generate_volume(region: str = "abdomen", seed: int = 0, *, shape=(256, 256, 24), spacing=(0.8, 0.8, 2.5),
                    origin=(-102.0, -130.0, 415.0), direction=None, flip=(False, False, False),
                    modality: str = "CT", noise_level: float = 0.3, contrast: float = 1.0, blur: float = 0.7,
                    lesions: dict | None = None, paired: bool = False, w_span: float = 0.5) -> GeneratedVolume:
    """A 3D volume (shape is (i, j, k) voxels) in LPS; `flip` negates direction axes, `direction` overrides.

    The anatomy is placed in physical space: patient left is larger x whatever the direction matrix.
    The in-plane field of view scales the anatomy (normalised coordinates), z spans the body axis.
    """
    import SimpleITK as sitk

    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    d = np.diag([-1.0 if f else 1.0 for f in flip]) if direction is None else np.asarray(direction, float).reshape(3, 3)
    scene = build_scene(region, seed, lesions=lesions, paired=paired, w_span=w_span)
    rng = np.random.default_rng([seed, 7])
    u, v, w = _physical_grid(shape, spacing, origin, d)
    u, v = _apply_pose(rng, u, v)
    masks = _masks(scene, u, v, w)
    image = _paint(scene, masks, modality, rng, contrast=contrast, noise_level=noise_level, blur=blur)
    sizes = {name: int(m.sum()) for name, m in masks.items()}
    names = _final_names(scene, sizes, 20)
    labels = np.zeros(image.shape, dtype=np.uint8)
    value_names, parents, sides = {}, {}, {}
    for value, st in enumerate([st for st in scene.structures if st.name in names], start=1):
        m = masks[st.name]
        labels[m] = value
        value_names[value] = names[st.name]
        parents[names[st.name]] = names.get(st.parent) if st.parent else None
        sides[names[st.name]] = _side(float(u[m].mean()))
    pixels = np.round(image).astype(np.int16) if modality == "CT" else image.astype(np.float32)
    img = sitk.GetImageFromArray(pixels)
    lab = sitk.GetImageFromArray(labels)
    for im in (img, lab):
        im.SetSpacing([float(x) for x in spacing])
        im.SetOrigin([float(x) for x in origin])
        im.SetDirection([float(x) for x in d.ravel()])
    lab.SetMetaData("MediRound_labels", json.dumps({str(k): n for k, n in value_names.items()}))
    lab.SetMetaData("MediRound_parents", json.dumps(parents))
    return GeneratedVolume(img, lab, value_names, parents, sides, region, modality)
