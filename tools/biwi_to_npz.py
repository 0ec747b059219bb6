"""BIWI Kinect head pose face crops + labels -> FSA-Net's BIWI .npz layout, split by sequence.

    python tools/biwi_to_npz.py CROPS LABELS.npz OUT [--size 128] [--every 1] [--splits train=1-16 test=17-24]

CROPS: a folder of NN/frame_XXXXX_rgb.png face crops (face_rectangle_crops/ of the GitHub
repository Arnav0400/Headpose_Estimation). LABELS.npz: `images` ('NN/frame_XXXXX_rgb.png') and `ypr`
(yaw, pitch, roll in degrees), as data/Biwi_plus_non_cal.npz of kuhnkeF/headposeplus. Writes one
OUT/BIWI_<name>.npz per split, by default BIWI_train.npz (sequences 01-16) and BIWI_test.npz
(sequences 17-24), each holding `image` N x S x S x 3 uint8 in BGR order (FSA-Net's files were
written by OpenCV), `pose` N x 3 (yaw, pitch, roll in degrees) and `names`: hmtl.py reads them with
--data biwi / --val-data biwi. `--splits devtrain=1-12 devval=13-16` makes a development split of
the training sequences, to choose settings on without touching the test sequences. Splits may
overlap: each gets every face of its sequences.

Crops are resized to S x S (they are square to within a pixel). As in FSA-Net's protocol, faces
with an angle beyond ±99° are left out; empty or unreadable crops, crops without a label and
labels without a crop are counted and reported, never mixed in. --every K keeps every K-th frame.
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

SPLITS = {"train": range(1, 17), "test": range(17, 25)}


def sequences(text):
    """'name=a-b' -> (name, range(a, b + 1))."""
    try:
        name, span = text.split("=")
        first, last = span.split("-")
        return name, range(int(first), int(last) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a split is name=first-last, like test=17-24; got {text!r}") from None


def convert(crops, labels, out, size=128, every=1, splits=SPLITS):
    """Writes the two .npz files; returns {what: count} of everything read, kept and left out."""
    crops, out = Path(crops), Path(out)
    try:
        with np.load(labels) as d:
            names, ypr = [str(n) for n in d["images"]], np.asarray(d["ypr"], np.float64)
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f"{labels}: not a labels .npz with 'images' and 'ypr' ({e})") from None
    if ypr.shape != (len(names), 3):
        raise SystemExit(f"{labels}: 'ypr' must be {len(names)} x 3 (one row per image), got {ypr.shape}")
    label_of = dict(zip(names, ypr))
    files = sorted(crops.glob("[0-9][0-9]/frame_*_rgb.png"))
    if not files:
        raise SystemExit(f"{crops}: no NN/frame_XXXXX_rgb.png crops there")
    counts = Counter()
    found = {name: ([], [], []) for name in splits}
    for k, path in enumerate(tqdm(files, "reading crops", unit="img")):
        name = f"{path.parent.name}/{path.name}"
        sequence = int(path.parent.name)
        counts["crops found"] += 1
        if k % every:
            counts[f"left out: not every {every}th frame"] += 1
            continue
        if name not in label_of:
            counts["left out: crop without a label"] += 1
            continue
        pose = label_of[name]
        if not np.isfinite(pose).all():
            counts["left out: label not finite"] += 1
            continue
        if np.abs(pose).max() > 99:
            counts["left out: an angle beyond ±99°"] += 1
            continue
        try:
            with Image.open(path) as image:
                face = image.convert("RGB").resize((size, size), Image.BILINEAR)
        except (OSError, ValueError) as e:
            counts["left out: empty or unreadable crop"] += 1
            if path.stat().st_size:
                print(f"{path}: unreadable ({e})", file=sys.stderr)
            continue
        chosen = [split for split, span in splits.items() if sequence in span]  # splits may overlap
        if not chosen:
            counts["left out: a sequence in no split"] += 1
        for split in chosen:
            images, poses, kept = found[split]
            images.append(np.asarray(face)[..., ::-1])  # RGB -> BGR, as FSA-Net's files
            poses.append(pose)
            kept.append(name)
            counts[f"kept: {split}"] += 1
    present = {f"{p.parent.name}/{p.name}" for p in files}
    counts["labels without a crop"] = sum(n not in present for n in names)
    out.mkdir(parents=True, exist_ok=True)
    for split, (images, poses, kept) in found.items():
        if not kept:
            raise SystemExit(f"split {split}: no crop of its sequences was kept")
        np.savez(out / f"BIWI_{split}.npz", image=np.stack(images), pose=np.array(poses, np.float32),
                 names=np.array(kept), img_size=size)
    return dict(counts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("crops", help="folder of NN/frame_XXXXX_rgb.png face crops")
    p.add_argument("labels", help=".npz with 'images' and 'ypr' (Biwi_plus_non_cal.npz)")
    p.add_argument("out", help="where BIWI_train.npz and BIWI_test.npz go")
    p.add_argument("--size", type=int, default=128, help="side of the stored crops in pixels (128)")
    p.add_argument("--every", type=int, default=1, help="keep every K-th frame (1: all)")
    p.add_argument("--splits", type=sequences, nargs="+", help="name=first-last sequences, one per output file "
                   "(default: train=1-16 test=17-24)")
    args = p.parse_args()
    if args.size < 8 or args.every < 1:
        p.error("--size must be 8 or more and --every 1 or more")
    splits = dict(args.splits) if args.splits else SPLITS
    counts = convert(args.crops, args.labels, args.out, args.size, args.every, splits)
    for what, n in sorted(counts.items()):
        print(f"{what}: {n}")
    print("wrote " + ", ".join(str(Path(args.out) / f"BIWI_{name}.npz") for name in splits))


if __name__ == "__main__":
    main()
