"""Where a slice smaller than the model's field of view sits in it: where its patient coordinates put it.

A model with a physical field (`MediRoundConfig.field_of_view_mm`) shows a slice at the training scale and pads
the rest of its square frame black. Centring every such slice made a crop of a scan meet the model at another
place than the same anatomy in the whole slice: the tiny model's 16-px patches then cut it at another phase,
and its answer moved by more than a crop should move it (issue 26; `runs/probe/frame_phase.py`: the same crop
placed 0-15 px apart scored 0.81-0.96 on one target). Here the field is a window fixed in patient coordinates,
centred on the patient origin (the generator's scans, and scanners that centre the patient on the isocentre; a
cropped volume keeps its patient coordinates): a slice inside that window is padded black on the side that
brings it to its place. A crop of such a scan then lies in the frame where it lay in the whole slice (to the
pixel at the same scale; within a frame pixel when the whole slice was shrunk to fit). Along an axis where the
slice reaches outside the window the scan is evidently not centred on the origin (a chest CT 179 mm anterior of
it, a table offset): there the slice is centred, as before, rather than pushed against the frame's edge.

`field_padding` decides the padding; every consumer applies the same `FieldPadding` before framing the slice
(`processing.segmenter_pixels`, `vision_pixels`, `reference_inputs`, the training targets) and takes it off the
mask that comes back. A slice with no place (unknown field or position) gets none and is centred as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FieldPadding:
    """Black pixels added on each side of a slice (slice pixels, before it is resized into the frame)."""

    top: int = 0
    bottom: int = 0
    left: int = 0
    right: int = 0

    @property
    def none(self) -> bool:
        return not (self.top or self.bottom or self.left or self.right)

    def padded_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        return int(hw[0]) + self.top + self.bottom, int(hw[1]) + self.left + self.right

    def pad(self, array: np.ndarray) -> np.ndarray:
        """`array` (..., H, W) with zeros (black, or outside every mask) added on the last two axes."""
        if self.none:
            return array
        array = np.asarray(array)
        widths = [(0, 0)] * (array.ndim - 2) + [(self.top, self.bottom), (self.left, self.right)]
        return np.pad(array, widths)

    def unpad(self, array):
        """The slice's own pixels of a padded (..., H', W') array or tensor."""
        if self.none:
            return array
        h, w = array.shape[-2:]
        return array[..., self.top:h - self.bottom, self.left:w - self.right]

    def padded_extent(self, hw: tuple[int, int], extent: tuple[float, float] | None):
        """The padded slice's share of the field (None stays None: such a slice is never padded)."""
        if extent is None:
            return None
        ph, pw = self.padded_hw(hw)
        return float(extent[0]) * ph / int(hw[0]), float(extent[1]) * pw / int(hw[1])


NO_PADDING = FieldPadding()


def slice_in_field(image, config) -> tuple[np.ndarray, tuple[float, float] | None, FieldPadding]:
    """An `imaging.SliceImage` as a model of `config` is shown it: in [0,1] through the model's CT windows, padded
    to its place in the model's field; the padded slice's share of the field (`SliceImage.frame_extent`); and the
    padding, to take off the mask that comes back."""
    return into_field(image.normalized(config.ct_windows), image.frame_extent(config.field_of_view_mm),
                      image.frame_shift(config.field_of_view_mm))


def into_field(pixels: np.ndarray, extent: tuple[float, float] | None, shift: tuple[float, float] | None
               ) -> tuple[np.ndarray, tuple[float, float] | None, FieldPadding]:
    """(H, W) pixels of share `extent` of the field and centre `shift` (`field_padding`): padded to their place,
    the padded share of the field, and the padding."""
    padding = field_padding(np.shape(pixels)[:2], extent, shift)
    return padding.pad(pixels), padding.padded_extent(np.shape(pixels)[:2], extent), padding


def field_padding(slice_hw: tuple[int, int], extent: tuple[float, float] | None,
                  shift: tuple[float, float] | None) -> FieldPadding:
    """The padding that puts a slice of `slice_hw` (share `extent` of the field, centre `shift` from the field's
    centre in shares of the field, down and right positive) at its place in the field. A slice larger than the
    field is shrunk to fit its longest side (`processing.frame_shares`): the field then grows with it. Along an
    axis the slice fills, or where it reaches outside the field (by more than a pixel), or with no extent or
    shift, nothing is added: the slice is centred there."""
    if extent is None or shift is None:
        return NO_PADDING
    er, ec = float(extent[0]), float(extent[1])
    scale = 1.0 / max(er, ec, 1.0)  # the field as the frame shows it: at least the slice's longest side
    pads = []
    for n, share, offset in ((int(slice_hw[0]), er * scale, float(shift[0]) * scale),
                             (int(slice_hw[1]), ec * scale, float(shift[1]) * scale)):
        per_share = n / share  # slice pixels across the whole field
        room = max(0, int(np.floor(per_share - n + 1e-6)))
        inside = (abs(offset) + share / 2) * per_share <= per_share / 2 + 1.0
        wanted = min(room, int(round(2 * abs(offset) * per_share))) if inside else 0
        # the field's centre lies `offset` before the slice's centre: pad the side towards it
        pads += [(wanted, 0) if offset > 0 else (0, wanted)]
    (top, bottom), (left, right) = pads
    return FieldPadding(top, bottom, left, right)
