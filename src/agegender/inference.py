"""The one inference path: face crops -> the trained model's outputs -> the fields users read.

A model trained on a Keras backbone (VGG16, ...) takes the crop's pixels; a model trained on
dlib's face-recognition network (`dlib_resnet`) takes the crop's 128-D descriptor, which
`FaceEncoder` computes from the crop exactly as the features stage did for training.
predict, serving, evaluate and export all go through here.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agegender.errors import PipelineError
from agegender.images import as_array, crop_face, grow_box, resize_whole
from agegender.labels import AGES, GENDERS, expected_age
from agegender.layout import WEIGHTS
from agegender.metrics import bin_labels, bin_probabilities


@dataclass
class Face:
    box: tuple  # x1, y1, x2, y2 of the detected face, integer pixels inside the photo
    confidence: float  # MTCNN's confidence
    # PIL image, the face grown by the margin, size x size, as the crop stage writes it
    crop: object


def find_faces(image, margin, size, min_face_size=20):
    """Every face in an RGB PIL image, most confident first, cropped as the crop stage crops it."""
    from agegender.faces import detect_faces  # loads MTCNN only when asked

    faces = []
    for box, confidence in detect_faces(image, min_face_size=min_face_size):
        crop = crop_face(image, grow_box(box, margin), size)
        faces.append(Face(clip_box(box, *image.size), confidence, crop))
    return faces


def clip_box(box, width, height):
    x1, y1, x2, y2 = box
    return (
        int(round(min(max(x1, 0), width))),
        int(round(min(max(y1, 0), height))),
        int(round(min(max(x2, 0), width))),
        int(round(min(max(y2, 0), height))),
    )


def takes_descriptors(model):
    """True for heads on dlib descriptors (input (None, 2, 128): a face's and its mirror's),
    False for an image model (input (None, size, size, 3))."""
    return len(model.input_shape) == 3


def open_model(path, hint="run `dvc repro train`"):
    """The saved Keras model, or one paragraph saying why it can't be had and what to do."""
    from agegender.model import load_model

    if not Path(path).is_file():
        raise PipelineError(f"model file {path} not found; {hint}.")
    try:
        return load_model(path)
    except (ValueError, OSError, TypeError) as error:
        # TypeError: saved by older code (an unknown loss)
        reason = str(error).strip().splitlines()[-1]
        raise PipelineError(
            f"{path} could not be loaded as a Keras model ({reason}). It may come from an older "
            f"version of the training code: rebuild it with `dvc repro train`; {hint}."
        ) from None


class Predictor:
    """A trained model ready to answer for face crops (PIL images), with its encoder when the
    model reads dlib descriptors."""

    def __init__(self, model, encoder=None):
        if takes_descriptors(model) and encoder is None:
            raise PipelineError(
                "this model reads dlib face descriptors (model.backbone: dlib_resnet) "
                "and needs the dlib model files; give their folder (default data/weights)."
            )
        self.model, self.encoder = model, encoder if takes_descriptors(model) else None

    @classmethod
    def load(
        cls,
        model_path,
        weights_dir=WEIGHTS,
        face_margin=0.4,
        hint="run `dvc repro train`",
        workers=1,
    ):
        model = open_model(model_path, hint)
        encoder = None
        if takes_descriptors(model):
            from agegender.face_descriptor import FaceEncoder

            encoder = FaceEncoder(weights_dir, face_margin, workers=workers)
        return cls(model, encoder)

    def inputs(self, crops):
        """What the network reads: descriptors (NaN rows where landmarks failed) or pixels."""
        if self.encoder is not None:
            return self.encoder.encode_with_mirror(crops)
        size = self.model.input_shape[1]
        pixels = [
            as_array(crop if crop.size == (size, size) else resize_whole(crop, size))
            for crop in crops
        ]
        return np.stack(pixels).astype(np.float32)

    def outputs_of_inputs(self, inputs, batch_size=32):
        """{"gender": (N, 2), "age": (N, 101)} float64; rows of NaN inputs stay NaN."""
        count = len(inputs)
        result = {"gender": np.full((count, 2), np.nan), "age": np.full((count, len(AGES)), np.nan)}
        usable = ~np.isnan(inputs.reshape(count, -1)).any(axis=1) if count else np.zeros(0, bool)
        rows = np.flatnonzero(usable)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            outputs = self.model.predict_on_batch(inputs[chunk])
            for task in result:
                result[task][chunk] = np.asarray(outputs[task], dtype=np.float64)
        return result

    def outputs(self, crops, batch_size=32):
        if not crops:
            return {"gender": np.zeros((0, 2)), "age": np.zeros((0, len(AGES)))}
        return self.outputs_of_inputs(self.inputs(crops), batch_size)


def readable(outputs, bins):
    """One dict per face: gender, gender_prob, age (DEX expected value), age_bin and
    age_bin_prob (the most likely bin); None where the face had no landmarks."""
    labels = bin_labels(bins)
    with np.errstate(invalid="ignore"):
        bin_probs = bin_probabilities(outputs["age"], bins)
    results = []
    for g, a, probs in zip(outputs["gender"], outputs["age"], bin_probs):
        if np.isnan(g).any():
            results.append(None)
            continue
        male, best_bin = int(g.argmax()), int(probs.argmax())
        results.append(
            {
                "gender": GENDERS[male],
                "gender_prob": round(float(g[male]), 4),
                "age": round(float(expected_age(a)), 1),
                "age_bin": labels[best_bin],
                "age_bin_prob": round(float(probs[best_bin]), 4),
            }
        )
    return results


def predict_faces(predictor, crops, bins, batch_size=32):
    """Gender and age of face crops, one dict (or None: no landmarks) per crop; see `readable`."""
    return readable(predictor.outputs(crops, batch_size), bins)
