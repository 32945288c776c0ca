"""agegender.stages.crop: one square face image per record, skips counted by reason."""

import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO
from PIL import Image

from agegender.stages.crop import crop_all, crop_record

CROP = yaml.safe_load((REPO / "params.yaml").read_text())["crop"]
GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
FACES = 4


def settings(**changes):
    return {**CROP, "from_crop_archive": True, "size": 32, **changes}


def record(full_path, box=(0, 0, 1, 1)):
    return {"full_path": full_path, "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3]}


@pytest.fixture
def crop_archive(tmp_path, sample_dir):
    """A wiki_crop-like folder: real faces from the bundled sample, plus a missing, a corrupt
    and a tiny image. Returns (folder, records table)."""
    source = tmp_path / "wiki_crop"
    faces = sorted(p.relative_to(sample_dir).as_posix() for p in (sample_dir / "90").glob("*.jpg"))[
        :FACES
    ]
    for path in faces:
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_dir / path, source / path)
    (source / "91").mkdir()
    (source / "91/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGB", (10, 12), (200, 100, 50)).save(source / "91/tiny.jpg")
    paths = faces + ["91/missing.jpg", "91/corrupt.jpg", "91/tiny.jpg"]
    return source, pd.DataFrame([record(p) for p in paths])


def test_metadata_on_crop_archive(tmp_path, crop_archive):
    source, records = crop_archive
    out = tmp_path / "crops"
    reasons = crop_all(records, source, out, settings(), workers=1)
    assert reasons == [None] * FACES + ["missing", "unreadable", "too_small"]
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert written == sorted(["90"] + list(records["full_path"][:FACES]))
    for path in records["full_path"][:FACES]:
        with Image.open(out / path) as face:
            assert (face.format, face.mode, face.size) == ("JPEG", "RGB", (32, 32))


def test_metadata_crop_of_a_crop_image_is_the_whole_image_at_the_source_margin(tmp_path):
    """margin == source_margin: the face box grown back is the whole crop image."""
    source = tmp_path / "src"
    source.mkdir()
    pixels = np.zeros((90, 90, 3), np.uint8)
    pixels[:, 45:] = 255  # right half white
    Image.fromarray(pixels).save(source / "a.png")
    assert crop_record(record("a.png"), source, tmp_path / "out", settings(size=30)) is None
    result = np.asarray(Image.open(tmp_path / "out/a.jpg")).astype(int)
    assert result[:, :12].max() < 40 and result[:, 18:].min() > 215


def test_output_is_always_jpg(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    Image.new("RGB", (40, 40), (0, 255, 0)).save(source / "b.png")
    assert crop_record(record("b.png"), source, tmp_path / "out", settings()) is None
    with Image.open(tmp_path / "out/b.jpg") as face:
        assert face.format == "JPEG"


def test_none_resizes_the_whole_image(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    pixels = np.zeros((50, 100, 3), np.uint8)  # wide: left half red, right half blue
    pixels[:, :50] = (255, 0, 0)
    pixels[:, 50:] = (0, 0, 255)
    Image.fromarray(pixels).save(source / "wide.png")
    assert (
        crop_record(record("wide.png"), source, tmp_path / "out", settings(method="none", size=20))
        is None
    )
    result = np.asarray(Image.open(tmp_path / "out/wide.jpg")).astype(int)
    assert result.shape == (20, 20, 3)
    # nothing cut: red on the left
    assert result[:, :8, 0].min() > 200 and result[:, :8, 2].max() < 60
    assert result[:, 12:, 2].min() > 200 and result[:, 12:, 0].max() < 60  # blue on the right


def test_full_image_dataset_crops_the_records_box(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    pixels = np.zeros((200, 200, 3), np.uint8)
    pixels[40:100, 60:120] = 255  # the face: x 60..120, y 40..100
    Image.fromarray(pixels).save(source / "full.png")
    row = record("full.png", box=(60, 40, 120, 100))
    assert (
        crop_record(row, source, tmp_path / "out", settings(from_crop_archive=False, margin=0.0))
        is None
    )
    result = np.asarray(Image.open(tmp_path / "out/full.jpg").convert("L")).astype(int)
    assert (result > 200).mean() > 0.95

    # with margin 0.5 the face fills the middle half of each side
    assert (
        crop_record(row, source, tmp_path / "wide", settings(from_crop_archive=False, margin=0.5))
        is None
    )
    result = np.asarray(Image.open(tmp_path / "wide/full.jpg").convert("L")).astype(int)
    assert result[10:22, 10:22].min() > 200
    assert result[:5].max() < 40 and result[-5:].max() < 40
    assert 0.2 < (result > 128).mean() < 0.3


def test_full_image_box_beyond_the_border_is_padded_black(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    Image.new("RGB", (100, 100), (255, 255, 255)).save(source / "edge.png")
    row = record("edge.png", box=(50, 50, 150, 150))
    assert (
        crop_record(
            row, source, tmp_path / "out", settings(from_crop_archive=False, margin=0.0, size=20)
        )
        is None
    )
    result = np.asarray(Image.open(tmp_path / "out/edge.jpg").convert("L")).astype(int)
    assert result[:8, :8].min() > 200 and result[12:, 12:].max() < 40


def test_two_workers_give_the_same_result(tmp_path, crop_archive):
    source, records = crop_archive
    one = crop_all(records, source, tmp_path / "one", settings(), workers=1)
    two = crop_all(records, source, tmp_path / "two", settings(), workers=2)
    assert one == two
    for path in records["full_path"][:FACES]:
        assert (tmp_path / "one" / path).read_bytes() == (tmp_path / "two" / path).read_bytes()


def test_stage_with_no_image_written_exits_with_one_paragraph(project, capsys):
    from agegender.stages import crop

    project()
    Path("data/filtered").mkdir(parents=True)
    pd.DataFrame([record("90/gone.jpg")] * 2).assign(gender=1, age=30, identity="x").to_csv(
        "data/filtered/records.csv", index=False
    )
    with pytest.raises(SystemExit) as caught:
        crop.main()
    assert caught.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no face image could be written from 2 records")
    assert "'missing': 2" in err
    assert not Path("data/crops/index.csv").exists()


def test_mtcnn_finds_grace_hopper(tmp_path):
    from agegender.facedata.face_detector import detect_faces

    with Image.open(GRACE_HOPPER) as photo:
        (x1, y1, x2, y2), confidence = detect_faces(photo.convert("RGB"))[0]
    assert confidence > 0.9
    assert 150 < x1 < x2 < 380 and 80 < y1 < y2 < 360  # the face in the 512x600 portrait

    row = record(GRACE_HOPPER.name)
    out = tmp_path / "out"
    assert crop_record(row, GRACE_HOPPER.parent, out, settings(method="mtcnn", size=48)) is None
    with Image.open(out / "grace_hopper.jpg") as face:
        assert face.size == (48, 48)


def test_mtcnn_without_a_face(tmp_path):
    Image.new("RGB", (200, 200), (128, 128, 128)).save(tmp_path / "gray.jpg")
    assert (
        crop_record(record("gray.jpg"), tmp_path, tmp_path / "out", settings(method="mtcnn"))
        == "no_face"
    )
    assert not (tmp_path / "out").exists()
