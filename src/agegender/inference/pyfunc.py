"""The trained model as an MLflow pyfunc model, for `mlflow models serve` and the model registry.

One request row is one face crop, base64-encoded JPEG or PNG bytes in the column `image`;
the answer row holds the fields `agegender predict --crops` prints: gender,
gender_prob, age (DEX expected value over the 101 outputs), age_range ([low, high], calibrated
on the validation split; the calibration travels inside the logged model), age_bin (the bin of
that age), most_likely_age_bin and most_likely_age_bin_prob. Faces are not detected here: each
image is taken as an already cropped face, framed as the crop stage frames them (the face box plus
`crop.margin` on each side), and goes through the same inference core as predict
(`Predictor.crops` in agegender.inference.predictor). A dlib_resnet model carries dlib's
landmark model as an artifact, so the served model cuts each crop's aligned chip itself; a face
whose landmarks can't be found gets an answer row of nulls.
"""

import base64
import binascii
import io
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Array, ColSpec, Schema

from agegender.facedata.images import ImageSkip, load_rgb
from agegender.inference.age_range import read_age_range
from agegender.inference.predictor import (
    ANSWER_FIELDS,
    Predictor,
    age_range_file,
    open_model,
    takes_chips,
)

OUTPUT_COLUMNS = ANSWER_FIELDS
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema(
        [
            ColSpec(
                "string"
                if column.endswith(("gender", "bin"))
                else Array("double")
                if column == "age_range"
                else "double",
                column,
            )
            for column in OUTPUT_COLUMNS
        ]
    ),
)
# What the served model needs, pinned as requirements.txt pins it.
PIP_REQUIREMENTS = [
    "tensorflow==2.21.0",
    "keras==3.15.1",
    "numpy==2.4.6",
    "pandas==3.1.1",
    "pillow==13.0.0",
]
# the landmark model travels as an artifact, not as a package
FACE_REQUIREMENTS = ["dlib-bin==20.0.1.post1"]
PACKAGE_DIR = Path(__file__).resolve().parents[1]
ARTIFACT = "keras_model"
FACE_MODELS = "face_models"
CHAMPION = "champion"  # the registered version a plain `dvc repro` made last


def float32_model(model):
    """The model computing in float32: a model trained under mixed precision computes in
    float16, which is slow on a CPU and which TFLite's builtin ops do not take."""
    if all(layer.dtype_policy.compute_dtype == "float32" for layer in model._flatten_layers()):
        return model

    def as_float32(config):
        if isinstance(config, dict):
            if config.get("class_name") == "DTypePolicy" and str(
                config.get("config", {}).get("name", "")
            ).startswith("mixed_"):
                return {**config, "config": {**config["config"], "name": "float32"}}
            return {key: as_float32(value) for key, value in config.items()}
        if isinstance(config, list):
            return [as_float32(value) for value in config]
        return "float32" if config in ("mixed_float16", "mixed_bfloat16") else config

    copy = model.__class__.from_config(as_float32(model.get_config()))
    copy.set_weights(model.get_weights())
    return copy


def invalid(message):
    """An error the scoring server answers with 400, naming what is wrong with the request."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def decode_image(text, row):
    """A base64 string (optionally a `data:image/...;base64,` URL) -> RGB PIL image."""
    if not isinstance(text, str) or not text:
        raise invalid(
            f"row {row}: 'image' must be a non-empty base64 string, got {type(text).__name__}"
        )
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:
            data = base64.urlsafe_b64decode(text)
        except (binascii.Error, ValueError):
            raise invalid(f"row {row}: 'image' is not valid base64") from None
    try:
        return load_rgb(io.BytesIO(data))
    except ImageSkip as error:
        raise invalid(
            f"row {row}: 'image' is not a decodable JPEG or PNG image ({error.reason})"
        ) from None


class AgeGenderModel(mlflow.pyfunc.PythonModel):
    """Gender and age of face crops sent as base64 images (column `image`, one face per row)."""

    def __init__(self, age_bins, batch_size=32, face_margin=0.4, size=64, age_range=None):
        self.age_bins = [int(edge) for edge in age_bins]
        self.age_range = age_range
        self.batch_size = int(batch_size)
        self.face_margin, self.size = float(face_margin), int(size)
        self.model = None

    def load_context(self, context):
        model = float32_model(open_model(context.artifacts[ARTIFACT]))
        cutter = None
        if takes_chips(model):
            from agegender.facedata.face_chips import ChipCutter

            cutter = ChipCutter(context.artifacts[FACE_MODELS], self.face_margin)
        self.model = Predictor(
            model,
            cutter,
            self.face_margin,
            self.size,
            self.age_bins,
            self.batch_size,
            self.age_range,
        )

    def predict(self, context, model_input: pd.DataFrame, params=None):
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise invalid(
                f"the input needs a column 'image' of base64 images; it has {list(frame.columns)}"
            )
        crops = [decode_image(text, row) for row, text in enumerate(frame["image"])]
        answers = self.model.crops(crops)
        return pd.DataFrame([answer or {} for answer in answers], columns=OUTPUT_COLUMNS)

    def __getstate__(self):  # the Keras model comes from the artifact, never from the pickle
        return {**self.__dict__, "model": None}


def encode_image(image, format="JPEG"):
    """A PIL image as the base64 text a request row carries."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def example_input():
    """One small synthetic face-sized JPEG, the input example stored with the model."""
    from PIL import Image

    ramp = np.linspace(0, 255, 32, dtype=np.uint8)
    pixels = np.stack(
        [np.tile(ramp, (32, 1)), np.tile(ramp[:, None], (1, 32)), np.full((32, 32), 128, np.uint8)],
        axis=-1,
    )
    return pd.DataFrame({"image": [encode_image(Image.fromarray(pixels))]})


def log_pyfunc(
    keras_model_path, params, registered_name, name="pyfunc_model", face_models_dir=None
):
    """Log the Keras model at `keras_model_path` as a pyfunc model in the active run (or a new
    one) and register it as a new version of `registered_name` (None: not registered).
    `params` is the whole params.yaml; the age bins come from `evaluate.age_bins`, the face
    margin of the crops from `crop`, the age range calibration from beside the Keras model.
    `face_models_dir`: dlib's landmark model, for a dlib_resnet model.
    Returns MLflow's ModelInfo (model_uri, registered_model_version)."""
    from agegender.facedata.face_chips import crop_face_margin

    model = AgeGenderModel(
        params["evaluate"]["age_bins"],
        params["evaluate"]["batch_size"],
        crop_face_margin(params["crop"]),
        params["crop"]["size"],
        read_age_range(age_range_file(keras_model_path)),
    )
    requirements = PIP_REQUIREMENTS + (FACE_REQUIREMENTS if face_models_dir is not None else [])
    with tempfile.TemporaryDirectory(prefix="agegender-face-models-") as staging:
        artifacts = {ARTIFACT: str(keras_model_path)}
        if face_models_dir is not None:
            artifacts[FACE_MODELS] = str(stage_face_models(face_models_dir, Path(staging)))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=model,
            artifacts=artifacts,
            signature=SIGNATURE,
            input_example=example_input(),
            pip_requirements=requirements,
            code_paths=[str(PACKAGE_DIR)],
            registered_model_name=registered_name,
        )


def registered_name(params):
    return f"{params['mlflow']['experiment']}-model"


def register_pyfunc(run, keras_model_path, params, face_models_dir=None):
    """Log the pyfunc model in the export stage's run and register it as a new version. The
    alias `champion` moves to it when it comes from a plain `dvc repro` (not `dvc exp run`),
    so `models:/<experiment>-model@champion` serves the latest run of the committed params.
    Returns a phrase for the stage's summary line; '' when tracking is off or failed."""
    name = registered_name(params)
    info = run.call(log_pyfunc, keras_model_path, params, name, face_models_dir=face_models_dir)
    if info is None or info.registered_model_version is None:
        return ""
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        run.call(client.set_model_version_tag, name, version, "dvc.exp_name", experiment)
        return f", registered as {name} version {version} (experiment {experiment})"
    run.call(client.set_registered_model_alias, name, CHAMPION, version)
    return f", registered as {name} version {version}, alias @{CHAMPION}"


def stage_face_models(face_models_dir, staging):
    """dlib's landmark model alone, as a plain file (MLflow refuses links that leave the
    folder); the face network's weights are inside the Keras model."""
    from agegender.facedata.face_chips import check_landmarks_file

    path = check_landmarks_file(face_models_dir)
    shutil.copyfile(path.resolve(), staging / path.name)
    return staging
