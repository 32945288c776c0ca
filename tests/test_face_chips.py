"""Aligned face chips cut from real faces of the bundled sample: the files are checked, chips
are the same however they are batched, and carry who the face is and its gender (through
dlib's face network in Keras); what is not a face is counted, not cut."""

import shutil

import numpy as np
import pytest
from PIL import Image

from agegender.contracts.errors import PipelineError
from agegender.facedata.face_chips import (
    CHIP_SIZE,
    MODEL_FILES,
    ChipCutter,
    check_model_files,
    chip_batches,
    crop_face_margin,
    landmarks_plausible,
)
from agegender.facedata.imdbwiki import read_mat


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


def chips_of_files(paths, face_models, chunk=64):
    parts = list(chip_batches(paths, face_models, 0.4, chunk=chunk))
    return np.concatenate([c for c, _ in parts]), np.concatenate([u for _, u in parts])


def test_missing_file_names_it_and_the_fix(tmp_path):
    with pytest.raises(
        PipelineError, match="shape_predictor_5_face_landmarks.dat is missing.*download_weights"
    ):
        check_model_files(tmp_path)


def test_corrupt_file_is_refused(tmp_path, face_models):
    for name, _ in MODEL_FILES.values():
        shutil.copy(face_models / name, tmp_path / name)
    landmarks = tmp_path / MODEL_FILES["landmarks"][0]
    landmarks.write_bytes(landmarks.read_bytes()[:1000])
    with pytest.raises(PipelineError, match="shape_predictor_5_face_landmarks.dat is corrupt"):
        check_model_files(tmp_path)
    with pytest.raises(PipelineError, match="corrupt"):
        ChipCutter(tmp_path, 0.4)


def test_cutting_chips_needs_the_landmark_model_alone(tmp_path, face_models):
    name = MODEL_FILES["landmarks"][0]
    shutil.copy(face_models / name, tmp_path / name)
    chips, usable = ChipCutter(tmp_path, 0.4).chips([Image.new("RGB", (64, 64))])
    assert chips.shape == (1, CHIP_SIZE, CHIP_SIZE, 3) and not usable[0]


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


def test_blank_image_has_no_landmarks_and_faces_have_chips(face_models, labelled_faces):
    cutter = ChipCutter(face_models, 0.4)
    faces = [Image.open(path).convert("RGB") for path in labelled_faces["path"][:3]]
    chips, usable = cutter.chips([Image.new("RGB", (64, 64), (128, 128, 128)), *faces])
    assert chips.shape == (4, CHIP_SIZE, CHIP_SIZE, 3) and chips.dtype == np.uint8
    assert usable.tolist() == [False, True, True, True]
    assert not chips[0].any() and all(chip.std() > 10 for chip in chips[1:])


def test_chunks_cut_ahead_keep_order_and_values(face_models, labelled_faces, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths = [*labelled_faces["path"][:9], broken]
    by_three, usable = chips_of_files(paths, face_models, chunk=3)  # 4 chunks, 2 cut ahead
    whole, usable_whole = chips_of_files(paths, face_models, chunk=100)
    np.testing.assert_array_equal(by_three, whole)
    np.testing.assert_array_equal(usable, usable_whole)
    assert usable[:9].all() and not usable[9]  # unreadable: counted as no landmarks
    faces = [Image.open(path).convert("RGB") for path in paths[:9]]
    np.testing.assert_array_equal(ChipCutter(face_models, 0.4).chips(faces)[0], whole[:9])
    assert len({chip.tobytes() for chip in whole[:9]}) == 9  # nine faces, nine chips


def test_chips_carry_gender_through_the_face_network(face_models, labelled_faces):
    """A network that knows faces: a linear model on 160 real faces' descriptors (dlib's
    network in Keras, on the chips cut here) tells the gender of 80 other people well above the
    majority share."""
    from sklearn.linear_model import LogisticRegression

    from agegender.nets.face_network import face_network

    faces = labelled_faces.head(240)
    chips, usable = chips_of_files(list(faces["path"]), face_models)
    network = face_network(face_models / MODEL_FILES["descriptor"][0])
    rows = np.concatenate(
        [network.predict_on_batch(chips[i : i + 64].astype(np.float32)) for i in range(0, 240, 64)]
    )
    gender = faces["gender"].to_numpy()
    train, test = np.arange(240) < 160, np.arange(240) >= 160
    train, test = train & usable, test & usable
    model = LogisticRegression(max_iter=1000).fit(rows[train], gender[train])
    accuracy = (model.predict(rows[test]) == gender[test]).mean()
    majority = max(gender[test].mean(), 1 - gender[test].mean())
    assert accuracy >= 0.85 and accuracy > majority + 0.1, (accuracy, majority)
