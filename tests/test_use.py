"""Using a trained model: prediction with drawn axes, and export."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy.io import loadmat

import hmtl
import hmtl_data
import hmtl_tiles
import hmtl_use


pytestmark = pytest.mark.xdist_group("learned")  # one process trains the runs these tests use (conftest.learned)


@pytest.fixture(scope="module")
def checkpoint(learned):
    return learned["hmtl"][0] / "last.pt"  # its SS heads are dropped: the deployable network is SL's


def facing_side(yaw, pitch, roll, size=200):
    """Which side of the image centre the drawn facing (blue) axis points to: -1 left, +1 right."""
    image = Image.new("RGB", (size, size))
    hmtl_use.draw_axes(ImageDraw.Draw(image), yaw, pitch, roll, (size / 2, size / 2), size / 3)
    blue = np.argwhere((np.asarray(image) == (0, 0, 255)).all(-1))
    return np.sign(blue[:, 1].mean() - size / 2)


def test_drawn_facing_axis_points_where_the_nose_is_in_real_faces(aflw_sample):
    checked = 0
    for mat in sorted(aflw_sample.glob("*.mat")):
        m = loadmat(mat)
        pitch, yaw, roll = np.degrees(m["Pose_Para"][0, :3])
        if not 30 < abs(yaw) <= 99:
            continue
        points = m["pt3d_68"][:2]
        nose_side = np.sign(points[0, 30] - (points[0, 36:48].mean()))
        assert facing_side(yaw, pitch, roll) == nose_side, mat.name
        checked += 1
    assert checked > 25


def test_predict_writes_a_csv_and_images_with_axes(checkpoint, aflw_sample, tmp_path):
    (tmp_path / "faces").mkdir()
    for image in sorted(aflw_sample.glob("*.jpg"))[:10]:
        (tmp_path / "faces" / image.name).write_bytes(image.read_bytes())
    images = sorted((tmp_path / "faces").glob("*.jpg"))
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x_min,y_min,x_max,y_max\n" + f"{images[0].name},100,120,300,330\n")
    rows = hmtl.main(["--predict", *map(str, images[:5]), str(tmp_path / "faces"), "--checkpoint", str(checkpoint),
                      "--boxes", str(boxes), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert len(rows) == 5 + 10
    with open(tmp_path / "out" / "predictions.csv") as f:
        written = list(csv.DictReader(f))
    assert [r["path"] for r in written] == [r["path"] for r in rows]
    assert set(written[0]) == {"path", "yaw", "pitch", "roll", "drawn"}
    assert len({r["drawn"] for r in written}) == 15  # the 5 images given twice are drawn twice, apart
    assert all((tmp_path / "out" / r["drawn"]).is_file() for r in written)
    drawn = np.asarray(Image.open(tmp_path / "out" / written[0]["drawn"]))
    assert (drawn[225, 200] == (0, 0, 255)).all()  # the axes start at the box's centre
    # every row is the network's answer on that image's crop: its box (matched by name), else the whole image
    net, cfg = hmtl.trained_estimator(checkpoint, torch.device("cpu"))
    crop = lambda path, box: hmtl_data.square_crop(Image.open(path).convert("RGB"), box, cfg["img_size"])
    boxed = lambda path: (100, 120, 300, 330) if Path(path).name == images[0].name else (0, 0, 450, 450)
    with torch.no_grad():
        direct = net(hmtl_tiles.normalize(torch.from_numpy(np.stack([crop(r["path"], boxed(r["path"]))
                                                                     for r in written]))))
        whole = net(hmtl_tiles.normalize(torch.from_numpy(crop(images[0], (0, 0, 450, 450))[None])))
    csv_angles = torch.tensor([[float(r[a]) for a in ("yaw", "pitch", "roll")] for r in written])
    torch.testing.assert_close(csv_angles, direct, atol=1e-3, rtol=0)  # rounded to 3 decimals
    assert not torch.allclose(direct[0], whole[0], atol=0.1)  # the box made a difference


def test_predict_refuses_a_folder_without_images(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="no .jpg, .jpeg, .png or .bmp images"):
        hmtl.main(["--predict", str(tmp_path), "--checkpoint", str(checkpoint)])


def test_export_matches_pytorch_and_has_the_sl_networks_parameters(checkpoint, tmp_path):
    report = hmtl.main(["--export", str(tmp_path / "exported"), "--checkpoint", str(checkpoint)])
    sl = hmtl.HMTL("resnet18", 3, "catreg", 3, task="none")  # no SS branch
    assert report["parameters"] == sum(p.numel() for p in sl.parameters())
    assert report["torch.export"] <= 1e-3
    assert json.loads((tmp_path / "exported" / "export.json").read_text()) == report
    net, _ = hmtl.trained_estimator(checkpoint, torch.device("cpu"))
    x = torch.randn(5, 3, 32, 32)  # another batch size than the one exported with
    program = torch.export.load(tmp_path / "exported" / "hmtl.pt2").module()
    torch.testing.assert_close(program(x), net(x), atol=1e-3, rtol=0)
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    assert report["onnx"] <= 1e-3
    session = ort.InferenceSession(str(tmp_path / "exported" / "hmtl.onnx"))
    np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], net(x).detach().numpy(), atol=1e-3)


def test_predict_skips_bad_images_writes_the_rest_and_exits_nonzero(checkpoint, aflw_sample, tmp_path):
    folder = tmp_path / "faces"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    good = sorted(aflw_sample.glob("*.jpg"))[:3]
    for sub in ("a", "b"):
        for image in good:
            (folder / sub / image.name).write_bytes(image.read_bytes())
    (folder / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(f"path,x_min,y_min,x_max,y_max\n{folder / 'b' / good[0].name},900,900,990,990\n"
                     "nowhere.jpg,1,1,5,5\n")
    with pytest.raises(SystemExit, match="2 of 7 images were skipped .listed above.; .*predictions.csv holds the other 5"):
        hmtl.main(["--predict", str(folder), "--checkpoint", str(checkpoint), "--boxes", str(boxes),
                   "--out", str(tmp_path / "out"), "--device", "cpu"])
    with open(tmp_path / "out" / "predictions.csv") as f:
        written = list(csv.DictReader(f))
    assert len(written) == 5 and not any("broken" in r["path"] for r in written)
    drawn = sorted(r["drawn"] for r in written)
    assert len(set(drawn)) == 5 and f"{good[1].stem}-2_axes.png" in drawn  # a/x.jpg and b/x.jpg both kept
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == drawn


@pytest.mark.parametrize("text,message", [
    ("path,x_min,y_min\nface.png,1,2\n", "needs the columns path,x_min,y_min,x_max,y_max, its header is"),
    ("", "needs the columns"),
    ("path,x_min,y_min,x_max,y_max\nface.png,1,2,three,4\n", "line 2: x_min, y_min, x_max, y_max must be numbers"),
    ("path,x_min,y_min,x_max,y_max\nface.png,1,2,30\n", "line 2: x_min, y_min, x_max, y_max must be numbers"),
    ("path,x_min,y_min,x_max,y_max\nface.png,10,2,5,40\n", "line 2: the box .* is empty"),
    ("path,x_min,y_min,x_max,y_max\nface.png,1,2,30,40\nother.png,0,0,9,9\nface.png,1,1,8,8\n",
     "line 4: face.png already has a box on line 2"),
    ("path,x_min,y_min,x_max,y_max\nface.png,1,2,nan,40\n", "line 2: the box .* is empty"),
])
def test_malformed_box_files_name_the_file_and_line(checkpoint, tmp_path, text, message):
    Image.new("RGB", (40, 40)).save(tmp_path / "face.png")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(text)
    with pytest.raises(SystemExit, match=f"--boxes {boxes}.*{message}"):
        hmtl.main(["--predict", str(tmp_path / "face.png"), "--checkpoint", str(checkpoint), "--boxes", str(boxes),
                   "--out", str(tmp_path / "out")])


def test_a_box_file_that_is_not_text_is_refused(checkpoint, tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "face.png")
    (tmp_path / "boxes.csv").write_bytes(b"\xff\xfe\x00path")
    with pytest.raises(SystemExit, match="boxes.csv: not a UTF-8 CSV file"):
        hmtl.main(["--predict", str(tmp_path / "face.png"), "--checkpoint", str(checkpoint), "--boxes",
                   str(tmp_path / "boxes.csv")])


def test_unmatched_box_rows_are_reported(checkpoint, tmp_path, capsys):
    Image.new("RGB", (40, 40)).save(tmp_path / "face.png")
    (tmp_path / "boxes.csv").write_text("path,x_min,y_min,x_max,y_max\nface.png,0,0,40,40\nghost.png,0,0,9,9\n")
    rows = hmtl.main(["--predict", str(tmp_path / "face.png"), "--checkpoint", str(checkpoint), "--boxes",
                      str(tmp_path / "boxes.csv"), "--out", str(tmp_path / "out")])
    assert len(rows) == 1 and "1 row(s) match no image given to --predict, lines 3" in capsys.readouterr().err


def test_predict_and_export_refuse_a_checkpoint_with_broken_weights(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    state["model"]["stem.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "broken.pt")
    image = tmp_path / "face.png"
    Image.new("RGB", (40, 40)).save(image)
    with pytest.raises(SystemExit, match="broken.pt: its weights hold NaN"):
        hmtl.main(["--predict", str(image), "--checkpoint", str(tmp_path / "broken.pt"), "--out", str(tmp_path / "p")])
    with pytest.raises(SystemExit, match="broken.pt: its weights hold NaN"):
        hmtl.main(["--export", str(tmp_path / "e"), "--checkpoint", str(tmp_path / "broken.pt")])
    with pytest.raises(SystemExit, match="broken.pt: its weights hold NaN"):  # never NaN metrics
        hmtl.main(["--eval-only", "--checkpoint", str(tmp_path / "broken.pt")])


def test_the_deployed_network_gives_the_angles_evaluation_scored(learned):
    """PoseEstimator (what --predict and --export ship) decodes the pose heads as evaluate does: its MAE on
    the validation faces is the run's own."""
    folder, summary = learned["hmtl"]
    val = hmtl_data.biwi_arrays(folder.parent / "val.npz", 32)
    net, _ = hmtl.trained_estimator(folder / "last.pt", torch.device("cpu"))
    with torch.no_grad():
        angles = net(hmtl_tiles.normalize(torch.from_numpy(np.asarray(val.images))))
    errors = (angles - torch.from_numpy(val.angles)).abs().mean(0).tolist()
    assert errors == pytest.approx([summary[f"val_mae_{a}"] for a in ("yaw", "pitch", "roll")], abs=1e-3)


def test_a_16_bit_png_is_predicted_as_its_8_bit_copy(checkpoint, aflw_sample, tmp_path):
    grey = np.asarray(Image.open(sorted(aflw_sample.glob("*.jpg"))[0]).convert("L"))
    Image.fromarray(grey).save(tmp_path / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # 0..65535
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"
    rows = hmtl.main(["--predict", str(tmp_path / "eight.png"), str(tmp_path / "sixteen.png"), "--checkpoint",
                      str(checkpoint), "--out", str(tmp_path / "out")])
    assert [rows[1][a] for a in ("yaw", "pitch", "roll")] == [rows[0][a] for a in ("yaw", "pitch", "roll")]


def test_a_box_with_no_whole_pixel_is_skipped_by_its_line_and_the_rest_predicted(checkpoint, tmp_path, capsys):
    for name in ("thin.png", "good.png"):
        Image.new("RGB", (40, 40), (90, 60, 30)).save(tmp_path / name)
    (tmp_path / "boxes.csv").write_text("path,x_min,y_min,x_max,y_max\nthin.png,10.2,10,10.9,30\n"
                                        "good.png,5,5,35,35\n")
    with pytest.raises(SystemExit, match="1 of 2 images were skipped"):
        hmtl.main(["--predict", str(tmp_path / "thin.png"), str(tmp_path / "good.png"), "--checkpoint", str(checkpoint),
                   "--boxes", str(tmp_path / "boxes.csv"), "--out", str(tmp_path / "out")])
    assert "thin.png: skipped: its box (10.2, 10.0, 10.9, 30.0) (--boxes line 2) holds no whole pixel" in \
        capsys.readouterr().err
    with open(tmp_path / "out" / "predictions.csv") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [str(tmp_path / "good.png")]


def test_output_paths_that_cannot_be_written_name_the_flag_and_path(checkpoint, tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "face.png")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=f"^--out {tmp_path / 'file'}: cannot write a folder there"):
        hmtl.main(["--predict", str(tmp_path / "face.png"), "--checkpoint", str(checkpoint), "--out",
                   str(tmp_path / "file")])
    with pytest.raises(SystemExit, match=f"^--export {tmp_path / 'file' / 'e'}: cannot write a folder there"):
        hmtl.main(["--export", str(tmp_path / "file" / "e"), "--checkpoint", str(checkpoint)])
