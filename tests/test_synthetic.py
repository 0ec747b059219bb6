"""Synthetic heads: deterministic, cached, and in the angle convention of the real AFLW2000 labels."""
import numpy as np
import pytest
from scipy.io import loadmat

import hmtl_data


def geometry(right_eye, left_eye, nose):
    """Image-space facts about a face: (nose left/right of the eye midpoint, nose height below the eyes
    in eye distances, eye-line slope with y pointing down). right_eye is the subject's, on the image left."""
    mid = (right_eye + left_eye) / 2
    distance = np.linalg.norm(left_eye - right_eye)
    return nose[0] - mid[0], (nose[1] - mid[1]) / distance, (left_eye[1] - right_eye[1]) / (left_eye[0] - right_eye[0])


def aflw_faces(folder):
    faces = []
    for mat in sorted(folder.glob("*.mat")):
        m = loadmat(mat)
        pitch, yaw, roll = np.degrees(m["Pose_Para"][0, :3])
        points = m["pt3d_68"][:2]
        faces.append(((yaw, pitch, roll), geometry(points[:, 36:42].mean(1), points[:, 42:48].mean(1), points[:, 30])))
    return faces


def rendered(yaw, pitch, roll):
    _, marks, _ = hmtl_data.render_head(yaw, pitch, roll, 32, np.random.default_rng(0))  # marks: any size
    return geometry(marks["right_eye"], marks["left_eye"], marks["nose_tip"])


def test_renderer_puts_nose_and_eyes_where_real_aflw2000_faces_have_them(aflw_sample):
    faces = [f for f in aflw_faces(aflw_sample) if max(map(abs, f[0])) <= 99]
    assert len(faces) == 95
    turned = [(a, g) for a, g in faces if abs(a[0]) > 30]
    tilted = [(a, g) for a, g in faces if abs(a[2]) > 20 and abs(a[0]) < 45]
    assert len(turned) > 25 and len(tilted) > 5
    # Real data: yaw > 0 puts the nose left of the eye midpoint; roll > 0 slopes the eye line down to the right.
    assert np.mean([np.sign(g[0]) == -np.sign(a[0]) for a, g in turned]) > 0.9
    assert np.mean([np.sign(g[2]) == np.sign(a[2]) for a, g in tilted]) > 0.9
    # The renderer, asked for the same angles, agrees with each real face.
    assert np.mean([np.sign(rendered(*a)[0]) == np.sign(g[0]) for a, g in turned]) > 0.9
    assert np.mean([np.sign(rendered(*a)[2]) == np.sign(g[2]) for a, g in tilted]) > 0.9
    # Pitch: the higher the pitch, the higher the nose sits relative to the eyes, in both.
    level = [(a, g) for a, g in faces if abs(a[0]) < 45]
    pitch = np.array([a[1] for a, _ in level])
    assert np.corrcoef(pitch, [g[1] for _, g in level])[0, 1] < -0.3
    assert np.corrcoef(pitch, [rendered(*a)[1] for a, _ in level])[0, 1] < -0.3


@pytest.mark.parametrize("yaw,pitch,roll", [(0, 0, 0), (45, 10, -20), (-60, -30, 30), (20, 50, 5)])
def test_landmarks_sit_on_the_rendered_parts(yaw, pitch, roll):
    image, marks, material = hmtl_data.render_head(yaw, pitch, roll, 96, np.random.default_rng(3))
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    for name, part in (("nose_tip", "nose"), ("right_eye", "iris"), ("left_eye", "iris")):
        x, y = np.round(marks[name]).astype(int)
        if name == "left_eye" and yaw < -30 or name == "right_eye" and yaw > 30:
            continue  # the far eye is hidden by the head
        assert hmtl_data.MATERIALS.index(part) in material[y - 1:y + 2, x - 1:x + 2], name


def test_pose_matrix_is_a_rotation_with_hopenets_axes():
    for angles in [(0, 0, 0), (30, 0, 0), (0, 30, 0), (0, 0, 30), (-70, 40, -25)]:
        r = hmtl_data.pose_matrix(*angles)
        assert np.allclose(r @ r.T, np.eye(3)) and np.isclose(np.linalg.det(r), 1)
    # yaw > 0: the facing (z) axis points to the image left; pitch > 0: up; roll > 0: x axis goes down
    assert hmtl_data.pose_matrix(30, 0, 0)[0, 2] < 0 and hmtl_data.pose_matrix(0, 30, 0)[1, 2] < 0
    assert hmtl_data.pose_matrix(0, 0, 30)[1, 0] > 0


def test_synthetic_heads_are_deterministic_and_cached(tmp_path):
    a = hmtl_data.synthetic_heads(40, 32, seed=5, split=0, folder=tmp_path, workers=1)
    again = hmtl_data.synthetic_heads(40, 32, seed=5, split=0, folder=tmp_path, workers=1)
    folder = next(tmp_path.glob("synthetic-train-40-32px-seed5"))
    built = (folder / "images.npy").stat().st_mtime_ns
    assert np.array_equal(a.images, again.images) and np.array_equal(a.angles, again.angles)
    hmtl_data.synthetic_heads(40, 32, seed=5, split=0, folder=tmp_path, workers=2)
    assert (folder / "images.npy").stat().st_mtime_ns == built, "a matching cache is reused, not rebuilt"
    other = hmtl_data.synthetic_heads(40, 32, seed=6, split=0, folder=tmp_path, workers=1)
    val = hmtl_data.synthetic_heads(40, 32, seed=5, split=1, folder=tmp_path, workers=1)
    assert not np.array_equal(other.angles, a.angles) and not np.array_equal(val.angles, a.angles)
    yaw, pitch, roll = a.angles.T
    assert abs(yaw).max() <= 90 and abs(pitch).max() <= 60 and abs(roll).max() <= 60
    image, angles = a[7]
    assert image.shape == (32, 32, 3) and angles.tolist() == pytest.approx(list(hmtl_data.synthetic_pose(5, 0, 7)[1:]))
    assert not (tmp_path / "synthetic-train-40-32px-seed5.partial").exists()
