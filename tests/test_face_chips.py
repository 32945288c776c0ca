"""dlib's face-recognition network on real faces of the bundled sample: the files are checked,
descriptors are deterministic and carry who the face is and its gender; what is not a face
is counted, not encoded."""

import shutil

import numpy as np
import pytest
from PIL import Image

from agegender.errors import PipelineError
from agegender.face_descriptor import (
    DESCRIPTOR_SIZE,
    MODEL_FILES,
    FaceEncoder,
    check_model_files,
    crop_face_margin,
    encode_files,
    landmarks_plausible,
)
from agegender.imdbwiki import read_mat


@pytest.fixture(scope="session")
def labelled_faces(sample_dir):
    """The sample's faces of folder 90, with gender from the real wiki.mat."""
    records = read_mat(sample_dir / "wiki.mat")
    records = (
        records[records["full_path"].str.startswith("90/")]
        .sort_values("full_path")
        .reset_index(drop=True)
    )
    records = records.assign(gender=records["gender"].astype(int))
    return records.assign(path=[sample_dir / path for path in records["full_path"]])


def test_missing_file_names_it_and_the_fix(tmp_path):
    with pytest.raises(
        PipelineError, match="shape_predictor_5_face_landmarks.dat is missing.*download_weights"
    ):
        check_model_files(tmp_path)


def test_corrupt_file_is_refused(tmp_path, face_models):
    for name, _ in MODEL_FILES.values():
        shutil.copy(face_models / name, tmp_path / name)
    descriptor = tmp_path / MODEL_FILES["descriptor"][0]
    descriptor.write_bytes(descriptor.read_bytes()[:1000])
    with pytest.raises(PipelineError, match="dlib_face_recognition_resnet_model_v1.dat is corrupt"):
        check_model_files(tmp_path)
    with pytest.raises(PipelineError, match="corrupt"):
        FaceEncoder(tmp_path, 0.4)


def test_plausible_landmarks():
    box = (0, 0, 100, 100)
    face = [(70, 40), (60, 40), (30, 40), (40, 40), (50, 60)]  # eye corners, then the nose below
    assert landmarks_plausible(face, box)
    assert not landmarks_plausible([(50, 40)] * 4 + [(50, 60)], box)  # eyes on one spot
    # nose above the eyes
    assert not landmarks_plausible([(70, 70), (60, 70), (30, 70), (40, 70), (50, 30)], box)
    assert not landmarks_plausible([(x + 300, y) for x, y in face], box)  # far outside the box


def test_face_margin_follows_the_crop_method():
    assert crop_face_margin({"method": "metadata", "margin": 0.3, "source_margin": 0.4}) == 0.3
    assert crop_face_margin({"method": "none", "margin": 0.3, "source_margin": 0.4}) == 0.4


def test_blank_image_has_no_landmarks_and_faces_have_descriptors(face_models, labelled_faces):
    encoder = FaceEncoder(face_models, 0.4)
    faces = [Image.open(path).convert("RGB") for path in labelled_faces["path"][:3]]
    rows = encoder.encode([Image.new("RGB", (64, 64), (128, 128, 128)), *faces])
    assert rows.shape == (4, DESCRIPTOR_SIZE) and rows.dtype == np.float32
    assert np.isnan(rows[0]).all()
    assert np.isfinite(rows[1:]).all()
    norms = np.linalg.norm(rows[1:], axis=1)
    assert ((norms > 0.2) & (norms < 2)).all()
    pairs = encoder.encode_with_mirror(faces)
    assert pairs.shape == (3, 2, DESCRIPTOR_SIZE)
    np.testing.assert_array_equal(pairs[:, 0], rows[1:])


def test_parallel_encoding_keeps_order_and_values(face_models, labelled_faces):
    paths = list(labelled_faces["path"][:10])
    one = encode_files(paths, face_models, 0.4, workers=1, chunk=3)
    two = encode_files(paths, face_models, 0.4, workers=2, chunk=3)
    np.testing.assert_array_equal(one, two)
    mirrored = encode_files(paths, face_models, 0.4, flip=True, workers=1)
    # a mirror image is the same person: closer to its original than to other people's faces
    same = np.linalg.norm(one - mirrored, axis=1)
    others = np.linalg.norm(one[:, None] - one[None], axis=2)[~np.eye(len(one), dtype=bool)]
    assert np.median(same) < 0.6 * np.median(others)
    assert np.median(same) < 0.6  # dlib's own same-person threshold


def test_descriptors_carry_gender(face_models, labelled_faces):
    """A network that knows faces: a linear model on 160 real faces' descriptors tells the
    gender of 80 other people well above the majority share."""
    from sklearn.linear_model import LogisticRegression

    faces = labelled_faces.head(240)
    rows = encode_files(list(faces["path"]), face_models, 0.4, workers=2)
    train, test = slice(0, 160), slice(160, 240)
    gender = faces["gender"].to_numpy()
    model = LogisticRegression(max_iter=1000).fit(rows[train], gender[train])
    accuracy = (model.predict(rows[test]) == gender[test]).mean()
    majority = max(gender[test].mean(), 1 - gender[test].mean())
    assert accuracy >= 0.85 and accuracy > majority + 0.1, (accuracy, majority)


def test_unreadable_file_counts_as_no_landmarks(face_models, labelled_faces, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    rows = encode_files([labelled_faces["path"][0], broken], face_models, 0.4, workers=1)
    assert np.isfinite(rows[0]).all() and np.isnan(rows[1]).all()


def test_encoding_with_workers_gives_what_one_process_gives(face_models, labelled_faces):
    faces = [Image.open(path).convert("RGB") for path in labelled_faces["path"][:5]]
    faces.append(Image.new("RGB", (64, 64), (128, 128, 128)))
    alone = FaceEncoder(face_models, 0.4).encode_with_mirror(faces)
    shared = FaceEncoder(face_models, 0.4, workers=2)
    np.testing.assert_array_equal(shared.encode_with_mirror(faces), alone)
    # the pool is reused
    np.testing.assert_array_equal(shared.encode_with_mirror(faces[:1]), alone[:1])
    assert np.isnan(alone[5]).all() and np.isfinite(alone[:5]).all()
    shared.pool.shutdown()
