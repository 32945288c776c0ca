"""The inference core: image and chip models, real faces, faces without landmarks, clear errors."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agegender.contracts.errors import PipelineError
from agegender.facedata.face_chips import ChipCutter
from agegender.inference.predictor import (
    ANSWER_FIELDS,
    GENDERS,
    Predictor,
    as_photo,
    crop_box,
    find_faces,
    open_model,
    readable,
    takes_chips,
)
from agegender.nets.model import build_networks

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
BINS = [0, 10, 20, 30, 40, 50, 60]
PARAMS = {
    "crop": {"method": "metadata", "margin": 0.4, "source_margin": 0.4, "size": 64},
    "evaluate": {"age_bins": BINS},
}


@pytest.fixture
def crops(sample_dir):
    paths = sorted((sample_dir / "90").glob("*.jpg"))[:5]
    return [Image.open(path).convert("RGB") for path in paths]


def test_the_saved_chip_model_averages_a_face_and_its_mirror(chip_model):
    model = open_model(chip_model)
    assert takes_chips(model) and model.input_shape == (None, 150, 150, 3)
    head, network = model.get_layer("head"), model.get_layer("dlib_resnet")
    chips = np.random.default_rng(1).uniform(0, 255, (3, 150, 150, 3)).astype(np.float32)
    both = model.predict(chips, verbose=0)
    one = head.predict(network.predict(chips, verbose=0), verbose=0)
    mirror = head.predict(network.predict(chips[:, :, ::-1], verbose=0), verbose=0)
    for task in ("gender", "age"):
        np.testing.assert_allclose(both[task], (one[task] + mirror[task]) / 2, atol=1e-6)
        assert not np.allclose(one[task], mirror[task], atol=1e-6)  # both sides reach the heads


def test_chip_model_without_its_landmark_file_says_where_it_goes(chip_model, tmp_path, crops):
    with pytest.raises(PipelineError, match="needs dlib's landmark model"):
        Predictor(open_model(chip_model)).crops(crops)
    with pytest.raises(PipelineError, match="shape_predictor.*missing.*download_weights"):
        Predictor.load(chip_model, PARAMS, tmp_path)


def test_missing_or_broken_model_file(tmp_path):
    with pytest.raises(PipelineError, match="not found; train it"):
        open_model(tmp_path / "none.keras", hint="train it")
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    with pytest.raises(PipelineError, match="could not be loaded as a Keras model"):
        open_model(tmp_path / "broken.keras")


def test_real_faces_through_the_chip_model(chip_model, face_models, crops):
    predictor = Predictor.load(chip_model, PARAMS, face_models, batch_size=2)
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    outputs = predictor.outputs([*crops, blank])
    assert outputs["gender"].shape == (6, 2) and outputs["age"].shape == (6, 101)
    assert np.isfinite(outputs["age"][:5]).all() and np.isnan(outputs["age"][5]).all()
    np.testing.assert_allclose(outputs["age"][:5].sum(axis=1), 1, atol=1e-5)
    # the same as the model on the chips the features stage would cut
    chips, usable = ChipCutter(face_models, 0.4).chips(crops)
    assert usable.all()
    direct = predictor.model.predict(chips.astype(np.float32), verbose=0)
    np.testing.assert_allclose(outputs["age"][:5], direct["age"], atol=1e-6)
    results = predictor.crops([*crops, blank])
    assert results[5] is None and all(result["gender"] in GENDERS for result in results[:5])


def test_image_model_resizes_crops(crops):
    model = build_networks(32, head_units=(8,), trainable_layers=0).image_model
    predictor = Predictor(model, cutter="ignored for an image model", batch_size=4)
    assert predictor.cutter is None
    outputs = predictor.outputs(crops)
    assert outputs["gender"].shape == (5, 2) and np.isfinite(outputs["gender"]).all()
    assert predictor.outputs([])["age"].shape == (0, 101)


def test_readable_fields():
    age = np.zeros((2, 101))
    age[0, 34], age[0, 36] = 0.5, 0.5
    age[1] = np.nan
    gender = np.array([[0.2, 0.8], [np.nan, np.nan]])
    first, second = readable({"gender": gender, "age": age}, BINS)
    assert first == {
        "gender": "male",
        "gender_prob": 0.8,
        "age": 35.0,
        "age_bin": "30-39",
        "most_likely_age_bin": "30-39",
        "most_likely_age_bin_prob": 1.0,
    }
    assert second is None


def test_the_age_bin_is_the_expected_ages_and_the_likeliest_bin_is_named_apart():
    """Half the mass at 25, the rest spread over 40-69: the expected age, 39.75, lies in 30-39,
    a bin with no mass at all, while the likeliest bin is 20-29 (0.5 against 1/6 for 40-49)."""
    age = np.zeros((1, 101))
    age[0, 25] = 0.5
    age[0, 40:70] = 0.5 / 30
    (answer,) = readable({"gender": np.array([[0.9, 0.1]]), "age": age}, BINS)
    assert "age_range" not in answer  # outputs without ranges: a predictor with no calibration
    ranges = np.array([[21.0, 66.5]])
    (ranged,) = readable({"gender": np.array([[0.9, 0.1]]), "age": age, "age_range": ranges}, BINS)
    assert ranged == {**answer, "age_range": [21.0, 66.5]}
    assert list(ranged) == ANSWER_FIELDS
    assert answer["gender"] == "female" and answer["gender_prob"] == 0.9
    assert answer["age"] == pytest.approx(39.75, abs=1e-5)
    assert answer["age_bin"] == "30-39"
    assert answer["most_likely_age_bin"] == "20-29"
    assert answer["most_likely_age_bin_prob"] == pytest.approx(0.5, abs=1e-6)


def test_photos_come_as_images_arrays_or_paths(tmp_path):
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:, :, 0] = 200
    Image.fromarray(pixels).save(tmp_path / "red.png")
    for photo in (Image.fromarray(pixels), pixels, tmp_path / "red.png", str(tmp_path / "red.png")):
        image = as_photo(photo)
        assert image.mode == "RGB" and image.size == (30, 20)
        assert np.array_equal(np.asarray(image), pixels)
    with pytest.raises(ValueError, match="height, width, 3"):
        as_photo(np.zeros((20, 30)))


def test_crops_are_reframed_to_the_training_crops(crops):
    """A crop that carries more margin than the training crops is cut down to their framing:
    a 0.8 margin crop answered with margin=0.8 gives what its inner 0.4 crop gives."""
    model = build_networks(32, head_units=(8,), trainable_layers=0).image_model
    predictor = Predictor(model, face_margin=0.4, size=32, age_bins=BINS)
    wide = Image.new("RGB", (130, 130))
    wide.paste(crops[0].resize((100, 100)), (15, 15))  # face box 100/1.8 = 55.6 px, now 0.67
    margin = (130 / (100 / 1.8) - 1) / 2
    reframed = predictor.framed(wide, margin)
    assert reframed.size == (32, 32)
    direct = predictor.framed(crops[0].resize((100, 100)), 0.4)
    assert np.abs(np.asarray(reframed, float) - np.asarray(direct, float)).mean() < 4
    assert crop_box(wide, margin) == (37, 37, 93, 93)


def test_a_chip_model_frames_sharp_faces_at_the_cutters_size(chip_model, face_models):
    """A chip model frames a photo's face at the cutter's working size (256 px), so the chip is
    cut after one resampling: it keeps detail that a frame of crop.size (64 here) would blur.
    A pixel model frames at crop.size."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photo = Image.open(path).convert("RGB")
    (small,) = find_faces([photo], margin=0.4, size=64)
    cutter = ChipCutter(face_models, 0.4)
    predictor = Predictor(open_model(chip_model), cutter, size=64)
    assert predictor.crop_size == 256
    (found,) = predictor.detect([photo])
    assert found[0].crop.size == (256, 256)

    def detail(image):
        return np.abs(np.diff(np.asarray(cutter.chip(image), float), axis=1)).mean()

    assert detail(found[0].crop) > 1.3 * detail(small[0].crop)
    pixels = build_networks(32, head_units=(8,), trainable_layers=0).image_model
    assert Predictor(pixels, cutter, size=32).framed(found[0].crop).size == (32, 32)


def test_the_pretrained_networks_alone_read_the_fused_models_chips(
    face_models, cydral_models, sample_dir, tmp_path
):
    """For a fused model, Cydral's networks as they are, on the very chips that model reads:
    their own answers, unchanged; nothing for another model or without the two files."""
    import keras

    from agegender.facedata.face_chips import MODEL_FILES
    from agegender.inference.predictor import pretrained_predictor
    from agegender.nets.cydral_networks import cydral_network
    from agegender.nets.model import age_chip

    fused = build_networks(
        64,
        backbone="dlib_resnet+cydral_age",
        weights_file=face_models / MODEL_FILES["descriptor"][0],
        age_network_file=cydral_models / "age-v1.onnx",
        head_units=(8,),
    ).image_model
    for name in ("shape_predictor_5_face_landmarks.dat", "age-v1.onnx", "gender-v1.onnx"):
        source = (face_models if name.endswith(".dat") else cydral_models) / name
        (tmp_path / name).symlink_to(source)
    predictor = Predictor(fused, ChipCutter(tmp_path, 0.4))
    alone = pretrained_predictor(predictor, tmp_path)
    paths = sorted((sample_dir / "90").glob("*.jpg"))[:4]
    chips = np.stack([ChipCutter(tmp_path, 0.4).chip(Image.open(p).convert("RGB")) for p in paths])
    outputs = alone.outputs_of_inputs(chips.astype(np.float32))
    inputs = keras.Input((150, 150, 3))
    for task, classes in (("age", 81), ("gender", 2)):
        network = cydral_network(cydral_models / f"{task}-v1.onnx")
        own = np.asarray(network(keras.Model(inputs, age_chip(inputs, task))(chips)))
        np.testing.assert_allclose(outputs[task][:, :classes], own, atol=1e-5)
    assert (outputs["age"][:, 81:] == 0).all()
    chip_only = build_networks(
        64, backbone="dlib_resnet", weights_file=face_models / MODEL_FILES["descriptor"][0]
    ).image_model
    assert pretrained_predictor(Predictor(chip_only, ChipCutter(tmp_path, 0.4)), tmp_path) is None
    (tmp_path / "gender-v1.onnx").unlink()
    assert pretrained_predictor(predictor, tmp_path) is None
