"""How much AFLW2000's two crop protocols differ: hopenet (min/max over every pt2d entry, the -1 of
invisible landmarks included, as HopeNet's released code) against visible (visible landmarks only).

    python tools/compare_crops.py AFLW2000_FOLDER [--png crops.png]

Prints how many files have an invisible landmark, and over those the box area and centre shift of
hopenet's box relative to visible's; --png saves the crops of the files that differ most, hopenet's
above visible's, with the visible landmarks drawn.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hmtl_data  # noqa: E402


def compare(folder):
    """Per file with an invisible landmark: (name, area ratio hopenet / visible, centre shift in box widths)."""
    rows = []
    for jpg in sorted(Path(folder).glob("*.jpg")):
        pt2d = hmtl_data.read_mat(jpg.with_suffix(".mat"))[1]
        if (pt2d >= 0).all():
            continue
        boxes = [hmtl_data.face_box(pt2d, protocol=p) for p in ("hopenet", "visible")]
        if None in boxes:
            continue
        (a0, b0, a1, b1), (c0, d0, c1, d1) = boxes
        shift = np.hypot((a0 + a1 - c0 - c1) / 2, (b0 + b1 - d0 - d1) / 2) / (c1 - c0)
        rows.append((jpg, (a1 - a0) * (b1 - b0) / ((c1 - c0) * (d1 - d0)), shift))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="AFLW2000 files: imageXXXXX.jpg beside imageXXXXX.mat")
    p.add_argument("--png", help="save the crops of the 6 files that differ most")
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args()
    files = sorted(Path(args.folder).glob("*.jpg"))
    if not files:
        raise SystemExit(f"{args.folder}: no .jpg files")
    rows = compare(args.folder)
    print(f"{len(rows)} of {len(files)} files have an invisible landmark (pt2d x = -1)")
    if rows:
        area, shift = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
        print(f"on those, hopenet's box / visible's box, area: median {np.median(area):.2f}x, "
              f"range {area.min():.2f}-{area.max():.2f}x; centre shift: median {np.median(shift):.2f}, "
              f"max {shift.max():.2f} box widths")
    if args.png and rows:
        worst = sorted(rows, key=lambda r: -r[1])[:6]
        sheet = Image.new("RGB", (len(worst) * args.size, 2 * args.size))
        for k, (jpg, _, _) in enumerate(worst):
            image = Image.open(jpg).convert("RGB")
            pt2d = hmtl_data.read_mat(jpg.with_suffix(".mat"))[1]
            for row, protocol in enumerate(("hopenet", "visible")):
                box = hmtl_data.face_box(pt2d, protocol=protocol)
                crop = Image.fromarray(hmtl_data.square_crop(image, box, args.size))
                draw, (w, h) = ImageDraw.Draw(crop), (box[2] - box[0], box[3] - box[1])
                scale = args.size / min(w, h)
                left, top = round((w * scale - args.size) / 2), round((h * scale - args.size) / 2)
                for x, y in pt2d[:, (pt2d >= 0).all(0)].T:
                    u, v = (x - box[0]) * scale - left, (y - box[1]) * scale - top
                    draw.ellipse([u - 1.5, v - 1.5, u + 1.5, v + 1.5], fill="lime")
                draw.text((3, 2), protocol, fill="yellow")
                sheet.paste(crop, (k * args.size, row * args.size))
        sheet.save(args.png)
        print(f"wrote {args.png}: hopenet's crops above visible's, for the {len(worst)} files that differ most")


if __name__ == "__main__":
    main()
