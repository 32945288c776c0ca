"""Face detection with MTCNN (weights ship in the `mtcnn` wheel, so it runs offline)."""

import numpy as np

_detector = None


def detector():
    """One detector per process: building it loads TensorFlow and three networks."""
    global _detector
    if _detector is None:
        from mtcnn import MTCNN

        _detector = MTCNN(device="CPU:0")
    return _detector


def detect_faces(image, min_face_size=20):
    """All faces in an RGB PIL image as (box x1 y1 x2 y2, confidence), most confident first."""
    found = detector().detect_faces(
        np.asarray(image), box_format="xyxy", min_face_size=min_face_size
    )
    faces = [(tuple(float(v) for v in face["box"]), float(face["confidence"])) for face in found]
    return sorted(faces, key=lambda face: -face[1])
