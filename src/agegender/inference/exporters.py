"""The trained model in the formats other runtimes load: a TensorFlow SavedModel, a TFLite
file and an ONNX file, each made byte-for-byte repeatable (so dvc.lock stays put when nothing
changed), and how each format is run to check it against Keras. The export stage calls these."""

import contextlib
import hashlib
import logging
import os
import shutil
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from agegender.contracts.files import replace_atomically
from agegender.inference.predictor import takes_chips

CATCH_ERRORS = "TF2ONNX_CATCH_ERRORS"
ONNX_OPSET = 17  # named, so a tf2onnx upgrade with another default does not change the file


def input_name(model):
    return "chip" if takes_chips(model) else "image"


def serving_function(model):
    """The model in inference mode (dropout and augmentation off) on a batch of any size."""
    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name=input_name(model))
    return tf.function(lambda inputs: model(inputs, training=False), input_signature=[spec])


def export_saved_model(model, target):
    """A SavedModel whose `serve` / `serving_default` maps `image` (N, size, size, 3) float32 RGB
    in [0, 255] (or `chip` (N, 150, 150, 3), aligned face chips) to the softmax outputs
    `gender` (N, 2) and `age` (N, 101).

    Not `model.export()`: it calls the model without `training=False`, and Keras 3 then takes
    the `training=True` default of the RandomFlip/RandomBrightness layers for the whole model,
    so dropout and the augmentations would stay on in the export. Nor `archive.track(model)`:
    it stores every weight twice (Keras 3.15); the endpoint tracks the variables it uses.

    TensorFlow lists a traced function's variables in a set keyed by memory address, so the
    SavedModel's bytes would change from run to run (and dvc.lock with them); the variables
    are put in the model's own order first, which makes the export byte-for-byte repeatable."""
    serve = serving_function(model)
    traced = serve.get_concrete_function()
    rank = {id(variable.value): index for index, variable in enumerate(model.variables)}
    traced.set_variables(
        sorted(traced.variables, key=lambda v: (rank.get(id(v), len(rank)), v.name))
    )
    archive = keras.export.ExportArchive()
    archive.add_endpoint("serve", serve)
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        archive.write_out(str(tmp), verbose=False)
        pin_fingerprint_uuid(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pin_fingerprint_uuid(saved_model_dir):
    """TensorFlow writes a random uuid into fingerprint.pb; one derived from the fingerprint's
    content hashes keeps equal exports equal to the byte."""
    from tensorflow.core.protobuf import fingerprint_pb2

    path = Path(saved_model_dir) / "fingerprint.pb"
    if not path.is_file():
        return
    fingerprint = fingerprint_pb2.FingerprintDef.FromString(path.read_bytes())
    fingerprint.uuid = ""
    content = hashlib.sha256(fingerprint.SerializeToString(deterministic=True)).hexdigest()
    fingerprint.uuid = str(int(content[:32], 16))
    path.write_bytes(fingerprint.SerializeToString(deterministic=True))


def convert_to_tflite(saved_model_dir, target):
    converted = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir)).convert()
    replace_atomically(target, lambda tmp: tmp.write_bytes(converted))


def export_onnx(model, target):
    """An ONNX file of the function the SavedModel serves: input `image` or
    `chip`, outputs `gender` and `age`, batch size free.

    Not `model.export(format="onnx")`: like Keras's SavedModel export it calls the model without
    `training=False`, and tf2onnx then meets the random ops of dropout and RandomFlip, which it
    leaves in the file and onnxruntime refuses to load (Keras 3.15.1, tf2onnx 1.17.0). Nor
    `tf2onnx.convert.from_function`: it takes the constants the function captures (the
    standardization's mean and variance, VGG's mean pixel) for inputs the caller must feed. The
    function is frozen here and converted as a graph."""
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    traced = serving_function(model).get_concrete_function()
    frozen = convert_variables_to_constants_v2(traced)
    (given,) = [tensor.name for tensor in frozen.inputs]
    outputs = tf.nest.pack_sequence_as(traced.structured_outputs, frozen.outputs)
    renamed = {tensor.name: task for task, tensor in outputs.items()}
    with quiet_tf2onnx():
        proto, _ = tf2onnx.convert.from_graph_def(
            frozen.graph.as_graph_def(),
            name=model.name,
            input_names=[given],
            output_names=list(renamed),
            tensors_to_rename={given: input_name(model), **renamed},
            opset=ONNX_OPSET,
        )
    canonical_names(proto.graph)
    data = proto.SerializeToString(deterministic=True)
    replace_atomically(target, lambda tmp: tmp.write_bytes(data))


@contextlib.contextmanager
def quiet_tf2onnx():
    """tf2onnx logs each step, and TensorFlow warns of the TF1 functions tf2onnx calls. Also
    its optimizers run in place: by default each pass works on a deep copy of the graph (to
    roll back a failing pass), and the copies, held in reference cycles, pile up: a 3.4 GB peak
    for a dlib_resnet model instead of 2.3. With TF2ONNX_CATCH_ERRORS set (tf2onnx 1.17 reads
    its presence as "off") no copy is made, and a failing pass fails the export."""
    loggers = [logging.getLogger("tf2onnx"), tf.get_logger()]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    before = os.environ.get(CATCH_ERRORS)
    os.environ[CATCH_ERRORS] = "false"
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if before is None:
            os.environ.pop(CATCH_ERRORS)
        else:
            os.environ[CATCH_ERRORS] = before


def canonical_names(graph):
    """Names by position for every node and tensor but the input and outputs, so equal models
    give equal bytes (and dvc.lock stays put): tf2onnx numbers the names it makes from a counter
    that runs on within a process, and of equal weights (the heads read once per image of the
    pair) it keeps the one a set's order, which changes from process to process, comes to."""
    in_order = nodes_from_outputs(graph)
    del graph.node[:]
    graph.node.extend(in_order)
    names = {value.name: value.name for value in [*graph.input, *graph.output]}
    names[""] = ""  # an optional input left out

    def rename(name):
        return names.setdefault(name, f"t{len(names)}")

    for index, node in enumerate(graph.node):
        node.name = f"{node.op_type}_{index}"
        node.input[:] = [rename(name) for name in node.input]
        node.output[:] = [rename(name) for name in node.output]
    position = {name: index for index, name in enumerate(names)}
    graph.initializer.sort(key=lambda tensor: position[tensor.name])
    for tensor in graph.initializer:
        tensor.name = names[tensor.name]
    del graph.value_info[:]  # shapes onnxruntime infers anyway, named by the same counter
    for value in [*graph.input, *graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"


def nodes_from_outputs(graph):
    """The nodes in an order set by the graph's shape alone: each output in turn, every node
    after the nodes it reads, inputs in their order. tf2onnx's own order breaks ties between
    independent branches (a face and its mirror image) differently from process to process."""
    producer = {name: node for node in graph.node for name in node.output}
    placed, ordered = set(), []
    stack = [(producer[value.name], False) for value in reversed(graph.output)]
    while stack:
        node, inputs_placed = stack.pop()
        if id(node) in placed:
            continue
        if inputs_placed:
            placed.add(id(node))
            ordered.append(node)
            continue
        stack.append((node, True))
        stack.extend(
            (producer[name], False)
            for name in reversed(node.input)
            if name in producer and id(producer[name]) not in placed
        )
    copies = [type(node)() for node in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    return copies


def onnx_predict(onnx_file, inputs, name="image"):
    """The ONNX model's outputs, by name, as onnxruntime computes them."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    tasks = [output.name for output in session.get_outputs()]
    return dict(zip(tasks, session.run(tasks, {name: inputs.astype(np.float32)})))


def tflite_predict(tflite_file, images, name="image"):
    """The TFLite model's outputs, by name, for a batch of inputs."""
    with warnings.catch_warnings():  # tf.lite.Interpreter announces its move to ai_edge_litert
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_path=str(tflite_file))
    runner = interpreter.get_signature_runner("serving_default")
    return {
        task: np.asarray(values)
        for task, values in runner(**{name: images.astype(np.float32)}).items()
    }
