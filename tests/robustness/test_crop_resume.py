"""A killed crop restarts without redoing finished faces; faces made from other settings or
records are never reused, and the index only appears once every face is written."""

import shutil

import pytest

from agegender.contracts.files import write_csv
from agegender.facedata.imdbwiki import apply_filter, read_mat
from agegender.stages import crop


@pytest.fixture
def cropping(project, sample_dir, tmp_path):
    params = project(filter={"limit": 24}, crop={"workers": 1})
    records, _ = apply_filter(read_mat(sample_dir / "wiki.mat"), params["filter"])
    for path in records["full_path"]:
        (tmp_path / "data/raw/wiki_crop" / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_dir / path, tmp_path / "data/raw/wiki_crop" / path)
    write_csv(tmp_path / "data/filtered/records.csv", records)
    return project, tmp_path / "data/crops"


def faces(out):
    return {
        path.relative_to(out).as_posix(): path.stat().st_mtime_ns
        for path in (out / "images").rglob("*.jpg")
    }


def test_a_restart_keeps_finished_faces_and_redoes_the_rest(cropping):
    _, out = cropping
    crop.main()
    first = faces(out)
    assert len(first) == 24 and (out / "index.csv").exists()
    lost = sorted(first)[:5]
    for name in lost:
        (out / name).unlink()  # as if the run had been killed before writing them
    (out / "index.csv").unlink()
    crop.main()
    again = faces(out)
    assert set(again) == set(first)
    assert all(again[name] == first[name] for name in first if name not in lost)
    assert len((out / "index.csv").read_text().splitlines()) == 25


def test_other_settings_start_afresh(cropping):
    project, out = cropping
    crop.main()
    first = faces(out)
    project(crop={"size": 48})
    crop.main()
    again = faces(out)
    assert set(again) == set(first)
    assert all(again[name] != first[name] for name in first)


def test_the_index_is_removed_before_work_starts(cropping, monkeypatch):
    _, out = cropping
    crop.main()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(crop, "crop_all", killed)
    with pytest.raises(KeyboardInterrupt):
        crop.main()
    assert not (out / "index.csv").exists()
