"""Using a trained model: --predict (angles of face crops, printed, written to a CSV and drawn on the
images), --export (the deployable network as torch.export and ONNX, checked against PyTorch) and
--preview (a dataset's crops with their ground-truth axes, to look at before training)."""
import csv
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from hmtl_data import angle_names, load_split, pose_matrix, square_crop
from hmtl_runs import make_folder, write_atomically
from hmtl_tiles import normalize

BOX_COLUMNS = ("path", "x_min", "y_min", "x_max", "y_max")


def read_boxes(path):
    """--boxes CSV (path,x_min,y_min,x_max,y_max): {path or file name: (line, box)}; a bad file or row
    stops with its name and line."""
    try:
        reader = csv.DictReader(io.StringIO(Path(path).read_text(encoding="utf-8")))
        header = reader.fieldnames
    except OSError as e:
        raise SystemExit(f"--boxes {path}: cannot read it ({e.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise SystemExit(f"--boxes {path}: not a UTF-8 CSV file ({e})") from None
    if not header or not set(BOX_COLUMNS) <= set(header):
        raise SystemExit(f"--boxes {path}: needs the columns {','.join(BOX_COLUMNS)}, its header is {header}")
    boxes = {}
    try:
        for row in reader:
            where = f"--boxes {path} line {reader.line_num}"
            try:
                box = tuple(float(row[k]) for k in BOX_COLUMNS[1:])
            except (TypeError, ValueError):
                raise SystemExit(f"{where}: x_min, y_min, x_max, y_max must be numbers, got "
                                 f"{[row.get(k) for k in BOX_COLUMNS[1:]]}") from None
            if not all(map(math.isfinite, box)) or box[2] <= box[0] or box[3] <= box[1]:
                raise SystemExit(f"{where}: the box {box} is empty (it needs x_min < x_max and y_min < y_max)")
            if row["path"] in boxes:
                raise SystemExit(f"{where}: {row['path']} already has a box on line {boxes[row['path']][0]}")
            boxes[row["path"]] = (reader.line_num, box)
    except csv.Error as e:
        raise SystemExit(f"--boxes {path} line {reader.line_num}: {e}") from None
    return boxes


def eight_bit_rgb(image):
    """An opened image as 8-bit RGB; 16-bit greyscale scaled down, which Pillow's convert would clip."""
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image, np.float64) / 257).round().astype(np.uint8))
    elif image.mode in ("I", "F"):
        raise ValueError(f"its pixels are 32-bit ({image.mode}); save it with 8 or 16 bits per channel")
    return image.convert("RGB")


def unique_name(stem, used):
    """stem_axes.png, or stem-2_axes.png, ... when two images share a name."""
    name, k = f"{stem}_axes.png", 1
    while name in used:
        k += 1
        name = f"{stem}-{k}_axes.png"
    used.add(name)
    return name


def predict(args, net, cfg):
    """--predict: yaw, pitch, roll of face crops by `net` (hmtl.PoseEstimator), printed, written to
    predictions.csv, and each image saved with the three axes drawn. --boxes CSV
    (path,x_min,y_min,x_max,y_max) crops each image first. Images that cannot be read (or whose box
    misses them) are skipped, listed at the end, and make the exit status nonzero; predictions.csv
    always holds every image that succeeded."""
    device = next(net.buffers()).device
    names, size = angle_names(cfg["data"]), cfg["img_size"]
    files = [f for p in map(Path, args["predict"]) for f in (sorted(p.rglob("*")) if p.is_dir() else [p])
             if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp")]
    if not files:
        raise SystemExit(f"--predict {' '.join(args['predict'])}: no .jpg, .jpeg, .png or .bmp images there")
    boxes = read_boxes(args["boxes"]) if args.get("boxes") else {}
    out = Path(args.get("out") or "predictions")
    make_folder(out, "--out")
    rows, failed, matched, drawn_names = [], [], set(), set()
    for start in range(0, len(files), cfg["batch_size"]):
        batch = []
        for path in files[start:start + cfg["batch_size"]]:
            try:
                with Image.open(path) as opened:
                    image = eight_bit_rgb(opened)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                failed.append((path, f"cannot decode it ({e})"))
                continue
            line, box = boxes.get(str(path)) or boxes.get(path.name) or (None, (0, 0, image.width, image.height))
            matched.add(line)
            pixels = tuple(map(int, box))
            if box[2] <= 0 or box[3] <= 0 or box[0] >= image.width or box[1] >= image.height:
                failed.append((path, f"its box {box} (--boxes line {line}) lies outside the "
                                     f"{image.width}x{image.height} image"))
            elif pixels[2] <= pixels[0] or pixels[3] <= pixels[1]:
                failed.append((path, f"its box {box} (--boxes line {line}) holds no whole pixel"))
            else:
                batch.append((path, image, box, pixels))
        if not batch:
            continue
        crops = torch.from_numpy(np.stack([square_crop(im, pixels, size) for _, im, _, pixels in batch]))
        with torch.no_grad():
            angles = net(normalize(crops.to(device)))
        if not torch.isfinite(angles).all():
            raise SystemExit(f"{args['checkpoint']}: the network gives NaN or infinite angles")
        for (path, image, box, _), pose in zip(batch, angles.tolist()):
            pose = dict(zip(names, pose))
            side = min(box[2] - box[0], box[3] - box[1])
            draw_axes(ImageDraw.Draw(image), pose["yaw"], pose["pitch"], pose.get("roll", 0.0),
                      ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), side / 2)
            drawn = unique_name(path.stem, drawn_names)
            try:
                image.save(out / drawn)
            except OSError as e:
                raise SystemExit(f"--out {out}: cannot write {drawn} there ({e.strerror or e})") from None
            rows.append({"path": str(path), **{a: round(v, 3) for a, v in pose.items()}, "drawn": drawn})
            print(f"{path}: " + ", ".join(f"{a} {v:.1f}" for a, v in pose.items()))

    def write_csv(f):
        text = io.StringIO()
        writer = csv.DictWriter(text, ["path", *names, "drawn"])
        writer.writeheader()
        writer.writerows(rows)
        f.write(text.getvalue().encode())
    write_atomically(out / "predictions.csv", write_csv)
    print(f"{len(rows)} predictions in {out / 'predictions.csv'}, images with axes beside it")
    unmatched = sorted(line for line, _ in boxes.values() if line not in matched)
    if unmatched:
        print(f"--boxes {args['boxes']}: {len(unmatched)} row(s) match no image given to --predict, "
              f"lines {', '.join(map(str, unmatched))}", file=sys.stderr)
    if failed:
        for path, why in failed:
            print(f"{path}: skipped: {why}", file=sys.stderr)
        raise SystemExit(f"{len(failed)} of {len(files)} images were skipped (listed above); "
                         f"{out / 'predictions.csv'} holds the other {len(rows)}")
    return rows


def export(args, net, cfg, tolerance=1e-3):
    """--export DIR: the deployable network `net` (on the CPU) as torch.export (hmtl.pt2) and ONNX
    (hmtl.onnx, needs the onnx package), each checked to give PyTorch's angles within `tolerance` degrees."""
    out = Path(args["export"])
    make_folder(out, "--export")
    x = torch.randn(3, 3, cfg["img_size"], cfg["img_size"]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = net(x)
    report = {"parameters": sum(p.numel() for p in net.parameters()), "angles": list(angle_names(cfg["data"]))}
    program = torch.export.export(net, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    torch.export.save(program, out / "hmtl.pt2")
    report["torch.export"] = (torch.export.load(out / "hmtl.pt2").module()(x) - want).abs().max().item()
    try:
        import onnx  # noqa: F401
        torch.onnx.export(net, (x,), out / "hmtl.onnx", input_names=["image"], output_names=["angles"],
                          dynamic_axes={"image": {0: "batch"}, "angles": {0: "batch"}}, dynamo=False)
        import onnxruntime
        session = onnxruntime.InferenceSession(str(out / "hmtl.onnx"))
        report["onnx"] = float(np.abs(session.run(None, {"image": x.numpy()})[0] - want.numpy()).max())
    except ImportError as e:
        report["onnx"] = f"skipped: {e.name} is not installed (pip install onnx onnxruntime)"
    for name in ("torch.export", "onnx"):
        if isinstance(report[name], float) and not report[name] <= tolerance:  # NaN fails too
            raise SystemExit(f"{name} gives angles {report[name]:.2g} degrees from PyTorch's (> {tolerance})")
    (out / "export.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


def draw_axes(draw, yaw, pitch, roll, centre, length):
    """The head's axes on a PIL ImageDraw: x red, y green (down the face), z blue (where it faces)."""
    rot = pose_matrix(yaw, pitch, roll)
    for axis, colour in zip(range(3), ("red", "lime", "blue")):
        tip = (centre[0] + length * rot[0, axis], centre[1] + length * rot[1, axis])
        draw.line([tuple(centre), tip], fill=colour, width=max(1, round(length / 20)))


def preview(cfg, path, per_split=12, scale=2):
    """Training crops (top rows) and validation crops (bottom rows) with their ground-truth pose
    axes drawn: look before you train."""
    names, tiles = angle_names(cfg["data"]), []
    for dataset in (load_split(cfg, True), load_split(cfg, False)):
        for i in np.linspace(0, len(dataset) - 1, min(per_split, len(dataset))).astype(int):
            image, angles = dataset[int(i)]
            tile = Image.fromarray(image.numpy()).resize((image.shape[1] * scale,) * 2, Image.NEAREST)
            pose, draw = dict(zip(names, angles.tolist())), ImageDraw.Draw(tile)
            draw_axes(draw, pose["yaw"], pose["pitch"], pose.get("roll", 0.0), (tile.width / 2,) * 2, tile.width / 3)
            draw.text((2, 1), " ".join(f"{v:.0f}" for v in angles.tolist()), fill="white")
            tiles.append(tile)
    side = tiles[0].width
    grid = Image.new("RGB", (6 * side, math.ceil(len(tiles) / 6) * side))
    for k, tile in enumerate(tiles):
        grid.paste(tile, (k % 6 * side, k // 6 * side))
    grid.save(path)
    print(f"{path}: {cfg['data']} training crops, then {cfg['val_data']} validation crops, labelled "
          f"{'/'.join(names)}; axes: x red, y green, facing direction blue")
