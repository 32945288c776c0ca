"""Stage evaluate_external: the trained model on other labelled face sets (params external.sets),
scored overall and by gender, age bin and ethnicity, so a bias the own test split hides shows."""

import os
from collections import Counter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from agegender import external, plots
from agegender.errors import PipelineError
from agegender.files import replace_atomically
from agegender.images import ImageSkip, load_rgb
from agegender.inference import Predictor
from agegender.labels import AGES
from agegender.layout import EXTERNAL_FIGURES, EXTERNAL_REPORT, MODEL, WEIGHTS
from agegender.report import external_section
from agegender.stage import stage


def predict(predictor, paths, face_margin, batch_size):
    """(rows of `paths` scored, their outputs, skips per reason), one batch of images in memory at
    a time."""
    kept, gender, age, skipped = [], [np.zeros((0, 2))], [np.zeros((0, len(AGES)))], Counter()
    for start in range(0, len(paths), batch_size):
        crops, rows = [], []
        for row in range(start, min(start + batch_size, len(paths))):
            try:
                image = load_rgb(paths[row])
            except ImageSkip as skip:
                skipped[skip.reason] += 1
                continue
            crops.append(predictor.framed(image, face_margin))
            rows.append(row)
        outputs = predictor.outputs(crops)
        usable = ~np.isnan(outputs["gender"]).any(axis=1)
        if not usable.all():
            skipped["no_landmarks"] += int((~usable).sum())
        kept += [row for row, ok in zip(rows, usable) if ok]
        gender.append(outputs["gender"][usable])
        age.append(outputs["age"][usable])
    return (
        np.array(kept, dtype=int),
        {"gender": np.concatenate(gender), "age": np.concatenate(age)},
        dict(skipped),
    )


def evaluate_set(predictor, entry, params):
    """The metrics of one set; a set with no usable image is an error, not a row of empty
    figures."""
    section, crop = params["evaluate"], params["crop"]
    table, bad = external.records(entry)
    margin = external.face_margin(entry, crop["margin"])
    rows, outputs, skipped = predict(
        predictor, table["path"].tolist(), margin, section["batch_size"]
    )
    found = len(table) + len(bad)
    if not len(rows):
        raise PipelineError(
            f"external set '{entry['name']}' ({entry['path']}) has no usable image: "
            f"{found} found, {len(bad)} with "
            f"labels that do not parse (e.g. {bad[0] if bad else 'none'}), "
            f"skipped: {skipped or 'none'}. Check "
            f"the path and its format ({entry['format']}), or remove the set from external.sets."
        )
    metrics = external.score(
        table.iloc[rows].reset_index(drop=True), outputs, section["age_bins"], section["cs_years"]
    )
    return external.rounded(
        {
            "format": entry["format"],
            "path": entry["path"],
            "face_margin": margin,
            "images": found,
            "scored": len(rows),
            "skipped": skipped,
            "unparseable": {"count": len(bad), "first": bad[: external.FIRST_BAD]},
            **metrics,
        }
    )


def write_figures(name, metrics):
    """The set's PNGs, by title."""
    figures = {
        f"{name}: by age bin": plots.external_slices_png(
            external.slice_table(metrics["by_age_bin"]),
            EXTERNAL_FIGURES / f"{name}_age_bins.png",
            f"{name}: by true age bin",
        )
    }
    if "by_ethnicity" in metrics:
        figures[f"{name}: by ethnicity"] = plots.external_slices_png(
            external.slice_table(metrics["by_ethnicity"]),
            EXTERNAL_FIGURES / f"{name}_ethnicity.png",
            f"{name}: by ethnicity",
        )
    return figures


@stage("evaluate_external")
def main(params, run):
    sets, cs_years = params["external"]["sets"], params["evaluate"]["cs_years"]
    external.check_sets(sets)
    predictor = (
        Predictor.load(
            MODEL,
            params,
            WEIGHTS,
            batch_size=params["evaluate"]["batch_size"],
            hint="run `dvc repro train` first",
        )
        if sets
        else None
    )
    by_set = {entry["name"]: evaluate_set(predictor, entry, params) for entry in sets}

    EXTERNAL_FIGURES.mkdir(parents=True, exist_ok=True)
    for stale in EXTERNAL_FIGURES.glob("*.png"):  # figures of sets no longer configured
        stale.unlink()
    figures = {name: write_figures(name, metrics) for name, metrics in by_set.items()}
    (EXTERNAL_FIGURES / "README.md").write_text(
        "Figures of the evaluate_external stage, one or two per set of "
        "external.sets (none when no set is configured).\n"
    )
    links = {
        name: {
            title: path.relative_to(EXTERNAL_REPORT.parent).as_posix()
            for title, path in paths.items()
        }
        for name, paths in figures.items()
    }
    report = "# External evaluation\n\n" + external_section(by_set, links)

    replace_atomically(EXTERNAL_REPORT, lambda tmp: tmp.write_text(report, encoding="utf8"))
    headlines = {name: external.headline(metrics, cs_years) for name, metrics in by_set.items()}
    run.log_metrics(headlines)
    run.log_headline_metrics({"external": headlines})
    run.log_artifact(EXTERNAL_REPORT)
    for paths in figures.values():
        for path in paths.values():
            run.log_artifact(path, artifact_path="figures/external")
    for name, metrics in by_set.items():
        age, group = metrics["age"], metrics.get("age_group")
        print(
            f"evaluate_external: {name}: {metrics['scored']}/{metrics['images']} scored, "
            f"gender accuracy {metrics['gender']['accuracy']:.4f} "
            f"(majority {metrics['gender']['majority_baseline']:.4f})"
            + (
                f", age MAE {age['mae']:.2f}, CS@{cs_years} {age[f'cs{cs_years}']:.4f}"
                if age["count"]
                else ""
            )
            + (f", age-group accuracy {group['accuracy']:.4f}" if group else "")
        )
    if not sets:
        print("evaluate_external: no sets configured (params external.sets); wrote empty results")
    return {"sets": by_set}


if __name__ == "__main__":
    main()
