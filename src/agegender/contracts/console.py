"""What a command shows on stderr: its own messages, not the libraries' native logs.

TensorFlow 2.21, XLA and absl log from C++ straight to file descriptor 2 when they load ("All
log messages before absl::InitializeLog()", oneDNN, CUDA lines); TF_CPP_MIN_LOG_LEVEL no longer
silences them. A command runs with descriptor 2 pointed at a temporary file and Python's
sys.stderr kept on the terminal, so progress bars and error paragraphs still show; the hidden
lines are shown after all when the command fails unexpectedly, where they may say why."""

import contextlib
import os
import sys
import tempfile


@contextlib.contextmanager
def native_logs_hidden():
    try:
        sys.stderr.flush()
        own_stderr = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # already captured (pytest): leave it be
        own_stderr = False
    saved = os.dup(2)
    hidden = tempfile.TemporaryFile()
    os.dup2(hidden.fileno(), 2)
    python_stderr = sys.stderr
    if own_stderr:
        sys.stderr = open(os.dup(saved), "w", buffering=1, encoding=python_stderr.encoding)
    try:
        yield
    except BaseException as error:
        if not isinstance(error, SystemExit) or error.code not in (0, 1, None):
            hidden.seek(0)
            os.write(saved, hidden.read())
        raise
    finally:
        if own_stderr:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)
        hidden.close()
