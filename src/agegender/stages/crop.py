"""Stage crop: one square face image per kept record, at crop.size with crop.margin.

Images that are missing, undecodable, too small, or (with mtcnn) hold no face are skipped
and counted per reason in metrics/crop.json. A killed run restarts without redoing the faces
it finished, as long as the settings and the records are the same (data/crops persists).
"""

import hashlib
import json
import os
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from agegender.contracts.errors import PipelineError
from agegender.contracts.files import read_csv, replace_atomically, write_csv, write_json
from agegender.contracts.layout import CROP_IMAGES, CROP_INDEX, CROPS, RAW, RECORDS
from agegender.contracts.stage import stage
from agegender.facedata.images import (
    ImageSkip,
    crop_face,
    face_box_in_crop,
    grow_box,
    load_rgb,
    resize_whole,
)
from agegender.facedata.sources import DATASETS, dataset_dir


def face_box(record, image, settings):
    """The face box in image coordinates, by the method chosen in params."""
    if settings["method"] == "mtcnn":
        from agegender.facedata.face_detector import detect_faces

        faces = detect_faces(image)
        if not faces:
            raise ImageSkip("no_face", record["full_path"])
        return faces[0][0]
    if settings["from_crop_archive"]:
        return face_box_in_crop(*image.size, settings["source_margin"])
    return (record["x1"], record["y1"], record["x2"], record["y2"])


def crop_record(record, source_dir, out_dir, settings):
    """Write one face image; return None when written, else the reason it was skipped."""
    target = (out_dir / record["full_path"]).with_suffix(".jpg")
    if target.exists():  # finished by an interrupted run with the same settings
        return None
    try:
        image = load_rgb(source_dir / record["full_path"], min_size=settings["min_source_size"])
        if settings["method"] == "none":
            face = resize_whole(image, settings["size"])
        else:
            face = crop_face(
                image,
                grow_box(face_box(record, image, settings), settings["margin"]),
                settings["size"],
            )
    except ImageSkip as skip:
        return skip.reason
    replace_atomically(target, lambda tmp: face.save(tmp, format="JPEG", quality=95))
    return None


def crop_all(records, source_dir, out_dir, settings, workers):
    work = partial(crop_record, source_dir=source_dir, out_dir=out_dir, settings=settings)
    rows = records.to_dict("records")
    if workers == 1:
        return [work(row) for row in rows]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(work, rows, chunksize=max(1, len(rows) // (workers * 16))))


def prepare_output(out_dir, settings):
    """Keep the faces of an interrupted run only if they were made from the same inputs;
    the index goes first, so the folder never looks complete before it is."""
    marker = out_dir / "settings.json"
    (out_dir / "index.csv").unlink(missing_ok=True)
    if not marker.exists() or json.loads(marker.read_text()) != json.loads(json.dumps(settings)):
        shutil.rmtree(out_dir, ignore_errors=True)
    write_json(marker, settings)


@stage("crop")
def main(params, run):
    section = params["crop"]
    dataset = params["data"]["dataset"]
    records = read_csv(RECORDS)
    settings = {
        **section,
        "dataset": dataset,
        "from_crop_archive": DATASETS[dataset]["folder"].endswith("_crop"),
        "records_md5": hashlib.md5(RECORDS.read_bytes()).hexdigest(),
    }
    prepare_output(CROPS, settings)
    workers = section["workers"] or os.cpu_count()
    reasons = crop_all(records, dataset_dir(RAW, dataset), CROP_IMAGES, settings, workers)
    written = records[[reason is None for reason in reasons]]
    skipped = Counter(reason for reason in reasons if reason is not None)
    if written.empty:
        raise PipelineError(
            f"no face image could be written from {len(records)} records of {RECORDS}; "
            f"skipped: {dict(skipped)}. "
            f"Check that data/raw holds the images (the archive may hold only the .mat)."
        )
    as_jpeg = written["full_path"].map(lambda path: str(Path(path).with_suffix(".jpg")))
    write_csv(CROP_INDEX, written.assign(full_path=as_jpeg))
    metrics = {
        "input": len(records),
        "written": len(written),
        "skipped": dict(sorted(skipped.items())),
    }
    print(
        f"crop: wrote {metrics['written']} of {metrics['input']} faces; "
        f"skipped {metrics['skipped']}"
    )
    return metrics


if __name__ == "__main__":
    main()
