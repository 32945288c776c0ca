"""One error type for every expected failure, and the wrapper that prints it as a paragraph."""

import errno
import functools
import sys


class PipelineError(Exception):
    """A failure the user can fix: the message names the file, record or key and what to do."""


def exits_cleanly(main):
    """Turn a PipelineError into one paragraph on stderr and exit status 1, not a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            print(
                f"error: could not write {error.filename or 'an output'} ({error.strerror}). "
                "Free disk space or make it writable, then re-run: outputs are written whole or "
                "not at all, so nothing half-written was left behind.",
                file=sys.stderr,
            )
            sys.exit(1)

    return wrapper
