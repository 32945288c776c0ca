"""dlib's face-recognition network rebuilt in Keras from dlib's own file: it gives dlib's
descriptors on real faces (TensorFlow and JAX), saves and loads back, and a file that is not
the published network is refused with one paragraph naming it and the byte offset."""

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from agegender.contracts.errors import PipelineError
from agegender.facedata.face_chips import ChipCutter
from agegender.nets.face_network import (
    CHIP_SIZE,
    check_chips,
    face_network,
    read_dlib_network,
    trailing_blocks,
)

SAMPLE_ARCHIVE = Path(__file__).resolve().parents[1] / "data" / "sample" / "wiki_crop_sample.tar.gz"
NETWORK_FILE = "dlib_face_recognition_resnet_model_v1.dat"
TOLERANCE = 1e-4  # float32 sums in another order; measured: about 5e-7


@pytest.fixture(scope="module")
def models_dir():
    """The folder of dlib's published files, as the face_recognition_models package ships it."""
    package = pytest.importorskip(
        "face_recognition_models", reason="face_recognition_models (dlib's files) not installed"
    )
    return Path(package.__file__).parent / "models"


@pytest.fixture(scope="module")
def weights(models_dir):
    return read_dlib_network(models_dir / NETWORK_FILE)


@pytest.fixture(scope="module")
def network(weights):
    return face_network(weights)


@pytest.fixture(scope="module")
def faces(models_dir):
    """Six real faces of the bundled sample, cut into chips as the pipeline cuts them, and
    dlib's own descriptors of those chips."""
    import dlib

    cutter, chips = ChipCutter(models_dir, face_margin=0.4), []
    with tarfile.open(SAMPLE_ARCHIVE) as tar:
        for member in tar:
            if member.name.endswith(".jpg") and len(chips) < 6:
                chip, usable = cutter.chips([Image.open(tar.extractfile(member)).convert("RGB")])
                chips += list(chip[usable])
    dlib_network = dlib.face_recognition_model_v1(str(models_dir / NETWORK_FILE))
    expected = [dlib_network.compute_face_descriptor(chip) for chip in chips]
    return np.stack(chips), np.asarray(expected, np.float32)


def test_descriptors_are_dlibs_on_real_faces(network, faces):
    chips, expected = faces
    found = network.predict_on_batch(check_chips(chips))
    assert found.shape == (6, 128)
    assert np.abs(found - expected).max() <= TOLERANCE, np.abs(found - expected).max()
    np.testing.assert_array_equal(network.predict_on_batch(chips), found)  # uint8 chips too


JAX_PARITY = """
import sys
import keras, numpy as np
from agegender.nets.face_network import face_network
assert keras.backend.backend() == "jax"
chips, expected = np.load(sys.argv[1]), np.load(sys.argv[2])
print(np.abs(face_network(sys.argv[3]).predict_on_batch(chips) - expected).max())
"""


def test_descriptors_are_dlibs_under_jax(faces, models_dir, tmp_path):
    """The network is plain Keras: the JAX backend (fixed per process) gives the same."""
    chips, expected = faces
    np.save(tmp_path / "chips.npy", chips.astype(np.float32))
    np.save(tmp_path / "expected.npy", expected)
    arguments = [tmp_path / "chips.npy", tmp_path / "expected.npy", models_dir / NETWORK_FILE]
    result = subprocess.run(
        [sys.executable, "-c", JAX_PARITY, *map(str, arguments)],
        env={**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) <= TOLERANCE, result.stdout


def test_the_descriptor_layer_reads_the_pooled_features(network, weights, faces):
    chips = faces[0].astype(np.float32)
    pooled_model = face_network(weights, output="pooled")
    assert pooled_model.output.shape == (None, 256)
    assert "descriptor" not in [layer.name for layer in pooled_model.layers]
    pooled = pooled_model.predict_on_batch(chips)
    inside = keras.Model(network.input, network.get_layer("pooled").output)
    np.testing.assert_allclose(inside.predict_on_batch(chips), pooled, atol=1e-6)
    descriptor = pooled @ network.get_layer("descriptor").get_weights()[0]
    np.testing.assert_allclose(descriptor, network.predict_on_batch(chips), atol=1e-5)


def test_weights_are_read_in_keras_layouts_from_the_input_up(weights, models_dir):
    assert list(weights)[:3] == ["conv1/kernel", "conv1/bias", "affine1/scale"]
    assert list(weights)[-1] == "descriptor/kernel"
    assert weights["conv1/kernel"].shape == (7, 7, 3, 32)
    assert weights["res2_1_conv_a/kernel"].shape == (3, 3, 32, 64)
    assert weights["descriptor/kernel"].shape == (256, 128)
    assert sum(array.size for array in weights.values()) == 5_614_592
    assert all(array.dtype == np.float32 for array in weights.values())
    again = read_dlib_network(models_dir / NETWORK_FILE)
    assert list(again) == list(weights)
    assert all(np.array_equal(again[name], weights[name]) for name in weights)


def patched(data, old, new):
    """The bytes with the first `old` after the loss and the wrappers' versions replaced."""
    at = data.index(old, data.index(b"con_4"))
    return data[:at] + new + data[at + len(old) :]


@pytest.mark.parametrize(
    "make, expected",
    [
        (
            lambda data: data[:200],
            r"res2_2_affine_b's wrapper \(the file is cut short: 1 bytes needed, 0 left\)",
        ),
        (
            lambda data: data[:-100],
            r"the layer descriptor \(the file is cut short: 131072 bytes needed, 131044 left\)",
        ),
        (lambda data: data + b"\x00", "the end of the file after the descriptor layer"),
        (
            lambda data: np.random.default_rng(0).bytes(64),
            r"the version of the loss \(an integer\)",
        ),
        # conv1 with 4737 parameters instead of 7 * 7 * 3 * 32 + 32
        (
            lambda data: patched(data, b"\x01\x02\x02\x80\x12", b"\x01\x02\x02\x81\x12"),
            r"conv1, a tensor of 4736 values, found shape \(4737, 1, 1, 1\)",
        ),
        (lambda data: patched(data, b"con_4", b"con_9"), "the layer conv1: 'con_4'"),
    ],
    ids=["truncated-early", "truncated-late", "trailing-byte", "random", "params", "version"],
)
def test_a_file_that_is_not_the_network_is_refused(make, expected, models_dir, tmp_path):
    path = tmp_path / NETWORK_FILE
    path.write_bytes(make((models_dir / NETWORK_FILE).read_bytes()))
    with pytest.raises(PipelineError, match=rf"{expected} at byte offset \d+ of \d+") as error:
        face_network(path)
    assert str(path) in str(error.value) and "dvc repro download_weights" in str(error.value)
    assert sorted(tmp_path.iterdir()) == [path]  # nothing written


def test_another_dlib_file_is_refused(models_dir):
    landmarks = models_dir / "shape_predictor_5_face_landmarks.dat"
    with pytest.raises(
        PipelineError, match=r"shape_predictor_5_face_landmarks.dat is not .* offset \d+ of"
    ):
        read_dlib_network(landmarks)
    with pytest.raises(PipelineError, match="could not read .*missing.dat"):
        read_dlib_network(models_dir / "missing.dat")


def test_a_saved_model_holding_the_network_loads_back(network, faces, tmp_path):
    chips = keras.Input((CHIP_SIZE, CHIP_SIZE, 3), name="chip")
    holder = keras.Model(chips, keras.layers.Dense(2, name="head")(network(chips)))
    holder.save(tmp_path / "holder.keras")
    loaded = keras.saving.load_model(tmp_path / "holder.keras")
    given = faces[0].astype(np.float32)
    np.testing.assert_allclose(loaded.predict_on_batch(given), holder.predict_on_batch(given))


def test_chips_of_another_size_are_refused():
    for shape in [(2, 64, 64, 3), (CHIP_SIZE, CHIP_SIZE, 3), (1, CHIP_SIZE, CHIP_SIZE, 1)]:
        with pytest.raises(PipelineError, match=r"\(N, 150, 150, 3\).*" + re.escape(str(shape))):
            check_chips(np.zeros(shape, np.uint8))
    assert check_chips(np.zeros((1, CHIP_SIZE, CHIP_SIZE, 3), np.uint8)).dtype == np.float32


def test_layer_names_let_fine_tuning_pick_whole_blocks():
    model = face_network(None)
    names = [layer.name for layer in model.layers]
    assert {"chip", "conv1", "affine1", "pooled", "descriptor"} <= set(names)
    assert model.output.shape == (None, 128)
    assert trailing_blocks(model, 1) == [
        f"res5_1_{kind}" for kind in ("conv_a", "affine_a", "conv_b", "affine_b")
    ]
    assert trailing_blocks(model, 2)[:4] == [
        f"res4_3_{kind}" for kind in ("conv_a", "affine_a", "conv_b", "affine_b")
    ]
    assert trailing_blocks(model, 0) == []
    assert len(trailing_blocks(model, 99)) == 14 * 4  # all fourteen blocks, nothing else
