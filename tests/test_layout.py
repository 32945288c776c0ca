"""agegender.contracts.layout: every path dvc.yaml names under data/, models/ and metrics/ is one
of layout's, and each stage's metrics file is the one layout gives the stage."""

from pathlib import Path

import yaml
from conftest import REPO

from agegender.contracts import layout

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def layout_paths():
    paths = {value for value in vars(layout).values() if isinstance(value, Path)}
    return paths | set(layout.STAGE_METRICS.values())


def named(entries):
    return [Path(entry if isinstance(entry, str) else next(iter(entry))) for entry in entries]


def test_every_pipeline_path_of_dvc_yaml_is_a_layout_path():
    known = layout_paths()
    for name, stage in DVC["stages"].items():
        for field in ("deps", "outs", "metrics", "plots"):
            for path in named(stage.get(field, [])):
                if path.parts[0] in ("data", "models", "metrics"):
                    assert path in known, f"stage '{name}' {field} {path} is not in layout.py"


def test_each_stage_writes_the_metrics_file_layout_gives_it():
    for name, path in layout.STAGE_METRICS.items():
        assert named(DVC["stages"][name].get("metrics", [])) == [path], name
    assert set(layout.STAGE_METRICS) <= set(DVC["stages"])
