"""The registered frame and the zones cut from it (numbers from the seed, see DESIGN.md).

Coordinates are (x, y) pixels, x to the right, y down. The frame is 1600 wide and 2080 tall:
registration puts the middle finger tip at (800, 100) and the capitate centre at (800, 1600)
(480 px from the bottom), thumb on the right.
"""

from __future__ import annotations

from dataclasses import dataclass

FRAME_W, FRAME_H = 1600, 2080
FINGER_TIP_TARGET = (800.0, 100.0)
CAPITATE_TARGET = (800.0, float(FRAME_H - 480))

# The three key points, in the order every array of key points uses: shape (3, 2) as (x, y).
KEYPOINT_NAMES = ("finger_tip", "capitate", "thumb_tip")

# Registered images are stored at half the frame's resolution (1040x800 uint8, ~0.8 MB each):
# the finest zone (B, wrist at 1:2) needs exactly that, and 12.6k of them fit on one GPU.
STORE_SCALE = 0.5
STORE_W, STORE_H = int(FRAME_W * STORE_SCALE), int(FRAME_H * STORE_SCALE)


@dataclass(frozen=True)
class Zone:
    """A named box of the registered frame, cut and reduced by `reduction` for its model."""

    name: str
    x0: float
    y0: float
    width: float
    height: float
    reduction: float  # the seed's "1:4" is reduction=4

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        return round(self.height / self.reduction), round(self.width / self.reduction)

    @property
    def center(self) -> tuple[float, float]:
        return self.x0 + self.width / 2, self.y0 + self.height / 2


# Seed: A whole hand 2000x1500 at 1:4; B wrist 750x750 at 1:2; C metacarpals and proximal
# phalanges 600x1400 (w x h) at 1:3. Placement in the frame: A centred on the hand, B centred
# on the capitate target, C on the middle finger axis from the proximal phalanges down to the
# carpal row.
ZONES = {
    "A": Zone("A", x0=50, y0=40, width=1500, height=2000, reduction=4),
    "B": Zone("B", x0=425, y0=1225, width=750, height=750, reduction=2),
    "C": Zone("C", x0=500, y0=300, width=600, height=1400, reduction=3),
}
