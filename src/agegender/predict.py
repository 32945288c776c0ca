"""Age and gender of every face in photos, with the trained model.

    python -m agegender.predict PHOTO_OR_FOLDER [...] [--model models/model.keras]
        [--format jsonl|csv] [--annotate DIR] [--batch-size 32] [--params params.yaml]

Faces are found with MTCNN and cropped as the crop stage crops them for `crop.method: mtcnn`
(`crop.margin`, `crop.size`), then resized to the model's input size. One line per face goes
to stdout (JSON lines, or CSV with a header); a photo that cannot be used is named on stderr
with its reason (missing, unreadable, too_large, no_face) and the run goes on. Exit status:
0 when at least one face was predicted, 1 when none was, 2 for a usage error.

`agegender.inference` is the reusable core (find_faces, Predictor, predict_faces).
A model trained on dlib's face-recognition network (`model.backbone: dlib_resnet`) also needs
the dlib model files (`--weights`, default data/weights, where `dvc repro` puts them).
"""

import argparse
import csv
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from agegender.errors import exits_cleanly
from agegender.images import ImageSkip, load_rgb
from agegender.inference import Predictor, find_faces, predict_faces
from agegender.layout import MODEL, PARAMS, WEIGHTS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
FIELDS = [
    "file",
    "face",
    "x1",
    "y1",
    "x2",
    "y2",
    "confidence",
    "gender",
    "gender_prob",
    "age",
    "age_bin",
    "age_bin_prob",
]


def image_files(paths):
    """The named files as given, and the image files under named folders, sorted, recursively."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = [
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            ]
            files += [(p, p.relative_to(path)) for p in sorted(found)]
        else:
            files.append((path, Path(path.name)))
    return files


def annotate(image, faces, results):
    """A copy of the photo with each face's box and its label drawn on it."""
    from PIL import ImageDraw, ImageFont

    image = image.copy()
    draw = ImageDraw.Draw(image)
    scale = max(image.size) / 500
    try:
        font = ImageFont.load_default(size=max(11, round(14 * scale)))
    except (TypeError, ImportError, OSError):  # no FreeType: the small bitmap font
        font = ImageFont.load_default()
    width = max(2, round(2 * scale))
    for index, (face, result) in enumerate(zip(faces, results)):
        colour = (30, 144, 255) if result["gender"] == "male" else (255, 64, 160)
        draw.rectangle(face.box, outline=colour, width=width)
        label = (
            f"#{index} {result['gender']} {result['gender_prob']:.2f}, "
            f"age {result['age']:.1f} ({result['age_bin']})"
        )
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        x = face.box[0]
        y = (
            face.box[1] - (bottom - top) - 2 * width
            if face.box[1] > (bottom - top) + 2 * width
            else face.box[3] + width
        )
        draw.rectangle(
            (x, y, x + right - left + 2 * width, y + bottom - top + 2 * width), fill=colour
        )
        draw.text((x + width - left, y + width - top), label, fill=(255, 255, 255), font=font)
    return image


def save_annotated(image, target):
    target.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if target.suffix.lower() in (".jpg", ".jpeg", ".webp") else {}
    image.save(target, **options)


class Writer:
    """One record per face on stdout, as JSON lines or CSV (header first)."""

    def __init__(self, fmt, stream):
        self.fmt, self.stream = fmt, stream
        if fmt == "csv":
            self.csv = csv.DictWriter(stream, fieldnames=FIELDS, lineterminator="\n")
            self.csv.writeheader()

    def write(self, file, index, face, result):
        record = {
            "file": str(file),
            "face": index,
            "box": list(face.box),
            "confidence": round(face.confidence, 4),
            **result,
        }
        if self.fmt == "csv":
            box = record.pop("box")
            self.csv.writerow({**record, **dict(zip(("x1", "y1", "x2", "y2"), box))})
        else:
            self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="agegender-predict",
        description=(
            "Find the faces in photos and predict each one's gender and age with the trained model."
        ),
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PHOTO_OR_FOLDER",
        help="photos, or folders searched for jpg, jpeg, png, bmp and webp files",
    )
    parser.add_argument(
        "--model", type=Path, default=MODEL, help=f"the saved model (default {MODEL})"
    )
    parser.add_argument(
        "--format",
        choices=("jsonl", "csv"),
        default="jsonl",
        help="output on stdout (default jsonl)",
    )
    parser.add_argument(
        "--annotate",
        type=Path,
        metavar="DIR",
        help="write each photo with boxes and labels drawn into DIR",
    )
    parser.add_argument(
        "--batch-size", type=positive, default=32, help="faces per model call (default 32)"
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=WEIGHTS,
        help=f"folder of the dlib model files, for a dlib_resnet model (default {WEIGHTS})",
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=PARAMS,
        help=(
            "params.yaml giving crop.margin, crop.size and evaluate.age_bins (default params.yaml)"
        ),
    )
    return parser.parse_args(argv)


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@exits_cleanly
def main(argv=None):
    args = parse_args(argv)
    from agegender.params import load_params

    params = load_params(args.params)
    margin, size, bins = (
        params["crop"]["margin"],
        params["crop"]["size"],
        params["evaluate"]["age_bins"],
    )
    hint = (
        f"train one with `dvc repro train` (it writes {MODEL}), "
        "or pass --model with the path of a saved .keras model"
    )
    predictor = Predictor.load(args.model, args.weights, face_margin=margin, hint=hint)
    files = image_files(args.paths)
    writer = Writer(args.format, sys.stdout)

    from tqdm import tqdm

    show_bar = any(Path(p).is_dir() for p in args.paths) and sys.stderr.isatty()
    progress = tqdm(files, desc="predict", unit="photo", file=sys.stderr, disable=not show_bar)
    pending = []  # (file, name, image or None, faces) waiting for a batch to fill
    counts = {"photos": 0, "faces": 0, "skipped": 0}

    def report(file, reason):
        counts["skipped"] += 1
        progress.write(f"{file}: {reason}", file=sys.stderr)

    def flush():
        crops = [face.crop for *_, faces in pending for face in faces]
        results = iter(predict_faces(predictor, crops, bins, args.batch_size))
        for file, name, image, faces in pending:
            answered = []
            for index, face in enumerate(faces):
                result = next(results)
                if result is None:
                    report(f"{file} face {index}", "no_landmarks")
                    continue
                writer.write(file, index, face, result)
                answered.append((face, result))
            counts["photos"] += 1
            counts["faces"] += len(answered)
            if image is not None and answered:
                try:
                    save_annotated(annotate(image, *zip(*answered)), args.annotate / name)
                except (OSError, ValueError, KeyError) as error:
                    report(file, f"annotate_failed ({error})")
        pending.clear()

    for file, name in progress:
        try:
            image = load_rgb(file)
        except ImageSkip as skip:
            report(file, skip.reason)
            continue
        faces = find_faces(image, margin, size)
        if not faces:
            report(file, "no_face")
            continue
        pending.append((file, name, image if args.annotate else None, faces))
        if sum(len(faces) for *_, faces in pending) >= args.batch_size:
            flush()
    flush()
    progress.close()

    if not counts["faces"]:
        print(f"predict: no face predicted in {len(files)} file(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
