"""The reference design in Keras: a VGG16 base, then per task three new dense layers.

Written with `keras.*` only, so the same model builds under the JAX backend on a GPU machine
that has no TensorFlow.
"""
import keras
from keras import layers

TASKS = {"gender": 2, "age": 101}


def feature_extractor(input_size, weights_file, use_top):
    """VGG16 up to its first dense layer (`fc1`, needs 224 px) or its last conv block."""
    base = keras.applications.VGG16(
        include_top=use_top,
        weights=str(weights_file) if weights_file else None,
        input_shape=(input_size, input_size, 3),
    )
    if use_top:
        return keras.Model(base.input, base.get_layer("fc1").output, name="vgg16_fc1")
    return base


def freeze_all_but_last(model, trainable_layers):
    weighted = [layer for layer in model.layers if layer.weights]
    trainable = set(id(layer) for layer in weighted[len(weighted) - trainable_layers:]) if trainable_layers else set()
    for layer in model.layers:
        layer.trainable = id(layer) in trainable


def build_model(input_size, weights_file=None, use_top=False, trainable_layers=0, head_units=(256, 128),
                dropout=0.3, flip=False, brightness=0.0, seed=0):
    """Images in [0, 255] RGB go in; two softmax outputs, `gender` and `age`, come out.
    `trainable_layers` counts the trailing weighted layers of the base that keep training."""
    images = keras.Input((input_size, input_size, 3), name="image")
    x = images
    if flip:
        x = layers.RandomFlip("horizontal", seed=seed, name="augment_flip")(x)
    if brightness:
        x = layers.RandomBrightness(brightness, value_range=(0, 255), seed=seed, name="augment_brightness")(x)
    x = keras.applications.vgg16.preprocess_input(x)
    base = feature_extractor(input_size, weights_file, use_top)
    freeze_all_but_last(base, trainable_layers)
    features = base(x)
    if not use_top:
        features = layers.Flatten(name="flatten")(features)
    outputs = {}
    for task, classes in TASKS.items():
        y = features
        for index, units in enumerate(head_units):
            y = layers.Dense(units, activation="relu", name=f"{task}_dense{index + 1}")(y)
            y = layers.Dropout(dropout, seed=seed, name=f"{task}_dropout{index + 1}")(y)
        outputs[task] = layers.Dense(classes, activation="softmax", name=task, dtype="float32")(y)
    return keras.Model(images, outputs, name="agegender_vgg16")


def compile_model(model, lr, loss_weights):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
        loss={task: "categorical_crossentropy" for task in TASKS},
        loss_weights=dict(loss_weights),
        metrics={task: ["accuracy"] for task in TASKS},
    )
    return model
