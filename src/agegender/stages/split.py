"""Stage split: train/val/test, identity-disjoint and stratified by gender x age bin.

Peers split images at random, so the same celebrity sits in train and test and their figures
are inflated; here every identity (celeb_id, else name) lands in exactly one split.
"""

import numpy as np

from agegender.contracts.errors import PipelineError
from agegender.contracts.files import read_csv, write_csv
from agegender.contracts.layout import CROP_INDEX, SPLITS, split_table
from agegender.contracts.stage import stage


def identity_strata(records, age_bin_width):
    """One stratum per identity: gender and age bin of its first image (by path)."""
    first = records.sort_values("full_path").drop_duplicates("identity").set_index("identity")
    return first["gender"].astype(str) + "_" + (first["age"] // age_bin_width).astype(str)


def assign_splits(records, fractions, age_bin_width, seed):
    """Map each identity to a split; within each stratum identities are shuffled with `seed`
    and cut where their cumulative image count crosses the fractions."""
    strata = identity_strata(records, age_bin_width)
    sizes = records.groupby("identity").size()
    bounds = np.cumsum([fractions[name] for name in SPLITS])
    rng = np.random.default_rng(seed)
    assignment = {}
    for _, members in strata.groupby(strata, sort=True):
        identities = rng.permutation(np.sort(members.index.to_numpy()))
        counts = sizes.loc[identities].to_numpy()
        middle = (np.cumsum(counts) - counts / 2) / counts.sum()
        for identity, position in zip(identities, middle):
            assignment[identity] = SPLITS[
                int(np.searchsorted(bounds, position, side="right").clip(max=2))
            ]
    return records["identity"].map(assignment)


def split_metrics(parts):
    metrics = {}
    for name, part in parts.items():
        metrics[name] = {
            "images": len(part),
            "identities": int(part["identity"].nunique()),
            "male_share": round(float(part["gender"].mean()), 4) if len(part) else 0.0,
            "age_mean": round(float(part["age"].mean()), 3) if len(part) else 0.0,
        }
    return metrics


@stage("split")
def main(params, run):
    section = params["split"]
    records = read_csv(CROP_INDEX)
    split_of = assign_splits(records, section, section["age_bin_width"], params["seed"])
    parts = {name: records[split_of == name].sort_values("full_path") for name in SPLITS}
    empty = [name for name, part in parts.items() if part.empty]
    if empty:
        raise PipelineError(
            f"split {', '.join(empty)} is empty: {len(records)} images in {CROP_INDEX} "
            f"are too few for the fractions {[section[name] for name in SPLITS]}. "
            f"Use more data (filter.limit) or larger fractions."
        )
    for name, part in parts.items():
        write_csv(split_table(name), part)
    metrics = split_metrics(parts)
    print("split: " + ", ".join(f"{name} {metrics[name]['images']}" for name in SPLITS))
    return metrics


if __name__ == "__main__":
    main()
