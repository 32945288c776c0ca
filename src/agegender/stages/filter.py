"""Stage filter: IMDB-WIKI metadata -> the records clean enough to learn from.

Whether an image file exists and decodes is not checked here but in crop, where images are
read, so that an archive holding only the .mat can already be filtered and counted.
"""

from agegender.contracts.errors import PipelineError
from agegender.contracts.files import write_csv
from agegender.contracts.layout import RAW, RECORDS
from agegender.contracts.stage import stage
from agegender.facedata.imdbwiki import apply_filter, read_mat
from agegender.facedata.sources import mat_path


def filter_metrics(table, kept, removed):
    return {
        "total": len(table),
        "kept": len(kept),
        "removed": removed,
        "male": int((kept["gender"] == 1).sum()),
        "female": int((kept["gender"] == 0).sum()),
        "age_mean": round(float(kept["age"].mean()), 3),
    }


@stage("filter")
def main(params, run):
    section = params["filter"]
    mat = mat_path(RAW, params["data"]["dataset"])
    table = read_mat(mat)
    kept, removed = apply_filter(table, section)
    if kept.empty:
        worst = max(removed, key=removed.get)
        raise PipelineError(
            f"no record of {mat} passes the filter: "
            f"rule '{worst}' removed {removed[worst]} of {len(table)}. "
            f"Loosen that threshold in params.yaml (filter section)."
        )
    metrics = filter_metrics(table, kept, removed)
    write_csv(RECORDS, kept)
    print(
        f"filter: kept {metrics['kept']} of {metrics['total']} records "
        f"({metrics['male']} male, {metrics['female']} female)"
    )
    return metrics


if __name__ == "__main__":
    main()
