"""Downloader tests against a local HTTP server on 127.0.0.1 (no other network)."""
from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pneumoscope.cli import main
from pneumoscope.data import download as dl
from pneumoscope.errors import ConfigError, DownloadError

FILES = {
    "chest_xray/train/NORMAL/IM-0001-0001.jpeg": b"\xff\xd8normal-1" * 300,
    "chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg": b"\xff\xd8bact" * 500,
    "chest_xray/test/PNEUMONIA/person2_virus_3.jpeg": bytes(range(256)) * 20,
    "__MACOSX/chest_xray/train/NORMAL/._IM-0001-0001.jpeg": b"resource fork",
    "chest_xray/.DS_Store": b"junk",
}


def _zip(files: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


PAYLOAD = _zip(FILES)  # stored (uncompressed): about 14 kB
MD5 = hashlib.md5(PAYLOAD).hexdigest()
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Serves server.payload for every path, honouring ``Range: bytes=N-`` unless told otherwise.

    server.mode: "ok" | "corrupt" | "cut_first" (first request: half the bytes, then close) |
    "cut_always" | "ignore_range" | "404".
    """

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        srv.requests.append({**dict(self.headers), "path": self.path})
        data = srv.payload
        if srv.mode == "404":
            self.send_error(404)
            return
        if srv.mode == "corrupt":
            data = data[:100] + bytes(b ^ 0xFF for b in data[100:200]) + data[200:]
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and srv.mode != "ignore_range":
            start = int(rng.removeprefix("bytes=").partition("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = srv.mode == "cut_always" or (srv.mode == "cut_first" and len(srv.requests) == 1)
        if cut:
            body = body[: max(1, len(body) // 2)]
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(dl, "RETRY_BACKOFF_S", 0.0)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.payload, srv.mode, srv.requests = PAYLOAD, "ok", []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def _url(server) -> str:
    return f"{server.url}/files/ChestXRay2017.zip?download=1"


# ---------------------------------------------------------------------------------------------- download
def test_full_download_verifies_both_checksums(server, tmp_path):
    out = dl.download(_url(server), tmp_path / "a.zip", md5=MD5, sha256=SHA256.upper(),
                      expected_size=len(PAYLOAD), progress=False)
    assert out == tmp_path / "a.zip"
    assert out.read_bytes() == PAYLOAD
    assert not (tmp_path / "a.zip.part").exists()
    assert len(server.requests) == 1 and "Range" not in server.requests[0]
    assert server.requests[0]["User-Agent"].startswith("pneumoscope")


def test_complete_file_with_matching_checksum_is_not_downloaded_again(server, tmp_path):
    dest = tmp_path / "a.zip"
    dest.write_bytes(PAYLOAD)
    assert dl.download(_url(server), dest, md5=MD5, progress=False) == dest
    assert server.requests == []
    dest.write_bytes(b"stale")  # wrong checksum -> downloaded again and replaced
    dl.download(_url(server), dest, md5=MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD and len(server.requests) == 1


def test_corrupted_download_raises_and_leaves_nothing(server, tmp_path):
    server.mode = "corrupt"
    with pytest.raises(DownloadError) as e:
        dl.download(_url(server), tmp_path / "a.zip", md5=MD5, progress=False)
    msg = str(e.value)
    bad = hashlib.md5(PAYLOAD[:100] + bytes(b ^ 0xFF for b in PAYLOAD[100:200]) + PAYLOAD[200:]).hexdigest()
    assert _url(server) in msg and MD5 in msg and bad in msg
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_resumes_with_range(server, tmp_path, caplog):
    server.mode = "cut_first"
    with caplog.at_level(logging.WARNING, logger="pneumoscope.data.download"):
        out = dl.download(_url(server), tmp_path / "a.zip", md5=MD5, progress=False)
    assert out.read_bytes() == PAYLOAD
    assert hashlib.md5(out.read_bytes()).hexdigest() == MD5
    assert len(server.requests) == 2
    assert "Range" not in server.requests[0]
    assert server.requests[1]["Range"] == f"bytes={len(PAYLOAD) // 2}-"
    assert "retrying (1/3)" in caplog.text


def test_part_file_from_a_previous_run_is_resumed(server, tmp_path):
    (tmp_path / "a.zip.part").write_bytes(PAYLOAD[:1000])
    out = dl.download(_url(server), tmp_path / "a.zip", sha256=SHA256, progress=False)
    assert out.read_bytes() == PAYLOAD
    assert [r.get("Range") for r in server.requests] == ["bytes=1000-"]
    assert not (tmp_path / "a.zip.part").exists()


def test_complete_part_file_answered_416_is_finished(server, tmp_path):
    (tmp_path / "a.zip.part").write_bytes(PAYLOAD)
    out = dl.download(_url(server), tmp_path / "a.zip", md5=MD5, progress=False)
    assert out.read_bytes() == PAYLOAD
    assert [r.get("Range") for r in server.requests] == [f"bytes={len(PAYLOAD)}-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.mode = "ignore_range"
    (tmp_path / "a.zip.part").write_bytes(PAYLOAD[:1000])
    out = dl.download(_url(server), tmp_path / "a.zip", md5=MD5, progress=False)
    assert out.read_bytes() == PAYLOAD  # not the first 1000 bytes twice
    assert server.requests[0]["Range"] == "bytes=1000-"


def test_gives_up_after_retries_keeps_part_then_resumes(server, tmp_path):
    server.mode = "cut_always"
    with pytest.raises(DownloadError) as e:
        dl.download(_url(server), tmp_path / "a.zip", md5=MD5, retries=2, progress=False)
    assert "kept" in str(e.value) and "resume" in str(e.value)
    assert len(server.requests) == 3  # 1 + 2 retries
    part = tmp_path / "a.zip.part"
    kept = part.read_bytes()
    assert 0 < len(kept) < len(PAYLOAD) and PAYLOAD.startswith(kept)
    assert not (tmp_path / "a.zip").exists()
    server.mode, server.requests = "ok", []
    out = dl.download(_url(server), tmp_path / "a.zip", md5=MD5, progress=False)  # the re-run resumes
    assert out.read_bytes() == PAYLOAD
    assert server.requests[0]["Range"] == f"bytes={len(kept)}-"


def test_http_404_is_not_retried(server, tmp_path):
    server.mode = "404"
    with pytest.raises(DownloadError, match="HTTP 404"):
        dl.download(_url(server), tmp_path / "a.zip", progress=False)
    assert len(server.requests) == 1


def test_unreachable_host_raises_download_error(tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "RETRY_BACKOFF_S", 0.0)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # bind a port, then close it: nobody listens
    port = srv.server_address[1]
    srv.server_close()
    with pytest.raises(DownloadError, match="after 2 attempts.*Nothing was downloaded"):
        dl.download(f"http://127.0.0.1:{port}/x.zip", tmp_path / "x.zip", retries=1, timeout=5, progress=False)


def test_wrong_size_without_checksum_is_rejected(server, tmp_path):
    with pytest.raises(DownloadError, match=f"expected {len(PAYLOAD) + 1}"):
        dl.download(_url(server), tmp_path / "a.zip", expected_size=len(PAYLOAD) + 1, progress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- extract
def test_extract_zip_skips_macos_junk(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip(FILES, zipfile.ZIP_DEFLATED))
    out = dl.extract(archive, tmp_path / "x")
    assert out == (tmp_path / "x").resolve()
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == {k: v for k, v in FILES.items() if k.startswith("chest_xray/") and "DS_Store" not in k}


@pytest.mark.parametrize("evil", ["../evil.txt", "chest_xray/../../evil.txt", "/tmp/pneumoscope-evil.txt",
                                  "..\\evil.txt", "C:/evil.txt"])
def test_extract_zip_refuses_path_traversal(tmp_path, evil):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(_zip({"chest_xray/train/NORMAL/a.jpeg": b"ok", evil: b"pwned"}))
    with pytest.raises(DownloadError, match="path traversal"):
        dl.extract(archive, tmp_path / "x" / "y")
    assert list((tmp_path / "x" / "y").iterdir()) == []  # checked before anything is written
    assert not (tmp_path / "x" / "evil.txt").exists()
    assert not Path("/tmp/pneumoscope-evil.txt").exists()


def _tar(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(info)
    return path


def test_extract_tar_gz(tmp_path):
    archive = _tar(tmp_path / "a.tar.gz", {"d/NORMAL/a.jpeg": b"abc", "._junk": b"x"})
    out = dl.extract(archive, tmp_path / "x")
    assert (out / "d" / "NORMAL" / "a.jpeg").read_bytes() == b"abc"
    assert not (out / "._junk").exists()


def test_extract_tar_refuses_traversal_and_links(tmp_path):
    with pytest.raises(DownloadError, match="path traversal"):
        dl.extract(_tar(tmp_path / "a.tgz", {"../evil": b"x"}), tmp_path / "x")
    with pytest.raises(DownloadError, match="link"):
        dl.extract(_tar(tmp_path / "b.tgz", {"ok": b"x"}, symlink="d/passwd"), tmp_path / "y")
    assert not (tmp_path / "evil").exists() and list((tmp_path / "y").iterdir()) == []


def test_extract_refuses_a_non_archive(tmp_path):
    (tmp_path / "a.zip").write_bytes(b"<html>not found</html>")
    with pytest.raises(DownloadError, match="neither a zip nor a tar"):
        dl.extract(tmp_path / "a.zip", tmp_path / "x")


# ---------------------------------------------------------------------------------------------- datasets
def test_sources_table():
    assert set(dl.SOURCES) == {"kermany", "pneumoniamnist"}
    (kermany,) = dl.SOURCES["kermany"]["files"]
    assert kermany["filename"] == "ChestXRay2017.zip" and kermany["md5"] is None and kermany["sha256"] is None
    md5s = {f["filename"]: f["md5"] for f in dl.SOURCES["pneumoniamnist"]["files"]}
    assert md5s["pneumoniamnist.npz"] == "28209eda62fecd6e6a2d98b1501bb15f"
    assert set(md5s) == {"pneumoniamnist.npz", "pneumoniamnist_64.npz", "pneumoniamnist_128.npz",
                         "pneumoniamnist_224.npz"}
    urls = [f["url"] for f in dl.SOURCES["pneumoniamnist"]["files"]]
    assert all(u.startswith("https://zenodo.org/records/10519652/files/") for u in urls)


def test_with_base_replaces_the_host_only():
    url = "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1"
    assert dl._with_base(url, "http://127.0.0.1:8000") == \
        "http://127.0.0.1:8000/records/10519652/files/pneumoniamnist.npz?download=1"


def test_fetch_kermany_downloads_and_extracts(server, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pneumoscope.data.download"):
        root = dl.fetch_dataset("kermany", tmp_path, base_url=server.url, progress=False)
    assert root == (tmp_path / "chest_xray").resolve()
    assert (root / "train" / "PNEUMONIA" / "person1_bacteria_1.jpeg").read_bytes() == \
        FILES["chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg"]
    assert sorted(p.name for p in (root / "train").iterdir()) == ["NORMAL", "PNEUMONIA"]
    assert not (tmp_path / "__MACOSX").exists()
    assert (tmp_path / "ChestXRay2017.zip").read_bytes() == PAYLOAD
    assert [r["path"] for r in server.requests] == [  # the real path, on the local host
        "/public-files/datasets/rscbjbr9sj/files/f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded"]
    assert "NOT verified" in caplog.text and SHA256 in caplog.text  # the digest is logged to pin it


def test_fetch_kermany_with_wrong_sha256_fails(server, tmp_path):
    with pytest.raises(DownloadError, match="checksum mismatch"):
        dl.fetch_dataset("kermany", tmp_path, base_url=server.url, sha256="0" * 64, progress=False)
    assert not (tmp_path / "ChestXRay2017.zip").exists() and not (tmp_path / "chest_xray").exists()


def test_fetch_pneumoniamnist_one_file(server, tmp_path, monkeypatch):
    entry = dict(dl.SOURCES["pneumoniamnist"])
    entry["files"] = [dict(f, md5=MD5, size=len(PAYLOAD)) for f in entry["files"]]
    monkeypatch.setitem(dl.SOURCES, "pneumoniamnist", entry)
    out = dl.fetch_dataset("pneumoniamnist", tmp_path, base_url=server.url, files=["pneumoniamnist_64.npz"],
                           progress=False)
    assert out == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pneumoniamnist_64.npz"]
    assert server.requests and len(server.requests) == 1


def test_fetch_rejects_unknown_names(tmp_path):
    with pytest.raises(ConfigError, match="kermany"):
        dl.fetch_dataset("chexpert", tmp_path)
    with pytest.raises(ConfigError, match="pick one file"):
        dl.fetch_dataset("pneumoniamnist", tmp_path, sha256="0" * 64)


def test_cli_download(server, tmp_path, monkeypatch):
    entry = dict(dl.SOURCES["kermany"])
    entry["files"] = [dict(entry["files"][0], url=_url(server))]
    monkeypatch.setitem(dl.SOURCES, "kermany", entry)
    assert main(["download", "kermany", "--dest", str(tmp_path), "--sha256", SHA256]) == 0
    assert (tmp_path / "chest_xray" / "test" / "PNEUMONIA" / "person2_virus_3.jpeg").read_bytes() == \
        FILES["chest_xray/test/PNEUMONIA/person2_virus_3.jpeg"]
