"""Stage export: the trained model as a TensorFlow SavedModel, a TFLite file and an ONNX file,
each checked against Keras on the first test faces, then registered in MLflow as a servable
pyfunc model.

For an image model (VGG16, ...) the files map face images to the outputs. For a dlib_resnet
model they hold the Keras part only: a face's descriptor and its mirror image's, (N, 2, 128),
to the outputs; dlib computes the descriptors (agegender.face_descriptor). The registered
pyfunc model carries the dlib files too and takes face crops either way."""

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

from agegender.data import image_dataset
from agegender.errors import PipelineError
from agegender.features import RowBatches, load_features
from agegender.files import read_csv, replace_atomically
from agegender.inference import open_model, takes_descriptors
from agegender.labels import TASKS
from agegender.layout import (
    CROP_IMAGES,
    FEATURES,
    MODEL,
    SAVED_MODEL,
    STAGE_METRICS,
    TFLITE,
    WEIGHTS,
    split_table,
)
from agegender.serving import float32_model, register_pyfunc
from agegender.stage import stage

ONNX = Path("models/model.onnx")
ONNX_OPSET = 17  # named, so a tf2onnx upgrade with another default does not change the file
CHECK_INPUTS = 16  # the first test faces, which every format must predict as Keras does
TOLERANCE = 1e-3  # largest difference in any output probability the export may show


def input_name(model):
    return "descriptor_and_mirror" if takes_descriptors(model) else "image"


def serving_function(model):
    """The model in inference mode (dropout and augmentation off) on a batch of any size."""
    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name=input_name(model))
    return tf.function(lambda inputs: model(inputs, training=False), input_signature=[spec])


def export_saved_model(model, target):
    """A SavedModel whose `serve` / `serving_default` maps `image` (N, size, size, 3) float32 RGB
    in [0, 255] (or `descriptor_and_mirror` (N, 2, 128)) to the softmax outputs `gender` (N, 2)
    and `age` (N, 101).

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
    `descriptor_and_mirror`, outputs `gender` and `age`, batch size free.

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
    """tf2onnx logs each step, and TensorFlow warns of the TF1 functions tf2onnx calls."""
    loggers = [logging.getLogger("tf2onnx"), tf.get_logger()]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def canonical_names(graph):
    """Names by position for every node and tensor but the input and outputs, so equal models
    give equal bytes (and dvc.lock stays put): tf2onnx numbers the names it makes from a counter
    that runs on within a process, and of equal weights (the heads read once per image of the
    pair) it keeps the one a set's order, which changes from process to process, comes to."""
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


def check_inputs(model, count=CHECK_INPUTS):
    """The first test faces as evaluate feeds them, and what they are: cached descriptor pairs,
    or crops decoded and resized. Real faces reach what random inputs miss: confident, nearly
    saturated softmaxes, and the narrow range real descriptors take."""
    if takes_descriptors(model):
        pairs = [load_features(FEATURES, name) for name in ("test", "test_flipped")]
        inputs, what = RowBatches(pairs, count)[0], "test descriptors and their mirrors'"
    else:
        table = read_csv(split_table("test")).head(count)
        dataset = image_dataset(table, CROP_IMAGES, model.input_shape[1], count)
        inputs, what = next(iter(dataset))[0].numpy(), "test crops"
    if not len(inputs):
        raise PipelineError(
            f"the test split is empty, so there is nothing to check the export on; "
            f"look at {split_table('test')} and run `dvc repro split`."
        )
    return inputs, what


def differences(reference, other):
    return {
        task: float(
            np.abs(
                np.asarray(reference[task], np.float64) - np.asarray(other[task], np.float64)
            ).max()
        )
        for task in TASKS
    }


def size_of(path):
    path = Path(path)
    return (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def check(model, inputs):
    """Each format's largest difference from Keras in any output probability."""
    expected = model.predict(inputs, verbose=0)
    reloaded = tf.saved_model.load(str(SAVED_MODEL))  # held: its variables die with it
    served = {task: values.numpy() for task, values in reloaded.serve(tf.constant(inputs)).items()}
    name = input_name(model)
    return {
        "onnx": differences(expected, onnx_predict(ONNX, inputs, name)),
        "tflite": differences(expected, tflite_predict(TFLITE, inputs, name)),
        "saved_model": differences(expected, served),
    }


@stage("export")
def main(params, run):
    original = open_model(MODEL, hint="run `dvc repro train` first")
    model = float32_model(original)
    export_saved_model(model, SAVED_MODEL)
    convert_to_tflite(SAVED_MODEL, TFLITE)
    export_onnx(model, ONNX)

    inputs, what = check_inputs(model)
    metrics = {
        "check_inputs": what,
        "check_count": len(inputs),
        "cast_to_float32": model is not original,
        "max_abs_diff": check(model, inputs),
    }
    sizes = {
        "keras": size_of(MODEL),
        "saved_model": size_of(SAVED_MODEL),
        "tflite": size_of(TFLITE),
        "onnx": size_of(ONNX),
    }
    run.log_metrics({"size_bytes": sizes})  # MLflow only: DVC metrics hold what params move
    worst = max(max(values.values()) for values in metrics["max_abs_diff"].values())
    if worst > TOLERANCE:
        raise PipelineError(
            f"the exported models disagree with Keras by up to {worst:.2g} in an output "
            f"probability (tolerance {TOLERANCE:g}) on {len(inputs)} {what}: "
            f"{metrics['max_abs_diff']}. The files are in {SAVED_MODEL}, {TFLITE} and {ONNX} "
            f"for a look; {STAGE_METRICS['export']} is not updated."
        )
    run.log_artifact(TFLITE, artifact_path="tflite")
    run.log_artifact(ONNX, artifact_path="onnx")
    face_models = WEIGHTS if takes_descriptors(model) else None
    registered = register_pyfunc(run, MODEL, params, face_models)
    largest = {fmt: max(values.values()) for fmt, values in metrics["max_abs_diff"].items()}
    print(
        f"export: {SAVED_MODEL}, {TFLITE} ({sizes['tflite'] / 1e6:.1f} MB) and {ONNX} "
        f"({sizes['onnx'] / 1e6:.1f} MB); largest difference from Keras on {len(inputs)} "
        f"{what}: ONNX {largest['onnx']:.1e}, TFLite {largest['tflite']:.1e}, SavedModel "
        f"{largest['saved_model']:.1e}{registered}"
    )
    return metrics


if __name__ == "__main__":
    main()
