"""Age and gender of every face in photos, or of faces already cropped, with the trained model.

    agegender predict PHOTO_OR_FOLDER [...] [--crops [--crop-margin M]]
        [--model models/model.keras] [--params params.yaml] [--weights data/weights]
        [--format jsonl|csv] [--annotate DIR] [--batch-size 32] [--quiet]

Photos: faces are found with MTCNN and cropped as the crop stage crops them; `--batch-size`
photos at a time, those of one size detected in one call and all their faces answered together,
while the next batch is decoded. `--crops`: each
image is one face already cut (the dataset's *_crop images, data/crops, another detector's
output); no detector runs, and the image is re-framed to the training crops' margin and size.
One line per face goes to stdout (JSON lines, or CSV with a header); a file that cannot be used
is named on stderr with its reason (missing, unreadable, too_large, no_face, no_landmarks) and
the run goes on. Nothing else goes to stderr but a progress bar, on a terminal, for work that
takes more than two seconds (`--quiet`: no bar, and only unreadable files are named). Exit
status: 0 when every file could be read and a face was predicted, 1 when a file was missing or
unreadable or no face was predicted, 2 for a usage error.

The Python API behind it is `agegender.inference.predictor.Predictor`.
"""

import argparse
import csv
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from agegender.contracts.errors import exits_cleanly
from agegender.facedata.images import ImageSkip
from agegender.inference.predictor import (
    ANSWER_FIELDS,
    add_model_options,
    as_photo,
    crop_box,
    predictor_of_options,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# CSV: the box and the age range as one column per number
FIELDS = ["file", "face", "x1", "y1", "x2", "y2", "confidence"] + [
    column
    for field in ANSWER_FIELDS
    for column in (["age_range_low", "age_range_high"] if field == "age_range" else [field])
]
UNREADABLE = {"missing", "unreadable", "too_large", "too_small", "no_images"}


def image_files(paths):
    """(file, name under --annotate) for the named files as given and the image files under
    named folders, sorted, recursively; a folder holding none gives (folder, None)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = [
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            ]
            files += [(p, p.relative_to(path)) for p in sorted(found)] or [(path, None)]
        else:
            files.append((path, Path(path.name)))
    return files


def annotate(image, answers):
    """A copy of the image with each face's box and its label drawn on it."""
    from PIL import ImageDraw, ImageFont

    image = image.copy()
    draw = ImageDraw.Draw(image)
    scale = max(image.size) / 500
    try:
        font = ImageFont.load_default(size=max(11, round(14 * scale)))
    except (TypeError, ImportError, OSError):  # no FreeType: the small bitmap font
        font = ImageFont.load_default()
    width = max(2, round(2 * scale))
    for answer in answers:
        box = answer["box"]
        colour = (30, 144, 255) if answer["gender"] == "male" else (255, 64, 160)
        draw.rectangle(box, outline=colour, width=width)
        left, top, right, bottom = draw.textbbox((0, 0), label(answer), font=font)
        high = (bottom - top) + 2 * width
        x, y = box[0], box[1] - high if box[1] > high else box[3] + width
        draw.rectangle((x, y, x + right - left + 2 * width, y + high), fill=colour)
        draw.text((x + width - left, y + width - top), label(answer), fill="white", font=font)
    return image


def label(answer):
    return (
        f"#{answer['face']} {answer['gender']} {answer['gender_prob']:.2f}, "
        f"age {answer['age']:.1f} ({answer['age_bin']})"
    )


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

    def write(self, file, answer):
        record = {"file": str(file), **answer}
        if self.fmt == "csv":
            box, (low, high) = record.pop("box"), record.pop("age_range")
            self.csv.writerow(
                {
                    **record,
                    **dict(zip(("x1", "y1", "x2", "y2"), box)),
                    "age_range_low": low,
                    "age_range_high": high,
                }
            )
        else:
            self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()


SUMMARY = "gender and age of the faces in photos, or of face crops"


def add_arguments(parser):
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PHOTO_OR_FOLDER",
        help="images, or folders searched for jpg, jpeg, png, bmp and webp files",
    )
    parser.add_argument(
        "--crops",
        action="store_true",
        help="each image is one face already cropped: no detection (default: find faces)",
    )
    parser.add_argument(
        "--crop-margin",
        type=float,
        metavar="M",
        help="with --crops: share of the face box each crop carries on each side (the "
        "*_crop archives: 0.4; a tight detector box: 0); default: the training crops' margin",
    )
    add_model_options(parser)
    parser.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    parser.add_argument(
        "--annotate", type=Path, metavar="DIR", help="write each image with boxes and labels"
    )
    parser.add_argument(
        "--batch-size",
        type=positive,
        default=32,
        help="photos (or crops) read, detected and answered together (default 32)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar and no notes on photos without a face or landmarks; files that "
        "can't be read are still named",
    )


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def photo_answers(predictor, images, files, report):
    """The answer list of each photo, all photos of the batch detected and answered together;
    a photo without a face and a face without dlib landmarks are reported and left out."""
    results = []
    for file, answers in zip(files, predictor.photo_answers(images)):
        if not answers:
            report(file, "no_face")
        for index, answer in enumerate(answers):
            if answer is None:
                report(f"{file} face {index}", "no_landmarks")
        results.append([answer for answer in answers if answer])
    return results


def crop_answers(predictor, images, files, margin, report):
    """The answer list of each crop (empty: reported), the whole batch in one model call."""
    answers = predictor.crops(images, margin)
    margin = predictor.face_margin if margin is None else margin
    results = []
    for image, file, answer in zip(images, files, answers):
        if answer is None:
            report(file, "no_landmarks")
            results.append([])
            continue
        box = list(crop_box(image, margin))
        results.append([{"face": 0, "box": box, "confidence": None, **answer}])
    return results


def decoded(file):
    """(image, None) or (None, the reason it can't be used)."""
    try:
        return as_photo(file), None
    except ImageSkip as skip:
        return None, skip.reason


def batches_read_ahead(files, size):
    """The files in batches of `size`, each with its decoded images; the next batch is decoded
    on another core while the networks work on this one."""
    from concurrent.futures import ThreadPoolExecutor

    def read(batch):
        return [decoded(file) for file, _ in batch]

    batches = [files[at : at + size] for at in range(0, len(files), size)]
    with ThreadPoolExecutor(1) as pool:
        upcoming = pool.submit(read, batches[0]) if batches else None
        for index, batch in enumerate(batches):
            images = upcoming.result()
            if index + 1 < len(batches):
                upcoming = pool.submit(read, batches[index + 1])
            yield batch, images


@exits_cleanly
def run(args):
    predictor = predictor_of_options(args, args.batch_size)
    files = image_files(args.paths)
    writer = Writer(args.format, sys.stdout)

    from tqdm import tqdm

    progress = tqdm(
        total=len(files),
        desc="predict",
        unit="image",
        file=sys.stderr,
        delay=2,  # only work that takes a while shows a bar
        disable=args.quiet or not sys.stderr.isatty(),
    )
    counts = {"faces": 0, "unreadable": 0}

    def report(file, reason):
        counts["unreadable"] += reason in UNREADABLE
        if not args.quiet or reason in UNREADABLE:
            progress.write(f"{file}: {reason}", file=sys.stderr)

    def emit(file, name, image, answers):
        for answer in answers:
            writer.write(file, answer)
        counts["faces"] += len(answers)
        if args.annotate and answers:
            try:
                save_annotated(annotate(image, answers), args.annotate / name)
            except (OSError, ValueError, KeyError) as error:
                report(file, f"annotate_failed ({error})")

    for batch, decoded_images in batches_read_ahead(files, args.batch_size):
        usable = []
        for (file, name), (image, reason) in zip(batch, decoded_images):
            if name is None:
                report(file, "no_images")
            elif reason:
                report(file, reason)
            else:
                usable.append((file, name, image))
        if usable:
            used_files, names, images = zip(*usable)
            answer = crop_answers if args.crops else photo_answers
            margin = (args.crop_margin,) if args.crops else ()
            results = answer(predictor, images, used_files, *margin, report)
            for file, name, image, answers in zip(used_files, names, images, results):
                emit(file, name, image, answers)
        progress.update(len(batch))
    progress.close()
    return exit_status(counts, len(files))


def exit_status(counts, files):
    if counts["unreadable"]:
        print(f"predict: {counts['unreadable']} file(s) could not be read", file=sys.stderr)
        return 1
    if not counts["faces"]:
        print(f"predict: no face predicted in {files} file(s)", file=sys.stderr)
        return 1
    return 0
