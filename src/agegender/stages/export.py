"""Stage export: the trained model as a TensorFlow SavedModel and a TFLite file, checked against
Keras on a few inputs, then registered in MLflow as a servable pyfunc model.

For an image model (VGG16, ...) both files map face images to the outputs. For a dlib_resnet
model they hold the Keras part only: a face's descriptor and its mirror image's, (N, 2, 128),
to the outputs; dlib computes the descriptors (agegender.face_descriptor). The registered
pyfunc model carries the dlib files too and takes face crops either way."""

import hashlib
import os
import shutil
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from agegender.errors import PipelineError
from agegender.files import replace_atomically
from agegender.inference import open_model, takes_descriptors
from agegender.labels import TASKS
from agegender.layout import MODEL, SAVED_MODEL, STAGE_METRICS, TFLITE, WEIGHTS
from agegender.serving import float32_model, register_pyfunc
from agegender.stage import stage

CHECK_IMAGES = 4  # random inputs (images in [0, 255], or descriptors) both formats predict
TOLERANCE = 1e-3  # largest difference in any output probability the export may show


def input_name(model):
    return "descriptor_and_mirror" if takes_descriptors(model) else "image"


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
    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name=input_name(model))
    serve = tf.function(lambda inputs: model(inputs, training=False), input_signature=[spec])
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


def check_inputs(model, seed, count=CHECK_IMAGES):
    """Random images in [0, 255], or descriptor-sized numbers on the scale dlib's take."""
    rng = np.random.default_rng(seed)
    if takes_descriptors(model):
        return rng.normal(0, 0.1, (count, *model.input_shape[1:])).astype(np.float32)
    return rng.uniform(0, 255, (count, *model.input_shape[1:])).astype(np.float32)


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


@stage("export")
def main(params, run):
    seed = params["seed"]
    original = open_model(MODEL, hint="run `dvc repro train` first")
    model = float32_model(original)
    export_saved_model(model, SAVED_MODEL)
    convert_to_tflite(SAVED_MODEL, TFLITE)

    images = check_inputs(model, seed)
    keras_outputs = model.predict(images, verbose=0)
    reloaded = tf.saved_model.load(str(SAVED_MODEL))  # held: its variables die with it
    saved_outputs = reloaded.serve(tf.constant(images))
    metrics = {
        "check_images": len(images),
        "cast_to_float32": model is not original,
        "max_abs_diff": {
            "tflite": differences(keras_outputs, tflite_predict(TFLITE, images, input_name(model))),
            "saved_model": differences(
                keras_outputs, {k: v.numpy() for k, v in saved_outputs.items()}
            ),
        },
    }
    sizes = {
        "keras": size_of(MODEL),
        "saved_model": size_of(SAVED_MODEL),
        "tflite": size_of(TFLITE),
    }
    run.log_metrics({"size_bytes": sizes})  # MLflow only: DVC metrics hold what params move
    worst = max(max(values.values()) for values in metrics["max_abs_diff"].values())
    if worst > TOLERANCE:
        raise PipelineError(
            f"the exported models disagree with Keras by up to {worst:.2g} in an output "
            f"probability (tolerance {TOLERANCE:g}): {metrics['max_abs_diff']}. The files are "
            f"in {SAVED_MODEL} and {TFLITE} for a look; {STAGE_METRICS['export']} is not updated."
        )
    run.log_artifact(TFLITE, artifact_path="tflite")
    face_models = WEIGHTS if takes_descriptors(model) else None
    registered = register_pyfunc(run, MODEL, params, face_models)
    print(
        f"export: {SAVED_MODEL} and {TFLITE} ({sizes['tflite'] / 1e6:.1f} MB), TFLite max "
        f"difference gender {metrics['max_abs_diff']['tflite']['gender']:.1e}, age "
        f"{metrics['max_abs_diff']['tflite']['age']:.1e}{registered}"
    )
    return metrics


if __name__ == "__main__":
    main()
