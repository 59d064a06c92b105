"""Random anatomical scenes (abdomen, chest, brain) as lists of structures in patient coordinates.

A scene is geometry and tissue values only; `anatomy.py` renders it onto a pixel or voxel grid.
Coordinates are normalised patient coordinates (see `shapes.py`): u > 0 is the patient's LEFT,
v > 0 is POSTERIOR. Paired organs are placed by patient side, so a rendering in any array orientation
keeps left and right correct.

Structure order matters: parents come before children, and an earlier sibling wins where siblings
overlap (so the renderer's masks never overlap within one parent, and children lie inside parents).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .shapes import Blob, random_blob

REGIONS = ("abdomen", "chest", "brain")

# Lesion kinds per host organ: (noun, CT HU, MR T2 value).
_LESION_KINDS = {
    "liver": [("lesion", 35.0, 520.0), ("cyst", 5.0, 900.0)],
    "spleen": [("lesion", 30.0, 560.0)],
    "kidney": [("cyst", 8.0, 920.0), ("lesion", 75.0, 480.0)],
    "lung": [("nodule", 35.0, 380.0)],
}


@dataclass
class Structure:
    """One structure of a scene; `instance=False` ones are painted but never segmented or named."""

    name: str                       # unique entity name, e.g. "left kidney"
    noun: str                       # category word used in queries, e.g. "kidney", "cyst"
    kind: str                       # "body" | "organ" | "part" | "lesion" | "internal"
    blobs: list[Blob]
    ct: float                       # Hounsfield units
    mr: float                       # arbitrary MR (T2-like) units
    parent: str | None = None
    minus: list[Blob] = field(default_factory=list)
    halfspace: tuple[float, float, float] | None = None  # keep points with nu*u + nv*v > c
    texture: float = 0.05           # relative amplitude of smooth internal texture
    rim: tuple[float, float, int] | None = None          # (ct, mr, width in pixels) painted at the edge
    group: str | None = None        # attribute group: structures "of the same density/kind"
    function: str | None = None     # for inferential queries: "organ that stores bile"
    function_fact: str | None = None  # rationale: "stores bile"
    instance: bool = True
    clip_to: tuple[str, ...] = ()   # also clip to these (earlier) structures, e.g. inside the muscle wall

    @property
    def is_instance(self) -> bool:
        return self.instance and self.kind != "internal"


@dataclass
class Scene:
    """Region, structures (in painting order) and the random draw that made them."""

    region: str
    structures: list[Structure]
    seed: int

    def by_name(self, name: str) -> Structure:
        for s in self.structures:
            if s.name == name:
                return s
        raise KeyError(name)


def _lesion_blob(rng: np.random.Generator, host: Structure, radius: tuple[float, float],
                 w_span: float, hz: float) -> Blob | None:
    """A small blob whose outline lies inside the host's first blob (rejection sampling)."""
    base = host.blobs[0]
    for _ in range(60):
        t = rng.uniform(0, 2 * np.pi)
        rr = np.sqrt(rng.uniform(0, 1)) * 0.7
        cu = base.cu + rr * base.a * np.cos(t) * np.cos(base.angle) - rr * base.b * np.sin(t) * np.sin(base.angle)
        cv = base.cv + rr * base.a * np.cos(t) * np.sin(base.angle) + rr * base.b * np.sin(t) * np.cos(base.angle)
        r = rng.uniform(*radius)
        zc = float(rng.uniform(-w_span, w_span))
        blob = random_blob(rng, cu, cv, r, r * rng.uniform(0.75, 1.1), jitter=0.0, size_jitter=0.05,
                           angle_jitter=3.0, wobble=0.15, zc=zc, hz=hz)
        pu, pv = blob.boundary_points(24, scale=1.25)
        inside = np.zeros_like(pu, dtype=bool)
        for hb in host.blobs:
            inside |= hb.inside(pu, pv, zc)
        if host.minus:
            for mb in host.minus:
                inside &= ~mb.inside(pu, pv, zc)
        if inside.all():
            return blob
    return None


def _add_lesions(rng, structures: list[Structure], host: Structure, host_kind: str, count: int,
                 radius: tuple[float, float], w_span: float, hz: float) -> None:
    """Append up to `count` lesions inside `host` (names are finalised after rendering)."""
    kinds = _LESION_KINDS[host_kind]
    for i in range(count):
        blob = _lesion_blob(rng, host, radius, w_span, hz)
        if blob is None:
            continue
        noun, ct, mr = kinds[int(rng.integers(len(kinds)))]
        structures.append(Structure(
            name=f"{noun} in the {host.name}#{i}", noun=noun, kind="lesion", blobs=[blob], parent=host.name,
            ct=ct + float(rng.normal(0, 6)), mr=mr + float(rng.normal(0, 40)), texture=0.08,
            group="fluid-filled" if noun == "cyst" else None))


def _body(rng, name: str, a: float, b: float, cv: float = 0.0) -> list[Structure]:
    """Body outline with subcutaneous fat, a muscle wall and visceral fat inside."""
    outer = random_blob(rng, 0.0, cv, a, b, jitter=0.01, size_jitter=0.05, angle_jitter=0.03, wobble=0.03)
    wall_out = Blob(outer.cu, outer.cv, outer.a * 0.9, outer.b * 0.88, outer.angle, outer.harmonics)
    wall_in = Blob(outer.cu, outer.cv, outer.a * 0.84, outer.b * 0.8, outer.angle, outer.harmonics)
    return [
        Structure(name, "body", "body", [outer], ct=-105.0, mr=620.0, texture=0.03,
                  function="outline of the patient's body", function_fact="marks the skin boundary"),
        Structure("muscle wall", "muscle", "internal", [wall_out], ct=48.0, mr=180.0, parent=name,
                  minus=[wall_in], instance=False),
        Structure("visceral fat", "fat", "internal", [wall_in], ct=-95.0, mr=600.0, parent=name, instance=False),
    ]


def _spine(rng, body: str, v0: float, scale: float, w_span: float) -> list[Structure]:
    vb = random_blob(rng, 0.0, v0, 0.11 * scale, 0.095 * scale, jitter=0.01, angle_jitter=0.05, wobble=0.03)
    arch = random_blob(rng, 0.0, v0 + 0.16 * scale, 0.11 * scale, 0.08 * scale, jitter=0.005,
                       angle_jitter=0.02, wobble=0.05)
    canal = Blob(0.0, arch.cv - 0.005, 0.045 * scale, 0.04 * scale)
    return [
        Structure("vertebra", "vertebra", "organ", [vb, arch], ct=260.0, mr=380.0, parent=body, texture=0.08,
                  rim=(750.0, 120.0, 2), group="bone", function="bone that protects the spinal cord",
                  function_fact="protects the spinal cord"),
        Structure("spinal canal", "spinal canal", "part", [canal], ct=25.0, mr=850.0, parent="vertebra",
                  function="channel that holds the spinal cord", function_fact="holds the spinal cord"),
    ]


def _abdomen(rng, *, lesions: dict[str, int], w_span: float) -> list[Structure]:
    def blob(cu, cv, a, b, angle=0.0, **kw):
        return random_blob(rng, cu, cv, a, b, angle=angle, **kw)

    s = _body(rng, "body", 0.9, 0.68, cv=0.02)
    body = "body"
    for j in range(int(rng.integers(7, 12))):  # bowel loops fill the fat between organs; painted first
        cu, cv = rng.uniform(-0.3, 0.45), rng.uniform(-0.45, 0.1)
        r = rng.uniform(0.05, 0.09)
        loop = random_blob(rng, cu, cv, r, r * rng.uniform(0.6, 1.0), jitter=0.0, angle_jitter=3.0, wobble=0.1)
        air = rng.uniform() < 0.3
        s.append(Structure(f"bowel loop {j}", "bowel", "internal", [loop], ct=-600.0 if air else 35.0,
                           mr=80.0 if air else 520.0, parent=body, rim=(45.0, 300.0, 2) if air else None,
                           texture=0.08, clip_to=("visceral fat",), instance=False))
    gb_present = rng.uniform() < 0.85 or lesions.get("force_gallbladder", 0)
    right_lobe = blob(-0.36, -0.06, 0.36, 0.38, 0.3, wobble=0.08, zc=0.6, hz=2.4)
    left_lobe = blob(-0.02, -0.32, 0.26, 0.13, 0.25, wobble=0.06, zc=0.6, hz=1.9)
    liver = Structure("liver", "liver", "organ", [right_lobe, left_lobe], ct=60.0, mr=260.0, parent=body,
                      group="solid", clip_to=("visceral fat",), function="organ that produces bile", function_fact="produces bile")
    organs = [
        Structure("aorta", "aorta", "organ", [blob(0.07, 0.2, 0.055, 0.055, jitter=0.01, wobble=0.01)],
                  ct=190.0, mr=90.0, parent=body, texture=0.02, group="vessel",
                  function="artery that carries blood from the heart to the body",
                  function_fact="carries oxygenated blood from the heart to the body"),
        Structure("inferior vena cava", "vein", "organ", [blob(-0.11, 0.16, 0.07, 0.05, jitter=0.01, wobble=0.02)],
                  ct=125.0, mr=110.0, parent=body, texture=0.02, group="vessel",
                  function="vein that returns blood from the lower body to the heart",
                  function_fact="returns blood from the lower body to the heart"),
    ]
    organs += _spine(rng, body, 0.43, 1.0, w_span)
    for side, sign in (("left", 1), ("right", -1)):
        organs.append(Structure(f"{side} psoas muscle", "psoas muscle", "organ",
                                [blob(0.17 * sign, 0.42, 0.065, 0.085, 0.2 * sign, jitter=0.01)],
                                ct=50.0, mr=170.0, parent=body, texture=0.05, group="muscle",
                                function="muscle that flexes the hip", function_fact="flexes the hip"))
    if gb_present:
        gb = blob(right_lobe.cu + 0.16, right_lobe.cv - 0.27, 0.075, 0.095, 0.5, jitter=0.015, zc=-0.1, hz=1.3)
        organs.append(Structure("gallbladder", "gallbladder", "organ", [gb], ct=12.0, mr=950.0, parent=body,
                                texture=0.02, clip_to=("visceral fat",), group="fluid-filled", function="organ that stores bile",
                                function_fact="stores and concentrates bile"))
    kidneys = []
    for side, sign in (("left", 1), ("right", -1)):
        k = blob(0.34 * sign, 0.3 + (0.02 if sign < 0 else 0.0), 0.105, 0.145, -0.45 * sign, jitter=0.02,
                 zc=-0.3 - (0.1 if sign < 0 else 0.0), hz=1.8)
        pelvis = Blob(k.cu - 0.055 * sign, k.cv - 0.02, 0.04, 0.05, k.angle, zc=k.zc, hz=0.9)
        kid = Structure(f"{side} kidney", "kidney", "organ", [k], ct=150.0, mr=480.0, parent=body,
                        rim=(185.0, 560.0, 3), group="kidney", texture=0.04,
                        function="organ that filters blood to make urine", function_fact="filters blood and makes urine")
        kidneys.append(kid)
        organs.append(kid)
        organs.append(Structure(f"{side} renal pelvis", "renal pelvis", "part", [pelvis], ct=15.0, mr=900.0,
                                parent=kid.name, texture=0.02,
                                function="part of the kidney that collects urine", function_fact="collects urine"))
    spleen = Structure("spleen", "spleen", "organ", [blob(0.52, 0.1, 0.13, 0.22, -0.5, wobble=0.1, zc=0.4, hz=2.0)],
                       ct=50.0, mr=420.0, parent=body, group="solid", clip_to=("visceral fat",),
                       function="organ that removes old red blood cells",
                       function_fact="filters the blood and removes old red blood cells")
    organs.append(spleen)
    if rng.uniform() < 0.75:
        organs.append(Structure("stomach", "stomach", "organ", [blob(0.3, -0.3, 0.2, 0.14, 0.3, wobble=0.08)],
                                ct=25.0, mr=700.0, parent=body, texture=0.1, clip_to=("visceral fat",),
                                function="organ that starts digesting food", function_fact="stores and digests food"))
    organs.append(liver)
    s += organs
    _add_lesions(rng, s, liver, "liver", lesions.get("liver", 0), (0.035, 0.075), w_span, 0.3)
    _add_lesions(rng, s, spleen, "spleen", lesions.get("spleen", 0), (0.03, 0.05), w_span, 0.25)
    for kid in kidneys:
        _add_lesions(rng, s, kid, "kidney", lesions.get(kid.name, 0), (0.028, 0.045), w_span, 0.25)
    return s


def _chest(rng, *, lesions: dict[str, int], w_span: float) -> list[Structure]:
    def blob(cu, cv, a, b, angle=0.0, **kw):
        return random_blob(rng, cu, cv, a, b, angle=angle, **kw)

    s = _body(rng, "body", 0.92, 0.64)
    body = "body"
    heart = Structure("heart", "heart", "organ", [blob(0.1, -0.14, 0.27, 0.21, 0.5, wobble=0.05)],
                      ct=45.0, mr=150.0, parent=body, texture=0.05, function="organ that pumps blood",
                      clip_to=("visceral fat",),
                      function_fact="pumps blood through the body")
    organs = [heart,
              Structure("descending aorta", "aorta", "organ", [blob(0.13, 0.33, 0.06, 0.06, jitter=0.01, wobble=0.01)],
                        ct=45.0, mr=90.0, parent=body, texture=0.02, group="vessel",
                        function="artery that carries blood from the heart to the body",
                        function_fact="carries oxygenated blood to the body"),
              Structure("esophagus", "esophagus", "organ", [blob(0.02, 0.24, 0.035, 0.03, jitter=0.008)],
                        ct=35.0, mr=300.0, parent=body, texture=0.05,
                        function="tube that carries food to the stomach", function_fact="carries food to the stomach"),
              Structure("sternum", "sternum", "organ", [blob(0.0, -0.53, 0.08, 0.035, jitter=0.008, angle_jitter=0.03)],
                        ct=350.0, mr=350.0, parent=body, rim=(700.0, 100.0, 1), group="bone",
                        function="bone where the ribs meet at the front", function_fact="joins the ribs at the front")]
    organs += _spine(rng, body, 0.45, 1.0, w_span)
    lungs = []
    for side, sign, a in (("left", 1, 0.27), ("right", -1, 0.3)):
        lung = Structure(f"{side} lung", "lung", "organ",
                         [blob(0.43 * sign, 0.02, a, 0.44, 0.1 * sign, wobble=0.07)],
                         ct=-820.0, mr=30.0, parent=body, texture=0.02, group="air-filled",
                         clip_to=("visceral fat",),
                         function="organ where gas exchange happens", function_fact="exchanges oxygen and carbon dioxide")
        lungs.append(lung)
        organs.append(lung)
    s += organs
    for lung in lungs:  # small vessels: painted, never segmented
        for j in range(int(rng.integers(4, 9))):
            b = _lesion_blob(rng, lung, (0.006, 0.012), 0.0, 10.0)
            if b is not None:
                s.append(Structure(f"vessel {lung.name} {j}", "vessel", "internal", [b], ct=30.0, mr=60.0,
                                   parent=lung.name, instance=False))
        _add_lesions(rng, s, lung, "lung", lesions.get(lung.name, 0), (0.03, 0.065), w_span, 0.25)
    return s


def _brain(rng, *, lesions: dict[str, int], w_span: float) -> list[Structure]:
    head = random_blob(rng, 0.0, 0.0, 0.72, 0.88, jitter=0.01, size_jitter=0.04, angle_jitter=0.03, wobble=0.02)
    inner = Blob(head.cu, head.cv, head.a * 0.9, head.b * 0.92, head.angle, head.harmonics)
    brain = Blob(head.cu, head.cv, head.a * 0.86, head.b * 0.89, head.angle, head.harmonics)
    s = [
        Structure("head", "head", "body", [head], ct=30.0, mr=400.0, texture=0.03,
                  function="outline of the patient's head", function_fact="marks the scalp boundary"),
        Structure("skull", "skull", "part", [inner], ct=1000.0, mr=60.0, parent="head", minus=[brain],
                  texture=0.04, group="bone", function="bone that protects the brain", function_fact="protects the brain"),
    ]
    gap = 0.012
    hemis = []
    for side, sign in (("left", 1), ("right", -1)):
        hemi = Structure(f"{side} hemisphere", "hemisphere", "organ", [brain], ct=30.0, mr=420.0, parent="head",
                         halfspace=(float(sign), 0.0, gap), rim=(40.0, 520.0, 3), texture=0.04, group="brain",
                         function=f"hemisphere that controls the {'right' if sign > 0 else 'left'} side of the body",
                         function_fact=f"controls the {'right' if sign > 0 else 'left'} side of the body")
        hemis.append(hemi)
        s.append(hemi)
    for hemi, sign in zip(hemis, (1, -1)):
        side = hemi.name.split()[0]
        vent = random_blob(rng, 0.075 * sign, -0.04, 0.045, 0.22, angle=-0.12 * sign, jitter=0.01, wobble=0.1)
        s.append(Structure(f"{side} lateral ventricle", "lateral ventricle", "part", [vent], ct=6.0, mr=950.0,
                           parent=hemi.name, texture=0.02, group="fluid-filled",
                           function="cavity that holds cerebrospinal fluid",
                           function_fact="holds cerebrospinal fluid"))
    for hemi, sign in zip(hemis, (1, -1)):
        if not lesions.get(hemi.name, 0):
            continue
        side = hemi.name.split()[0]
        r = float(rng.uniform(0.12, 0.2))
        for _ in range(40):
            cu = sign * float(rng.uniform(0.22, 0.5))
            cv = float(rng.uniform(-0.5, 0.45))
            outer = random_blob(rng, cu, cv, r, r * rng.uniform(0.75, 1.05), jitter=0.0, angle_jitter=3.0,
                                wobble=0.16, zc=float(rng.uniform(-w_span, w_span)), hz=0.3)
            pu, pv = outer.boundary_points(24, 1.1)
            if brain.inside(pu, pv, outer.zc).all() and (sign * pu > 0.05).all():
                break
        else:
            continue
        core = random_blob(rng, outer.cu, outer.cv, outer.a * 0.5, outer.b * 0.5, jitter=0.01, angle_jitter=3.0,
                           wobble=0.12, zc=outer.zc, hz=outer.hz * 0.6)
        tumour = f"{side} hemisphere tumour"
        s.append(Structure(tumour, "tumour", "lesion", [outer], ct=22.0, mr=760.0, parent=hemi.name, texture=0.06))
        s.append(Structure(f"{tumour} core", "tumour core", "part", [core], ct=45.0, mr=520.0, parent=tumour,
                           rim=(55.0, 380.0, 2), texture=0.1))
        s.append(Structure(f"{tumour} oedema", "oedema", "part", [outer], ct=20.0, mr=780.0, parent=tumour,
                           minus=[core], texture=0.05))
    return s


def lesion_counts(rng: np.random.Generator, region: str, *, paired: bool = False, max_per_organ: int = 2) -> dict:
    """Random lesion counts per host organ; `paired` forces same-class lesions on both sides."""
    c = lambda: int(rng.choice(max_per_organ + 1, p=_count_probs(max_per_organ)))  # noqa: E731
    if region == "abdomen":
        out = {"liver": c(), "spleen": int(rng.uniform() < 0.3), "left kidney": c(), "right kidney": c()}
        if paired:
            out["left kidney"] = max(1, out["left kidney"])
            out["right kidney"] = max(1, out["right kidney"])
        return out
    if region == "chest":
        out = {"left lung": c(), "right lung": c()}
        if paired:
            out = {k: max(1, v) for k, v in out.items()}
        return out
    both = paired or rng.uniform() < 0.25
    first = "left hemisphere" if rng.uniform() < 0.5 else "right hemisphere"
    return {"left hemisphere": 1 if (both or first.startswith("left")) else 0,
            "right hemisphere": 1 if (both or first.startswith("right")) else 0}


def _count_probs(n: int) -> list[float]:
    p = np.array([0.4] + [0.6 / n] * n)
    return list(p / p.sum())


def build_scene(region: str, seed: int, *, lesions: dict | None = None, paired: bool = False,
                w_span: float = 0.0) -> Scene:
    """A random scene for `region`; `w_span` > 0 spreads lesions along the body axis (for volumes)."""
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    rng = np.random.default_rng(seed)
    if lesions is None:
        lesions = lesion_counts(rng, region, paired=paired)
    builder = {"abdomen": _abdomen, "chest": _chest, "brain": _brain}[region]
    return Scene(region, builder(rng, lesions=lesions, w_span=w_span), seed)
