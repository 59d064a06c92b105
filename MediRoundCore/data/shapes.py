"""Smooth random shapes and small image filters (numpy only) for the synthetic anatomy.

Shapes live in normalised patient coordinates: `u` grows towards the patient's LEFT, `v` towards
POSTERIOR, `w` towards SUPERIOR; the body spans roughly [-1, 1] in u and v. A `Blob` is a deformed,
rotated ellipse (low-order Fourier deformation of its radius) whose cross-section shrinks
ellipsoidally along w.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Blob:
    """A deformed ellipse in (u, v), extruded as an ellipsoid-like shape along w."""

    cu: float
    cv: float
    a: float
    b: float
    angle: float = 0.0
    harmonics: tuple[tuple[float, float], ...] = ()  # (amplitude, phase) for k = 2, 3, ...
    zc: float = 0.0
    hz: float = 10.0

    def inside(self, u: np.ndarray, v: np.ndarray, w: np.ndarray | float = 0.0) -> np.ndarray:
        """Boolean array: which points (u, v, w) lie inside the shape."""
        s2 = 1.0 - ((np.asarray(w, dtype=np.float64) - self.zc) / self.hz) ** 2
        s = np.sqrt(np.clip(s2, 1e-6, 1.0))
        du, dv = u - self.cu, v - self.cv
        c, n = np.cos(self.angle), np.sin(self.angle)
        x = (du * c + dv * n) / (self.a * s)
        y = (-du * n + dv * c) / (self.b * s)
        r = np.hypot(x, y)
        bound = np.ones_like(r)
        if self.harmonics:
            phi = np.arctan2(y, x)
            for k, (amp, phase) in enumerate(self.harmonics, start=2):
                bound = bound + amp * np.cos(k * phi + phase)
        return (r <= bound) & (s2 > 0)

    def boundary_points(self, n: int = 24, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Points on the outline (at w = zc), optionally scaled about the centre."""
        phi = np.linspace(0, 2 * np.pi, n, endpoint=False)
        bound = np.ones_like(phi)
        for k, (amp, phase) in enumerate(self.harmonics, start=2):
            bound = bound + amp * np.cos(k * phi + phase)
        x, y = self.a * bound * scale * np.cos(phi), self.b * bound * scale * np.sin(phi)
        c, s = np.cos(self.angle), np.sin(self.angle)
        return self.cu + x * c - y * s, self.cv + x * s + y * c


def random_blob(rng: np.random.Generator, cu: float, cv: float, a: float, b: float, *, angle: float = 0.0,
                jitter: float = 0.03, size_jitter: float = 0.12, angle_jitter: float = 0.25,
                wobble: float = 0.06, zc: float = 0.0, hz: float = 10.0) -> Blob:
    """A blob around a nominal centre/size with random position, size, rotation and outline wobble."""
    harmonics = tuple((float(rng.uniform(0, wobble)) / k ** 0.5, float(rng.uniform(0, 2 * np.pi)))
                      for k in range(2, 6))
    return Blob(
        cu=cu + float(rng.normal(0, jitter)), cv=cv + float(rng.normal(0, jitter)),
        a=a * float(rng.uniform(1 - size_jitter, 1 + size_jitter)),
        b=b * float(rng.uniform(1 - size_jitter, 1 + size_jitter)),
        angle=angle + float(rng.normal(0, angle_jitter)), harmonics=harmonics, zc=zc, hz=hz,
    )


def _shift_or(mask: np.ndarray) -> np.ndarray:
    """One step of 4-neighbour binary dilation over the last two axes."""
    out = mask.copy()
    out[..., 1:, :] |= mask[..., :-1, :]
    out[..., :-1, :] |= mask[..., 1:, :]
    out[..., :, 1:] |= mask[..., :, :-1]
    out[..., :, :-1] |= mask[..., :, 1:]
    return out


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation over the last two axes (diamond of radius `steps`)."""
    for _ in range(steps):
        mask = _shift_or(mask)
    return mask


def erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion over the last two axes (diamond of radius `steps`)."""
    return ~dilate(~mask, steps)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the last two axes (edges replicated)."""
    if sigma <= 0:
        return image
    radius = max(1, int(round(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out = image.astype(np.float64)
    for axis in (-2, -1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for i, weight in enumerate(kernel):
            acc += weight * np.take(padded, np.arange(i, i + n), axis=axis)
        out = acc
    return out


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 12.0) -> np.ndarray:
    """Low-frequency random field with zero mean and unit standard deviation (last two axes smoothed)."""
    field = gaussian_blur(rng.standard_normal(shape), scale)
    sd = field.std()
    return (field - field.mean()) / (sd if sd > 0 else 1.0)
