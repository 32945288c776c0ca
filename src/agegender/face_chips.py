"""dlib's face-recognition ResNet as a frozen backbone: face crop -> aligned chip -> 128-D
descriptor.

The network was trained on chips that dlib cuts from its 5-point landmarks (150 px, padding
0.25), so every face goes through `FaceEncoder.encode` the same way: the features stage for
training and test faces, predict and serving for new ones. The face box inside a crop comes
from the crop's own geometry (the crop stage and predict grow the face box by a known margin),
so no detector runs inside a crop.
"""

import hashlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from agegender.errors import PipelineError
from agegender.images import ImageSkip, as_array, face_box_in_crop, load_rgb

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
DESCRIPTOR_SIZE = 128
CHIP_SIZE, CHIP_PADDING = 150, 0.25
WORK_SIZE = 256  # small crops are upscaled first, so the landmarks land on sub-pixel detail


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_model_files(directory, verify=True):
    """The paths of both files in `directory`, or one paragraph saying what is wrong and what to
    do."""
    paths = {}
    for role, (name, sha256) in MODEL_FILES.items():
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


class FaceEncoder:
    """The landmark model and the descriptor network, loaded once; with `workers` > 1, batches
    are shared with that many processes (the network runs on one core each)."""

    def __init__(self, weights_dir, face_margin, verify=True, workers=1):
        import dlib

        paths = check_model_files(weights_dir, verify)
        try:
            self.landmarks = dlib.shape_predictor(str(paths["landmarks"]))
            self.network = dlib.face_recognition_model_v1(str(paths["descriptor"]))
        except RuntimeError as error:
            raise PipelineError(
                f"dlib could not load the models in {weights_dir} ({error}); "
                f"run `dvc repro download_weights` again."
            ) from None
        self.dlib, self.face_margin = dlib, face_margin
        self.weights_dir, self.workers, self.pool = str(weights_dir), workers, None

    def chip(self, image):
        """The aligned 150 px chip of a face crop (RGB PIL image), or ImageSkip("no_landmarks")."""
        from PIL import Image

        work = as_array(image.resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BILINEAR))
        box = [int(round(v)) for v in face_box_in_crop(WORK_SIZE, WORK_SIZE, self.face_margin)]
        shape = self.landmarks(work, self.dlib.rectangle(*box))
        points = [(shape.part(i).x, shape.part(i).y) for i in range(shape.num_parts)]
        if work.std() < 2 or not landmarks_plausible(points, box):
            raise ImageSkip("no_landmarks")
        return self.dlib.get_face_chip(work, shape, size=CHIP_SIZE, padding=CHIP_PADDING)

    def encode(self, images):
        """(N, 128) float32 descriptors of face crops; a row of NaN where no landmarks were
        found."""
        rows = np.full((len(images), DESCRIPTOR_SIZE), np.nan, dtype=np.float32)
        for index, image in enumerate(images):
            try:
                rows[index] = np.asarray(
                    self.network.compute_face_descriptor(self.chip(image)), np.float32
                )
            except ImageSkip:
                continue
        return rows

    def encode_with_mirror(self, images):
        """(N, 2, 128): each crop's descriptor and its mirror image's, as the saved model reads
        them."""
        from PIL import Image

        both = list(images) + [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images]
        if self.workers > 1 and len(both) > 2:
            if self.pool is None:
                self.pool = ProcessPoolExecutor(
                    self.workers,
                    initializer=_start_worker,
                    initargs=(self.weights_dir, self.face_margin),
                )
            size = -(-len(both) // self.workers)
            chunks = [both[start : start + size] for start in range(0, len(both), size)]
            rows = np.concatenate(list(self.pool.map(_encode_images, chunks)))
        else:
            rows = self.encode(both)
        return np.stack([rows[: len(images)], rows[len(images) :]], axis=1)


_worker_encoder = None


def _start_worker(weights_dir, face_margin):
    global _worker_encoder
    _worker_encoder = FaceEncoder(weights_dir, face_margin, verify=False)


def _encode_images(images):
    return _worker_encoder.encode(images)


def _encode_files(job):
    from PIL import Image

    paths, flip = job
    images = []
    for path in paths:
        try:
            image = load_rgb(path)
        except ImageSkip:
            image = Image.new("RGB", (WORK_SIZE, WORK_SIZE))  # blank: counted as no_landmarks
        images.append(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image)
    return _worker_encoder.encode(images)


def encoded_batches(paths, weights_dir, face_margin, flip=False, workers=2, chunk=64):
    """Descriptors of the face crops in `paths`, `chunk` crops at a time and in order, over
    `workers` processes (the network runs on one core each); `flip` mirrors every crop first.
    A generator, so a caller writing them to disk holds only the chunks in flight."""
    check_model_files(weights_dir)
    paths = [str(path) for path in paths]
    jobs = [(paths[start : start + chunk], flip) for start in range(0, len(paths), chunk)]
    if workers <= 1:
        _start_worker(weights_dir, face_margin)
        yield from map(_encode_files, jobs)
        return
    with ProcessPoolExecutor(
        workers, initializer=_start_worker, initargs=(str(weights_dir), face_margin)
    ) as pool:
        yield from pool.map(_encode_files, jobs)


def encode_files(paths, weights_dir, face_margin, flip=False, workers=2, chunk=64):
    """All descriptors of `encoded_batches` in one (N, 128) float32 array."""
    batches = list(encoded_batches(paths, weights_dir, face_margin, flip, workers, chunk))
    return np.concatenate(batches) if batches else np.zeros((0, DESCRIPTOR_SIZE), np.float32)


def crop_face_margin(crop_section):
    """The margin around the face in the crop stage's images: `crop.margin` when it cut the
    face box, the archive's own margin when it only resized (`crop.method: none`)."""
    return (
        crop_section["source_margin"]
        if crop_section["method"] == "none"
        else crop_section["margin"]
    )
