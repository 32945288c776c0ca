"""Build the bundled sample: real wiki_crop faces and their real wiki.mat records, in the
exact wiki_crop archive layout, so the pipeline treats it like the official download.

    python data/sample/make_sample.py ../shared/data/imdb-wiki data/sample/wiki_crop_sample.tar.gz

Deterministic: same inputs give a byte-identical archive (sorted members, zero mtimes).
"""

import gzip
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import scipy.io

FIELDS = (
    "dob",
    "photo_taken",
    "full_path",
    "gender",
    "name",
    "face_location",
    "face_score",
    "second_face_score",
)


def sample_records(mat_path, image_root):
    wiki = scipy.io.loadmat(mat_path, simplify_cells=True)["wiki"]
    present = {p.relative_to(image_root).as_posix() for p in image_root.rglob("*.jpg")}
    keep = np.array([path in present for path in wiki["full_path"]])
    if keep.sum() != len(present):
        sys.exit(f"{len(present) - keep.sum()} images in {image_root} have no record in {mat_path}")
    return {field: wiki[field][keep] for field in FIELDS}


def mat_bytes(records):
    """A 1x1 struct `wiki` of 1xN fields, as in the original file."""
    struct = {}
    for field, values in records.items():
        if values.dtype == object:
            cell = np.empty((1, len(values)), dtype=object)
            cell[0, :] = list(values)
            struct[field] = cell
        else:
            struct[field] = values[np.newaxis, :]
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"wiki": struct}, format="5", do_compression=True)
    header = b"MATLAB 5.0 MAT-file, agegender bundled sample of IMDB-WIKI wiki.mat".ljust(116)
    return header + buffer.getvalue()[116:]


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def main(source, output):
    source, output = Path(source), Path(output)
    image_root = source / "wiki_crop64"
    records = sample_records(source / "wiki.mat", image_root)
    with (
        open(output, "wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz,
    ):
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            add(tar, "wiki_crop/wiki.mat", mat_bytes(records))
            for path in sorted(records["full_path"]):
                add(tar, f"wiki_crop/{path}", (image_root / path).read_bytes())
    print(f"{output}: {len(records['full_path'])} records, {output.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main(*sys.argv[1:3])
