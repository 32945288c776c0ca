"""The one inference path: photos or face crops -> the trained model's outputs -> the fields
users read. predict, the web page, the MLflow pyfunc model, evaluate_external and evaluate all
go through here.

    from agegender.inference.predictor import Predictor
    predictor = Predictor.load("models/model.keras", params="params.yaml")
    predictor.faces("photo.jpg")            # every face found by MTCNN, with its box
    predictor.crops(["face1.jpg", face2])   # faces already cut: no detector runs

Every answer carries `age_range`, the conformal range calibrated on the validation split
(`agegender.inference.age_range`), read from `age_range.json` beside the model.

Every model is one Keras model from face images to the two heads. A model on a Keras backbone
(VGG16, ...) reads the crop's pixels; a model on dlib's face network (`dlib_resnet`) reads the
crop's aligned 150 px chip, which `ChipCutter` cuts from the crop's landmarks exactly as the
features stage did for training.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agegender.contracts.errors import PipelineError
from agegender.contracts.labels import (
    AGES,
    GENDERS,
    age_bin,
    bin_labels,
    bin_probabilities,
    expected_age,
)
from agegender.contracts.layout import AGE_RANGE, MODEL, PARAMS, WEIGHTS
from agegender.facedata.face_chips import WORK_SIZE, crop_face_margin
from agegender.facedata.images import (
    as_array,
    crop_face,
    face_box_in_crop,
    grow_box,
    load_rgb,
    reframe_crop,
    resize_whole,
)
from agegender.inference.age_range import age_ranges, read_age_range

# What predict and the API answer per face, after the face's file, index, box and confidence.
ANSWER_FIELDS = [
    "gender",
    "gender_prob",
    "age",
    "age_range",
    "age_bin",
    "most_likely_age_bin",
    "most_likely_age_bin_prob",
]
PROBABILITY_DECIMALS, AGE_DECIMALS = 6, 5


@dataclass
class Face:
    box: tuple  # x1, y1, x2, y2 of the face, integer pixels inside the photo
    confidence: float  # MTCNN's confidence, rounded to 4 decimals
    # PIL image, the face grown by the margin, size x size, as the crop stage writes it
    crop: object


def find_faces(images, margin, size, min_face_size=20):
    """Every face in each RGB PIL image, most confident first, cropped as the crop stage crops
    it: one list of `Face` per image (MTCNN takes photos of one size together)."""
    from agegender.facedata.face_detector import detect_faces_in_photos  # loads MTCNN if asked

    detections = detect_faces_in_photos(images, min_face_size=min_face_size)
    return [
        [
            Face(
                clip_box(box, *image.size),
                round(confidence, 4),
                crop_face(image, grow_box(box, margin), size),
            )
            for box, confidence in found
        ]
        for image, found in zip(images, detections)
    ]


def clip_box(box, width, height):
    x1, y1, x2, y2 = box
    return (
        int(round(min(max(x1, 0), width))),
        int(round(min(max(y1, 0), height))),
        int(round(min(max(x2, 0), width))),
        int(round(min(max(y2, 0), height))),
    )


def as_photo(photo):
    """An RGB PIL image from a PIL image, an (H, W, 3) uint8 RGB array or a path; a file that
    can't be used raises ImageSkip (reason missing, unreadable, too_large)."""
    from PIL import Image

    if isinstance(photo, Image.Image):
        return photo if photo.mode == "RGB" else photo.convert("RGB")
    if isinstance(photo, np.ndarray):
        if photo.ndim != 3 or photo.shape[2] != 3:
            raise ValueError(f"an image array must be (height, width, 3) RGB, got {photo.shape}")
        return Image.fromarray(np.asarray(photo, dtype=np.uint8), "RGB")
    return load_rgb(photo)


def takes_chips(model):
    """True for a model on dlib's face network (input `chip`: aligned 150 px face chips), False
    for one that reads the crop itself (input `image`)."""
    return model.inputs[0].name == "chip"


def open_model(path, hint="run `dvc repro train`"):
    """The saved Keras model, or one paragraph saying why it can't be had and what to do."""
    from agegender.nets.model import load_model

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


def settings_of(params):
    """What inference needs of params.yaml (a path or the loaded dict): how the training crops
    were framed and the age bins answers are reported in."""
    if not isinstance(params, dict):
        from agegender.contracts.params import load_params

        params = load_params(params)
    return {
        "face_margin": crop_face_margin(params["crop"]),
        "size": params["crop"]["size"],
        "age_bins": list(params["evaluate"]["age_bins"]),
    }


class Predictor:
    """A trained model loaded once, answering for photos (faces found by MTCNN) or for face
    crops, in batches; with dlib's landmark model when the model reads aligned chips.

    `face_margin` and `size` say how the training crops were framed (the face box plus
    `face_margin` of its size on each side, `size` pixels square); every face is framed so
    before the model sees it. `age_bins` are the lower edges of the reported age bins.
    `age_range`: the calibration of the age ranges (None: answers without one)."""

    def __init__(
        self,
        model,
        cutter=None,
        face_margin=0.4,
        size=64,
        age_bins=(0, 10, 20, 30, 40, 50, 60),
        batch_size=32,
        age_range=None,
    ):
        self.model, self.age_range = model, age_range
        self.cutter = cutter if takes_chips(model) else None
        self.face_margin, self.size = float(face_margin), int(size)
        self.age_bins, self.batch_size = [int(edge) for edge in age_bins], int(batch_size)
        # a chip model's cutter works at WORK_SIZE: framing a sharp photo's face at that size
        # resamples it once, where a shrink to crop.size and back would blur the chip
        self.crop_size = max(self.size, WORK_SIZE) if self.cutter else self.size

    @classmethod
    def load(
        cls,
        model_path=MODEL,
        params=PARAMS,
        weights_dir=WEIGHTS,
        batch_size=32,
        hint="run `dvc repro train`",
        weights_hint="",
        with_age_range=True,
    ):
        """The model at `model_path`, framed and binned as `params` (params.yaml or its dict)
        says, with the age range calibration beside it; a dlib_resnet model also loads dlib's
        landmark model from `weights_dir`. `hint` and `weights_hint` end the messages of a
        missing model and of a missing landmark file."""
        settings = settings_of(params)
        model = open_model(model_path, hint)
        calibration = read_age_range(age_range_file(model_path)) if with_age_range else None
        cutter = None
        if takes_chips(model):
            from agegender.facedata.face_chips import ChipCutter

            try:
                cutter = ChipCutter(weights_dir, settings["face_margin"])
            except PipelineError as error:
                raise PipelineError(f"{error} {weights_hint}".strip()) from None
        return cls(model, cutter, batch_size=batch_size, age_range=calibration, **settings)

    def faces(self, photo, min_face_size=20):
        """The faces MTCNN finds in a photo (PIL image, RGB array or path), most confident first:
        one dict each with `face`, `box`, `confidence` and the answer fields; a face whose
        answer can't be had (no dlib landmarks) is left out."""
        (answers,) = self.photo_answers([as_photo(photo)], min_face_size)
        return [answer for answer in answers if answer]

    def photo_answers(self, images, min_face_size=20):
        """For many RGB PIL photos at once (detection batched by size, the network in batches
        across photos): per photo, an answer dict per face found, None where it had no dlib
        landmarks."""
        found = self.detect(images, min_face_size)
        answers = iter(self.answers([face.crop for faces in found for face in faces]))
        return [self.face_answers(faces, [next(answers) for _ in faces]) for faces in found]

    def detect(self, images, min_face_size=20):
        """The faces MTCNN finds in each photo (`Face`: box, confidence, crop framed as the
        training crops)."""
        return find_faces(images, self.face_margin, self.crop_size, min_face_size)

    def face_answers(self, found, answers):
        """An answer dict per detected face of one photo, or None where it had no landmarks."""
        return [
            answer
            and {"face": index, "box": list(face.box), "confidence": face.confidence, **answer}
            for index, (face, answer) in enumerate(zip(found, answers))
        ]

    def crops(self, images, margin=None):
        """Answers for faces already cut (PIL images, arrays or paths), one dict or None (no
        dlib landmarks) per image, in order. `margin`: the share of the face box each crop
        carries on each side (the dataset's *_crop images: 0.4); None: framed as the training
        crops. No detector runs."""
        return self.answers([self.framed(as_photo(image), margin) for image in images])

    def framed(self, crop, margin=None):
        """A face crop re-cut to the training crops' framing (and size, or WORK_SIZE for a chip
        model)."""
        margin = self.face_margin if margin is None else margin
        return reframe_crop(crop, margin, self.face_margin, self.crop_size)

    def answers(self, crops):
        """Answers for crops already framed as the training crops, `batch_size` per call."""
        return readable(self.outputs(crops), self.age_bins)

    def with_ranges(self, outputs):
        """The outputs with `age_range` ((N, 2) low, high) added when the predictor has a
        calibration."""
        if self.age_range is not None:
            outputs["age_range"] = age_ranges(outputs["age"], self.age_range)
        return outputs

    def inputs(self, crops):
        """What the network reads: aligned chips (NaN where landmarks failed) or pixels."""
        if takes_chips(self.model):
            if self.cutter is None:
                raise PipelineError(
                    "this model reads aligned face chips (model.backbone: dlib_resnet) and needs "
                    "dlib's landmark model to cut them; give the folder holding "
                    "shape_predictor_5_face_landmarks.dat (default data/weights)."
                )
            return chips_with_gaps(*self.cutter.chips(crops))
        size = self.model.input_shape[1]
        pixels = [
            as_array(crop if crop.size == (size, size) else resize_whole(crop, size))
            for crop in crops
        ]
        return np.stack(pixels).astype(np.float32)

    def outputs_of_inputs(self, inputs):
        """{"gender": (N, 2), "age": (N, 101)} float64; rows of NaN inputs stay NaN."""
        count = len(inputs)
        result = {"gender": np.full((count, 2), np.nan), "age": np.full((count, len(AGES)), np.nan)}
        usable = ~np.isnan(inputs.reshape(count, -1)).any(axis=1) if count else np.zeros(0, bool)
        rows = np.flatnonzero(usable)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            outputs = self.model.predict_on_batch(inputs[chunk])
            for task in result:
                result[task][chunk] = np.asarray(outputs[task], dtype=np.float64)
        return self.with_ranges(result)

    def outputs_of_batches(self, batches):
        """The outputs for a stream of input batches (a keras PyDataset or tf.data of the
        cached features or crops), as evaluate reads the test split."""
        outputs = self.model.predict(batches, verbose=0)
        return self.with_ranges(
            {task: np.asarray(values, dtype=np.float64) for task, values in outputs.items()}
        )

    def outputs(self, crops):
        if not crops:
            return self.with_ranges({"gender": np.zeros((0, 2)), "age": np.zeros((0, len(AGES)))})
        return self.outputs_of_inputs(self.inputs(crops))

    def outputs_of_files(self, paths, chunk=512):
        """The outputs of a chip model for crop files already framed as the training crops,
        `chunk` at a time (a chip in float32 is 270 KB); a file without landmarks, or
        unreadable, gives a NaN row."""
        parts = [
            self.outputs_of_inputs(
                chips_with_gaps(*self.cutter.chips_of_files(paths[at : at + chunk]))
            )
            for at in range(0, len(paths), chunk)
        ]
        if not parts:
            return self.outputs([])
        return {task: np.concatenate([part[task] for part in parts]) for task in parts[0]}


def pretrained_predictor(predictor, weights_dir=WEIGHTS):
    """Cydral's networks alone, zero training, reading the chips `predictor`'s fused model reads
    (same cutter, framing and bins); None for another model or where the download stage did not
    place both files."""
    from agegender.nets.cydral_networks import NETWORKS
    from agegender.nets.model import pretrained_model

    files = [Path(weights_dir) / NETWORKS[task]["file"] for task in ("age", "gender")]
    layer_names = {layer.name for layer in predictor.model.layers}
    if "fused_backbone" not in layer_names or not all(path.is_file() for path in files):
        return None
    return Predictor(
        pretrained_model(*files),
        predictor.cutter,
        predictor.face_margin,
        predictor.size,
        predictor.age_bins,
        predictor.batch_size,
    )


def age_range_file(model_path):
    """Where a model's age range calibration lives: beside it, as the calibrate stage writes
    models/age_range.json beside models/model.keras."""
    return Path(model_path).with_name(AGE_RANGE.name)


def chips_with_gaps(chips, usable):
    """Chips as the network reads them, float32, NaN where no landmarks were found (those rows
    are not run and stay NaN in the outputs)."""
    chips = chips.astype(np.float32)
    chips[~usable] = np.nan
    return chips


def answer_columns(outputs, bins):
    """The answer fields as columns, one row per face: the gender and its probability; `age`,
    the expected age (DEX), with `age_bin`, the bin that age falls in; and the bin holding the
    most probability, which need not be the expected age's, with that probability; and
    `age_range` ((N, 2)) where the outputs carry it."""
    labels = np.array(bin_labels(bins))
    with np.errstate(invalid="ignore"):
        bin_probs = bin_probabilities(outputs["age"], bins)
        age = expected_age(outputs["age"])
    gender = outputs["gender"]
    usable = ~np.isnan(gender).any(axis=1) & ~np.isnan(age)
    male, best_bin = gender.argmax(axis=1), bin_probs.argmax(axis=1)
    rows = np.arange(len(gender))
    ranges = {"age_range": outputs["age_range"]} if "age_range" in outputs else {}
    return {
        "usable": usable,
        "gender": np.array(GENDERS)[male],
        "gender_prob": gender[rows, male],
        "age": age,
        "age_bin": labels[age_bin(np.nan_to_num(age), bins)],
        "most_likely_age_bin": labels[best_bin],
        "most_likely_age_bin_prob": bin_probs[rows, best_bin],
        **ranges,
    }


def readable(outputs, bins):
    """One dict of ANSWER_FIELDS per face (see `answer_columns`), None where the face had no
    landmarks."""
    columns = answer_columns(outputs, bins)
    return [
        {
            "gender": str(columns["gender"][row]),
            "gender_prob": round(float(columns["gender_prob"][row]), PROBABILITY_DECIMALS),
            "age": round(float(columns["age"][row]), AGE_DECIMALS),
            **({"age_range": columns["age_range"][row].tolist()} if "age_range" in columns else {}),
            "age_bin": str(columns["age_bin"][row]),
            "most_likely_age_bin": str(columns["most_likely_age_bin"][row]),
            "most_likely_age_bin_prob": round(
                float(columns["most_likely_age_bin_prob"][row]), PROBABILITY_DECIMALS
            ),
        }
        if usable
        else None
        for row, usable in enumerate(columns["usable"])
    ]


def crop_box(crop, margin):
    """Where the face lies in a crop that carries `margin` around it, as integer pixels."""
    return clip_box(face_box_in_crop(*crop.size, margin), *crop.size)


def add_model_options(parser):
    """--model, --params and --weights, as every tool that loads a Predictor takes them."""
    parser.add_argument("--model", type=Path, default=MODEL, help=f"the model (default {MODEL})")
    parser.add_argument(
        "--params",
        type=Path,
        default=PARAMS,
        help="the params.yaml of the model: crop.margin, crop.size, evaluate.age_bins",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=WEIGHTS,
        help=f"folder of dlib's landmark model, for a dlib_resnet model (default {WEIGHTS})",
    )


def predictor_of_options(args, batch_size=32):
    """The Predictor the options name, or one paragraph naming the option that fixes what is
    missing."""
    if not args.params.is_file():
        raise PipelineError(
            f"{args.params} not found: the tool reads crop.margin, crop.size and "
            "evaluate.age_bins from the params.yaml the model was trained with. Run it from the "
            "repository root, or pass --params with that file's path."
        )
    hint = (
        f"train one with `dvc repro train` (it writes {MODEL}), "
        "or pass --model with the path of a saved .keras model"
    )
    return Predictor.load(
        args.model,
        args.params,
        args.weights,
        batch_size,
        hint=hint,
        weights_hint="The tool takes that folder from --weights.",
    )
