"""Photos per second of `agegender predict` on a folder of real photos: today's path (one photo
at a time: MTCNN on it, then the network on its faces) against the batched path the command now
takes (photos of one size detected in one MTCNN call on both cores, all faces of a batch
through the network together, the next batch decoded meanwhile), in one run, with the model
loaded once for both. It also prints on how many photos the two paths answer alike: MTCNN in a
batch of one size moves a few boxes by a pixel or two against one photo at a time.

Two folders: the photos as they are (UTKFace: all of one size), and the same photos with
every other one scaled by 1.5 or 2 (mixed sizes: MTCNN batches only photos of one size).
Run from the repository root after `dvc repro`:

    python bench/predict.py [--photos ../shared/data/utkface/images] [--count 240]
"""

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from agegender.apps.predict import batches_read_ahead, photo_answers
from agegender.contracts.layout import MODEL, PARAMS, WEIGHTS
from agegender.inference.predictor import Predictor, as_photo

SHARED_UTKFACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface" / "images"


def one_at_a_time(predictor, files):
    return [predictor.faces(as_photo(file)) for file, _ in files]


def batched(predictor, files, batch_size=32):
    answers = []
    for batch, decoded in batches_read_ahead(files, batch_size):
        images = [image for image, _ in decoded]
        names = [file for file, _ in batch]
        answers += photo_answers(predictor, images, names, lambda *_: None)
    return answers


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def mixed_sizes(files, folder):
    """Copies of the photos, every other one scaled by 1.5 or 2."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for index, (file, _) in enumerate(files):
        image = as_photo(file)
        scale = (1, 1.5, 1, 2)[index % 4]
        size = (round(image.width * scale), round(image.height * scale))
        target = folder / f"{index:04d}.png"
        image.resize(size).save(target)
        copies.append((target, Path(target.name)))
    return copies


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=SHARED_UTKFACE)
    parser.add_argument("--count", type=int, default=240)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/agegender-bench-predict"))
    args = parser.parse_args()
    photos = sorted(args.photos.glob("*.jpg"))[: args.count]
    if len(photos) < 200:
        parser.error(f"{args.photos} holds {len(photos)} jpg photos; the bench wants 200 or more")
    files = [(path, Path(path.name)) for path in photos]
    predictor = Predictor.load(MODEL, PARAMS, WEIGHTS)
    batched(predictor, files[:40])  # builds MTCNN and traces the networks for both paths
    one_at_a_time(predictor, files[:2])
    print(f"{len(files)} photos from {args.photos}, {os.cpu_count()} cores")
    print(f"{'folder':<12} {'path':<16} {'photos/s':>9} {'faces':>6} {'ratio':>6}")
    for label, folder in (
        ("as they are", files),
        ("mixed sizes", mixed_sizes(files, args.scratch)),
    ):
        today, today_s = timed(one_at_a_time, predictor, folder)
        now, now_s = timed(batched, predictor, folder)
        now = [[answer for answer in answers if answer] for answers in now]
        alike = sum(a == b for a, b in zip(now, today))
        ages = [abs(a["age"] - b["age"]) for x, y in zip(now, today) for a, b in zip(x, y)]
        faces = sum(len(answers) for answers in today)
        print(f"{label:<12} {'one at a time':<16} {len(folder) / today_s:>9.1f} {faces:>6}")
        print(
            f"{'':<12} {'batched':<16} {len(folder) / now_s:>9.1f} "
            f"{sum(len(a) for a in now):>6} {today_s / now_s:>5.2f}x  "
            f"same answers on {alike}/{len(folder)} photos, ages at most "
            f"{max(ages, default=0):.2f} years apart"
        )


if __name__ == "__main__":
    main()
