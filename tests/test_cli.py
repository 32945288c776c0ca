"""agegender.apps.cli: one `agegender` command, installed as a console script and runnable as
`python -m agegender`, listing its subcommands; each subcommand's help; usage errors exit 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agegender.apps.cli import COMMANDS, main

SCRIPT = Path(sys.executable).parent / "agegender"  # what `pip install` put beside python
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def command(*args):
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=120)


@pytest.mark.parametrize("entry", [[str(SCRIPT)], [sys.executable, "-m", "agegender"]])
def test_help_lists_every_subcommand(entry):
    result = command(*entry, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: agegender ")
    for name, app in COMMANDS.items():
        assert f"    {name}" in result.stdout and app.SUMMARY.split()[0] in result.stdout
    assert result.stderr == ""


def test_the_console_script_and_the_module_say_the_same():
    assert (
        command(str(SCRIPT), "--help").stdout
        == command(sys.executable, "-m", "agegender", "--help").stdout
    )


@pytest.mark.parametrize(
    "name, options",
    [
        ("predict", ["--crops", "--annotate", "--format", "--model", "--weights"]),
        ("serve", ["--host", "--port", "--max-upload-mb", "--model"]),
        ("evaluate", ["--format", "--face-margin", "--model", "--batch-size"]),
    ],
)
def test_each_subcommand_has_its_help(name, options, capsys):
    with pytest.raises(SystemExit) as exit:
        main([name, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: agegender {name} ")
    assert all(option in out for option in options)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: COMMAND"),
        (["train"], "invalid choice: 'train'"),
        (["predict"], "the following arguments are required: PHOTO_OR_FOLDER"),
    ],
)
def test_usage_errors_exit_2_with_the_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: agegender") and message in err
