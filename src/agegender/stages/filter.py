"""Stage filter: IMDB-WIKI metadata -> the records clean enough to learn from.

Whether an image file exists and decodes is not checked here but in crop, where images are
read, so that an archive holding only the .mat can already be filtered and counted.
"""
from pathlib import Path

from agegender.datasets import mat_path
from agegender.errors import PipelineError, exits_cleanly
from agegender.files import write_csv, write_json
from agegender.imdbwiki import apply_filter, read_mat
from agegender.params import load_params
from agegender.tracking import stage_run

RAW_DIR = Path("data/raw")
RECORDS = Path("data/filtered/records.csv")
METRICS = Path("metrics/filter.json")


def filter_metrics(table, kept, removed):
    return {
        "total": len(table),
        "kept": len(kept),
        "removed": removed,
        "male": int((kept["gender"] == 1).sum()),
        "female": int((kept["gender"] == 0).sum()),
        "age_mean": round(float(kept["age"].mean()), 3),
    }


@exits_cleanly
def main():
    params = load_params()
    section = params["filter"]
    mat = mat_path(RAW_DIR, params["data"]["dataset"])
    table = read_mat(mat)
    kept, removed = apply_filter(table, section)
    if kept.empty:
        worst = max(removed, key=removed.get)
        raise PipelineError(
            f"no record of {mat} passes the filter: rule '{worst}' removed {removed[worst]} of {len(table)}. "
            f"Loosen that threshold in params.yaml (filter section)."
        )
    metrics = filter_metrics(table, kept, removed)
    write_csv(RECORDS, kept)
    write_json(METRICS, metrics)
    with stage_run("filter", section, params["mlflow"]["experiment"]) as run:
        run.log_metrics(metrics)
    print(f"filter: kept {metrics['kept']} of {metrics['total']} records ({metrics['male']} male, {metrics['female']} female)")


if __name__ == "__main__":
    main()
