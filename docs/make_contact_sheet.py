"""Make docs/img/synth_vs_real.png (synthetic radiographs beside real RSNA ones) and
docs/img/synth_ages.png (one synthetic hand over ages, both sexes).

    python docs/make_contact_sheet.py --real $RSNA_DEV/images   # any folder of real RSNA radiographs
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from boneage.data import synth

TILE = (300, 400)  # width, height of one thumbnail


def _sheet(images: list[Image.Image], captions: list[str], cols: int) -> Image.Image:
    w, h = TILE
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("L", (cols * w, rows * h))
    dr = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=16)
    for i, (im, cap) in enumerate(zip(images, captions)):
        im = im.convert("L")
        im.thumbnail((w, h))
        x, y = (i % cols) * w, (i // cols) * h
        sheet.paste(im, (x + (w - im.width) // 2, y + (h - im.height) // 2))
        dr.text((x + 4, y + h - 20), cap, font=font, fill=255)
    return sheet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", required=True, help="a folder of real RSNA radiographs (PNG), e.g. $RSNA_DEV/images")
    ap.add_argument("--out", default=str(Path(__file__).parent / "img"))
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    cases = [synth.render_case(args.seed * 1_000_003 + i, size=(1022, 757)) for i in range(1, args.n + 1)]
    syn = _sheet([Image.fromarray(c.image) for c in cases],
                 [f"synthetic {c.true_age / 12:.1f} y {'M' if c.male else 'F'}" for c in cases], cols=6)
    real_files = sorted(Path(args.real).glob("*.png"))[: args.n]
    real = _sheet([Image.open(f) for f in real_files], [f"real {f.stem}" for f in real_files], cols=6)
    both = Image.new("L", (syn.width, syn.height + real.height + 10), 128)
    both.paste(syn, (0, 0))
    both.paste(real, (0, syn.height + 10))
    both.save(out / "synth_vs_real.png")
    synth.age_strip(out / "synth_ages.png")


if __name__ == "__main__":
    main()
