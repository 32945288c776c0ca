"""Stage evaluate_external: the trained model on other labelled face sets (params external.sets),
scored overall and by gender, age bin and ethnicity, so a bias the own test split hides shows."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from agegender.contracts.files import replace_atomically
from agegender.contracts.layout import EXTERNAL_FIGURES, EXTERNAL_REPORT, MODEL, WEIGHTS
from agegender.contracts.stage import stage
from agegender.evaluation import external_sets, plots
from agegender.evaluation.report import external_section
from agegender.inference.predictor import Predictor, pretrained_predictor


def write_figures(name, metrics):
    """The set's PNGs, by title."""
    figures = {
        f"{name}: by age bin": plots.external_slices_png(
            external_sets.slice_table(metrics["by_age_bin"]),
            EXTERNAL_FIGURES / f"{name}_age_bins.png",
            f"{name}: by true age bin",
        )
    }
    if "by_ethnicity" in metrics:
        figures[f"{name}: by ethnicity"] = plots.external_slices_png(
            external_sets.slice_table(metrics["by_ethnicity"]),
            EXTERNAL_FIGURES / f"{name}_ethnicity.png",
            f"{name}: by ethnicity",
        )
    return figures


@stage("evaluate_external")
def main(params, run):
    sets, cs_years = params["external"]["sets"], params["evaluate"]["cs_years"]
    external_sets.check_sets(sets)
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
    by_set = {entry["name"]: external_sets.evaluate_set(predictor, entry, params) for entry in sets}
    alone = pretrained_predictor(predictor, WEIGHTS) if predictor else None
    for entry in sets if alone else []:
        figures = external_sets.evaluate_set(alone, entry, params)
        by_set[entry["name"]]["pretrained_alone"] = external_sets.headline(figures, cs_years)

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
    headlines = {
        name: external_sets.headline(metrics, cs_years) for name, metrics in by_set.items()
    }
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
