"""Face detection with MTCNN (weights ship in the `mtcnn` wheel, so it runs offline)."""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_detector = None
_lock = threading.Lock()
BATCH_PIXELS = 2**24  # photos of one size per MTCNN call, at most this many pixels together


def detector():
    """One detector per process: building it loads TensorFlow and three networks."""
    global _detector
    with _lock:
        if _detector is None:
            from mtcnn import MTCNN

            _detector = MTCNN(device="CPU:0")
    return _detector


def as_faces(found):
    """MTCNN's answers for one image as (box x1 y1 x2 y2, confidence), most confident first."""
    faces = [(tuple(float(v) for v in face["box"]), float(face["confidence"])) for face in found]
    return sorted(faces, key=lambda face: -face[1])


def detect_faces(image, min_face_size=20):
    """All faces in an RGB PIL image as (box x1 y1 x2 y2, confidence), most confident first."""
    return detect_faces_in_photos([image], min_face_size)[0]


def same_size_batches(images):
    """Indices of the images in batches of one size each, at most BATCH_PIXELS together: MTCNN
    pads a batch of mixed sizes to the largest, which moves the boxes it finds, while a batch of
    one size finds exactly what one image at a time finds."""
    by_size = {}
    for index, image in enumerate(images):
        by_size.setdefault(image.size, []).append(index)
    batches = []
    for (width, height), indices in by_size.items():
        step = max(1, BATCH_PIXELS // (width * height))
        batches += [indices[at : at + step] for at in range(0, len(indices), step)]
    return batches


def detect_faces_in_photos(images, min_face_size=20, workers=None):
    """The faces of each RGB PIL image, as `detect_faces` gives them: photos of one size in one
    MTCNN call, the batches on `workers` threads (default: one per core)."""
    found = [None] * len(images)
    mtcnn = detector()

    def detect(indices):
        arrays = [np.asarray(images[index]) for index in indices]
        answers = mtcnn.detect_faces(
            arrays if len(arrays) > 1 else arrays[0],
            box_format="xyxy",
            min_face_size=min_face_size,
        )
        for index, faces in zip(indices, answers if len(arrays) > 1 else [answers]):
            found[index] = as_faces(faces)

    batches = same_size_batches(images)
    if len(batches) == 1:
        detect(batches[0])
    else:
        with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
            list(pool.map(detect, batches))
    return found
