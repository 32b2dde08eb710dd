"""Pictures for a person: a contact sheet of registered images with the frame's key point targets and
the zone boxes drawn on, so a glance shows whether registration put every hand upright and in place."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from boneage.registration import frame, prepare

ZONE_COLOURS = {"A": (80, 160, 255), "B": (255, 170, 40), "C": (90, 220, 120)}


def registered_thumbnail(registered: np.ndarray, width: int = 160, thumb: tuple[float, float] | None = None
                         ) -> Image.Image:
    """One registered image (stored scale) as RGB, `width` px wide, with the zone boxes, the finger tip
    and capitate targets (red: registration puts those key points exactly there) and, when given, where
    the thumb tip key point landed (frame coordinates; yellow)."""
    s = width / frame.FRAME_W
    height = round(frame.FRAME_H * s)
    img = Image.fromarray(registered).convert("RGB").resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for name, zone in frame.ZONES.items():
        draw.rectangle([zone.x0 * s, zone.y0 * s, (zone.x0 + zone.width) * s, (zone.y0 + zone.height) * s],
                       outline=ZONE_COLOURS.get(name, (255, 255, 255)))
    for x, y in (frame.FINGER_TIP_TARGET, frame.CAPITATE_TARGET):
        draw.ellipse([x * s - 3, y * s - 3, x * s + 3, y * s + 3], outline=(255, 40, 40), width=2)
    if thumb is not None and np.all(np.isfinite(thumb)):
        x, y = thumb
        draw.ellipse([x * s - 3, y * s - 3, x * s + 3, y * s + 3], outline=(255, 230, 0), width=2)
    return img


def contact_sheet(table: pd.DataFrame, columns: int = 8, width: int = 160, limit: int = 64) -> Image.Image:
    """Registered rows of `table` (needs id, status, registered_png; optional boneage, male,
    registration_doubtful) as a grid with a caption under each; doubtful ones captioned in red."""
    rows = table[table["status"] == "ok"].head(limit)
    cell_h = round(frame.FRAME_H * width / frame.FRAME_W) + 14
    n = max(len(rows), 1)
    sheet = Image.new("RGB", (columns * width, -(-n // columns) * cell_h), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows.itertuples(index=False)):
        x, y = (i % columns) * width, (i // columns) * cell_h
        thumb = (getattr(row, "thumb_frame_x", np.nan), getattr(row, "thumb_frame_y", np.nan))
        sheet.paste(registered_thumbnail(prepare.decode_png(row.registered_png), width,
                                         np.array(thumb, dtype=float)), (x, y))
        caption = str(row.id)
        if getattr(row, "boneage", None) is not None and not pd.isna(row.boneage):
            caption += f" {row.boneage:.0f}m"
        if getattr(row, "male", None) is not None and not pd.isna(row.male):
            caption += " M" if row.male else " F"
        doubtful = bool(getattr(row, "registration_doubtful", False))
        draw.text((x + 3, y + cell_h - 13), caption + (" ?" if doubtful else ""),
                  fill=(255, 80, 80) if doubtful else (230, 230, 230))
    return sheet
