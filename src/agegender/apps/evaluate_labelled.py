"""The trained model scored on a labelled face set of the user's, as the evaluate_external stage
scores the sets in params.yaml, without adding it to the pipeline.

    agegender evaluate FOLDER_OR_CSV [--format utkface|csv] [--face-margin M]
        [--model models/model.keras] [--params params.yaml] [--weights data/weights]

A folder holds UTKFace-named images (`[age]_[gender]_[race]_[date&time].jpg`); a CSV file has
the columns path, age and gender. The metrics (gender accuracy, age MAE, CS@n, by gender, age
bin and ethnicity, what was skipped and why) go to stdout as one JSON document.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from agegender.contracts.errors import PipelineError, exits_cleanly
from agegender.contracts.params import load_params
from agegender.evaluation import external_sets
from agegender.inference.predictor import add_model_options, predictor_of_options

SUMMARY = "score the model on a labelled face set (UTKFace-named folder, or a CSV)"


def margin(text):
    value = float(text)
    if not 0 <= value <= 5:
        raise argparse.ArgumentTypeError(f"must be from 0 to 5, got {text}")
    return value


def add_arguments(parser):
    parser.add_argument(
        "path",
        type=Path,
        metavar="FOLDER_OR_CSV",
        help="a folder of UTKFace-named images, or a CSV file with columns path,age,gender",
    )
    parser.add_argument(
        "--format",
        choices=external_sets.FORMATS,
        help="default: csv for a file or a .csv name, utkface for a folder",
    )
    parser.add_argument(
        "--face-margin",
        type=margin,
        metavar="M",
        help="share of the face box each image carries on each side (default: 0 for utkface, "
        "the training crops' margin for csv)",
    )
    add_model_options(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="faces per model call")


def labelled_set(args):
    """The set as an external.sets entry, or one paragraph on what the path should be."""
    is_csv = args.path.suffix.lower() == ".csv" or args.path.is_file()
    form = args.format or ("csv" if is_csv else "utkface")
    wanted = args.path.is_file() if form == "csv" else args.path.is_dir()
    if not wanted:
        raise PipelineError(
            f"{args.path} is not an existing {'CSV file' if form == 'csv' else 'folder'}: give a "
            "folder of UTKFace-named images, or a CSV file with columns path,age,gender "
            "(--format says which when the name does not)."
        )
    entry = {"name": args.path.stem or "labelled", "format": form, "path": str(args.path)}
    if args.face_margin is not None:
        entry["face_margin"] = args.face_margin
    return entry


@exits_cleanly
def run(args):
    entry = labelled_set(args)
    predictor = predictor_of_options(args, args.batch_size)
    params = load_params(args.params)
    params["evaluate"]["batch_size"] = args.batch_size
    metrics = external_sets.evaluate_set(predictor, entry, params)
    json.dump(metrics, sys.stdout, indent=2)
    print()
    return 0
