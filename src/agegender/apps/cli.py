"""The `agegender` command: one entry point for everything a user runs on a trained model.
`python -m agegender` is the same command. The pipeline itself runs under `dvc repro`."""

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from agegender.apps import evaluate_labelled, predict, web
from agegender.contracts.console import native_logs_hidden

COMMANDS = {"predict": predict, "serve": web, "evaluate": evaluate_labelled}


def installed_version():
    try:
        return version("agegender")
    except PackageNotFoundError:
        return "not installed"


def build_parser():
    parser = argparse.ArgumentParser(
        prog="agegender",
        description="Age and gender of faces with the model the DVC pipeline trained "
        "(models/model.keras). Run `agegender COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=installed_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, app in COMMANDS.items():
        command = commands.add_parser(
            name, help=app.SUMMARY, description=app.__doc__.split("\n\n")[0]
        )
        app.add_arguments(command)
        command.set_defaults(run=app.run)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    with native_logs_hidden():
        return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
