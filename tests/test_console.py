"""agegender.contracts.console: native library logs written to file descriptor 2 are hidden
while a command runs, its own messages still show, and the hidden lines come back when it fails
unexpectedly. Each case runs in a fresh process, whose descriptor 2 is a real pipe."""

import subprocess
import sys

SCRIPT = """
import os, sys
from agegender.contracts.console import native_logs_hidden
with native_logs_hidden():
    os.write(2, b"I0000 a native log line\\n")
    print("a message of the command", file=sys.stderr)
    {end}
print("after", file=sys.stderr)
"""


def run(end):
    return subprocess.run(
        [sys.executable, "-c", SCRIPT.format(end=end)], capture_output=True, text=True
    )


def test_native_lines_are_hidden_and_the_commands_own_show():
    result = run("pass")
    assert result.returncode == 0
    assert result.stderr == "a message of the command\nafter\n"


def test_an_expected_failure_stays_one_paragraph():
    result = run("sys.exit(1)")
    assert result.returncode == 1
    assert result.stderr == "a message of the command\n"


def test_an_unexpected_failure_shows_the_hidden_lines_too():
    result = run("raise RuntimeError('boom')")
    assert result.returncode == 1
    assert "I0000 a native log line" in result.stderr and "RuntimeError: boom" in result.stderr
