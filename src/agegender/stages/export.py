"""Stage export: the trained model as a TensorFlow SavedModel, a TFLite file and an ONNX file,
each checked against Keras on the first test faces, then registered in MLflow as a servable
pyfunc model.

Each file holds the whole model: face crops (VGG16, ...) or aligned 150 px face chips
(dlib_resnet, whose face network is inside) to the outputs. The registered pyfunc model also
carries dlib's landmark model for a dlib_resnet model, and takes face crops either way."""

import gc
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from agegender.contracts.errors import PipelineError
from agegender.contracts.files import read_csv
from agegender.contracts.labels import TASKS
from agegender.contracts.layout import (
    CROP_IMAGES,
    MODEL,
    ONNX,
    SAVED_MODEL,
    STAGE_METRICS,
    TFLITE,
    WEIGHTS,
    split_table,
)
from agegender.contracts.stage import stage
from agegender.facedata.face_chips import chip_batches, crop_face_margin
from agegender.facedata.input_pipeline import image_dataset
from agegender.inference.exporters import (
    convert_to_tflite,
    export_onnx,
    export_saved_model,
    input_name,
    onnx_predict,
    tflite_predict,
)
from agegender.inference.predictor import open_model, takes_chips
from agegender.inference.pyfunc import float32_model, register_pyfunc

CHECK_INPUTS = 16  # the first test faces, which every format must predict as Keras does
TOLERANCE = 1e-4  # largest difference in any output probability the export may show


def check_inputs(model, margin, count=CHECK_INPUTS):
    """The first test faces as evaluate feeds them, and what they are: aligned chips cut from
    the crops, or crops decoded and resized. Real faces reach what random inputs miss:
    confident, nearly saturated softmaxes."""
    if takes_chips(model):
        table = read_csv(split_table("test")).head(4 * count)
        paths = [CROP_IMAGES / path for path in table["full_path"]]
        chips = np.concatenate(
            [chips[usable] for chips, usable in chip_batches(paths, WEIGHTS, margin)]
        )
        inputs, what = chips[:count].astype(np.float32), "test chips"
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
    export_onnx(model, ONNX)  # first: the converters' leftovers add up (tf2onnx's to 1.3 GB)
    gc.collect()
    export_saved_model(model, SAVED_MODEL)
    convert_to_tflite(SAVED_MODEL, TFLITE)

    inputs, what = check_inputs(model, crop_face_margin(params["crop"]))
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
    face_models = WEIGHTS if takes_chips(model) else None
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
