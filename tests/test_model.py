"""agegender.model and agegender.data: the VGG16 transfer model and its input pipeline."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

keras = pytest.importorskip("keras")

from agegender.model import TASKS, build_model, compile_model  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module")
def model():
    return build_model(SIZE, weights_file=None, trainable_layers=3, head_units=(32, 16), dropout=0.3)


def conv_layers(model):
    return [layer for layer in model.get_layer("vgg16").layers if isinstance(layer, keras.layers.Conv2D)]


def test_outputs(model):
    shapes = {model.get_layer(task).name: tuple(model.get_layer(task).output.shape) for task in TASKS}
    assert shapes == {"gender": (None, 2), "age": (None, 101)}
    assert sorted(tuple(output.shape) for output in model.outputs) == [(None, 2), (None, 101)]
    images = np.random.default_rng(0).uniform(0, 255, (3, SIZE, SIZE, 3)).astype("float32")
    predicted = model.predict(images, verbose=0)
    assert set(predicted) == {"gender", "age"}
    assert predicted["gender"].shape == (3, 2) and predicted["age"].shape == (3, 101)
    for task in TASKS:
        assert predicted[task].sum(axis=1) == pytest.approx(np.ones(3), abs=1e-5)
        assert (predicted[task] >= 0).all()


def test_only_the_last_three_conv_layers_train(model):
    convs = conv_layers(model)
    assert len(convs) == 13
    trainable = [layer.name for layer in convs if layer.trainable]
    assert trainable == ["block5_conv1", "block5_conv2", "block5_conv3"]
    base = model.get_layer("vgg16")
    assert len(base.trainable_weights) == 6               # 3 kernels + 3 biases
    assert len(base.non_trainable_weights) == 20


def test_trainable_layers_zero_freezes_the_whole_base():
    model = build_model(32, trainable_layers=0, head_units=(8, 8))
    assert not model.get_layer("vgg16").trainable_weights
    assert model.trainable_weights  # the head still trains


def test_head_per_task(model):
    dense = {layer.name: layer for layer in model.layers if isinstance(layer, keras.layers.Dense)}
    assert set(dense) == {"gender_dense1", "gender_dense2", "gender", "age_dense1", "age_dense2", "age"}
    assert all(layer.trainable for layer in dense.values())
    assert (dense["gender_dense1"].units, dense["gender_dense2"].units, dense["gender"].units) == (32, 16, 2)
    assert (dense["age_dense1"].units, dense["age_dense2"].units, dense["age"].units) == (32, 16, 101)
    assert dense["age_dense1"].activation.__name__ == "relu"
    assert dense["age"].activation.__name__ == "softmax"
    dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert len(dropouts) == 4 and all(layer.rate == 0.3 for layer in dropouts)


def test_augmentation_only_in_training():
    model = build_model(32, trainable_layers=0, head_units=(8, 8), flip=True, brightness=0.2)
    names = [layer.name for layer in model.layers]
    assert "augment_flip" in names and "augment_brightness" in names
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    first, second = model(images, training=False), model(images, training=False)
    np.testing.assert_allclose(np.asarray(first["age"]), np.asarray(second["age"]))
    assert "augment_flip" not in [layer.name for layer in build_model(32, head_units=(8, 8)).layers]


def test_compile_and_one_training_step(model):
    compile_model(model, lr=1e-3, loss_weights={"gender": 1.0, "age": 0.5})
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")
    labels = {
        "gender": keras.utils.to_categorical([0, 1, 1, 0], 2),
        "age": keras.utils.to_categorical([20, 35, 60, 5], 101),
    }
    frozen_before = [w.numpy().copy() for w in model.get_layer("vgg16").get_layer("block1_conv1").weights]
    trained_before = model.get_layer("vgg16").get_layer("block5_conv3").kernel.numpy().copy()
    history = model.fit(images, labels, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert {"gender_accuracy", "age_accuracy"} <= set(history.history)
    for before, after in zip(frozen_before, model.get_layer("vgg16").get_layer("block1_conv1").weights):
        np.testing.assert_array_equal(before, after.numpy())
    assert not np.array_equal(trained_before, model.get_layer("vgg16").get_layer("block5_conv3").kernel.numpy())


# the input pipeline

@pytest.fixture
def crops(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30), (200, 200, 200)]
    sizes = [(64, 64), (80, 60), (32, 32), (64, 64), (100, 100)]
    paths = []
    for index, (colour, size) in enumerate(zip(colours, sizes)):
        path = f"9{index}/{index}.jpg"
        (tmp_path / path).parent.mkdir()
        Image.new("RGB", size, colour).save(tmp_path / path, quality=100)
        paths.append(path)
    table = pd.DataFrame({"full_path": paths, "gender": [1, 0, 1, 0, 1], "age": [20, 35, 0, 100, 120]})
    return tmp_path, table, colours


def batches(dataset):
    return [(images.numpy(), {task: labels[task].numpy() for task in labels}) for images, labels in dataset]


def test_image_dataset_batches(crops):
    from agegender.data import image_dataset

    image_dir, table, colours = crops
    got = batches(image_dataset(table, image_dir, SIZE, batch_size=2))
    assert [images.shape for images, _ in got] == [(2, SIZE, SIZE, 3), (2, SIZE, SIZE, 3), (1, SIZE, SIZE, 3)]
    images = np.concatenate([b[0] for b in got])
    gender = np.concatenate([b[1]["gender"] for b in got])
    age = np.concatenate([b[1]["age"] for b in got])
    assert images.dtype == np.float32
    assert np.abs(images.mean(axis=(1, 2)) - np.array(colours)).max() < 3  # 0..255, RGB, in table order
    assert gender.shape == (5, 2) and age.shape == (5, 101)
    assert gender.argmax(axis=1).tolist() == [1, 0, 1, 0, 1]
    assert age.argmax(axis=1).tolist() == [20, 35, 0, 100, 100]  # 120 clipped to the last class
    assert (age.sum(axis=1) == 1).all()


def test_image_dataset_order(crops):
    from agegender.data import image_dataset

    image_dir, table, _ = crops
    order = lambda ds: np.concatenate([b[1]["age"].argmax(axis=1) for b in batches(ds)]).tolist()  # noqa: E731
    plain = image_dataset(table.iloc[:4], image_dir, 32, batch_size=3)
    assert order(plain) == order(plain) == [20, 35, 0, 100]
    shuffled = [order(image_dataset(table.iloc[:4], image_dir, 32, batch_size=3, shuffle_seed=5)) for _ in range(2)]
    assert shuffled[0] == shuffled[1]
    assert sorted(shuffled[0]) == [0, 20, 35, 100]
