"""Fetch the public chest X-ray datasets: resumable HTTP download, checksum check, safe extraction.

    pneumoscope download kermany --dest data/          # ChestXRay2017.zip from Mendeley Data, extracted
    pneumoscope download pneumoniamnist --dest data/   # the four PneumoniaMNIST .npz files from Zenodo

Standard library HTTP only (``urllib.request``). A download streams into ``FILE.part``; an interrupted one is
resumed with an HTTP Range request, the finished file is checked and only then renamed into place.
"""
from __future__ import annotations

import http.client
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from pneumoscope.data.digest import file_digest
from pneumoscope.errors import ConfigError, DatasetLayoutError, DownloadError
from pneumoscope.progress import bar as progress_bar

log = logging.getLogger(__name__)

# One table of sources (MedMNIST style). "files": what to download; "extract": unpack the archives;
# "root": a folder that marks the dataset root after extraction (None: the destination itself).
# The PneumoniaMNIST md5s and sizes are those of medmnist's INFO table (v3, Zenodo record 10519652):
# check them against `medmnist.INFO["pneumoniamnist"]` on first real use.
_ZENODO = "https://zenodo.org/records/10519652/files"
SOURCES: dict[str, dict] = {
    "kermany": {
        "description": "Kermany et al. 2018 pediatric chest X-rays, Mendeley Data rscbjbr9sj (CC BY 4.0)",
        "files": [{
            "url": "https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/"
                   "f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded",
            "filename": "ChestXRay2017.zip",
            "size": None,     # about 1.2 GB; not pinned
            "md5": None,      # unknown: not verified unless --sha256 is given
            "sha256": None,
        }],
        "extract": True,
        "root": "chest_xray",  # the folder holding train/ and test/
    },
    "pneumoniamnist": {
        "description": "MedMNIST v2/v3 PneumoniaMNIST, Zenodo record 10519652 (CC BY 4.0)",
        "files": [
            {"url": f"{_ZENODO}/pneumoniamnist.npz?download=1", "filename": "pneumoniamnist.npz",
             "size": 4_170_669, "md5": "28209eda62fecd6e6a2d98b1501bb15f", "sha256": None},
            {"url": f"{_ZENODO}/pneumoniamnist_64.npz?download=1", "filename": "pneumoniamnist_64.npz",
             "size": 20_606_998, "md5": "8f4eceb4ccffa70c672198ea285246c6", "sha256": None},
            {"url": f"{_ZENODO}/pneumoniamnist_128.npz?download=1", "filename": "pneumoniamnist_128.npz",
             "size": 75_506_212, "md5": "05b46931834c231683c68f40c47b2971", "sha256": None},
            {"url": f"{_ZENODO}/pneumoniamnist_224.npz?download=1", "filename": "pneumoniamnist_224.npz",
             "size": 214_384_716, "md5": "d6a3c71de1b945ea11211b03746c1fe1", "sha256": None},
        ],
        "extract": False,
        "root": None,
    },
}

USER_AGENT = "pneumoscope-downloader/0.1 (+urllib)"
CHUNK_SIZE = 1 << 20
RETRY_BACKOFF_S = 2.0  # sleep RETRY_BACKOFF_S * attempt between retries
RETRY_HTTP_STATUS = {408, 429, 500, 502, 503, 504}
JUNK_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db"}


# ---------------------------------------------------------------------------------------------- download
def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/200' -> (100, 200); 'bytes */200' -> (None, 200); unknown parts are None."""
    if not value or not value.strip().lower().startswith("bytes"):
        return None, None
    spec = value.strip()[5:].strip()
    rng, _, total = spec.partition("/")
    start = rng.partition("-")[0]
    return (int(start) if start.isdigit() else None), (int(total) if total.isdigit() else None)


def _fetch_into(url: str, part: Path, *, timeout: float, progress: bool, expected_size: int | None) -> None:
    """One attempt: append the rest of ``url`` to ``part`` (or restart it). Raises OSError/HTTPException if cut."""

    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        _, total = _parse_content_range(e.headers.get("Content-Range"))
        e.close()
        if total == offset:  # the .part is already complete
            return
        log.warning("%s: the server cannot resume at byte %d (HTTP 416); restarting from zero", url, offset)
        part.unlink()
        return _fetch_into(url, part, timeout=timeout, progress=progress, expected_size=expected_size)

    with response:
        status = response.status
        if offset and status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise ConnectionError(f"asked to resume at byte {offset}, the server answered from byte {start}; "
                                      "restarting from zero")
            mode = "ab"
            log.info("%s: resuming at byte %d", url, offset)
        else:
            if offset:
                log.info("%s: the server ignored the Range request (HTTP %d); restarting from zero", url, status)
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        received = offset
        with open(part, mode) as f, progress_bar(total=total or expected_size, initial=offset, unit="B", unit_scale=True,
                                                 unit_divisor=1024, desc=part.name[:-5], disable=not progress) as bar:
            while chunk := response.read(CHUNK_SIZE):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received < total:  # http.client returns b"" (no error) when the peer closes early
        raise ConnectionError(f"the connection closed after {received} of {total} bytes")


def _verify(part: Path, url: str, *, md5: str | None, sha256: str | None, expected_size: int | None) -> None:
    """Check the finished ``.part``; on a mismatch delete it and raise DownloadError."""
    size = part.stat().st_size
    checks = [(a, v.lower()) for a, v in (("md5", md5), ("sha256", sha256)) if v]
    if expected_size is not None and size != expected_size:
        if not checks:
            part.unlink()
            raise DownloadError(f"{url}: downloaded {size} bytes, expected {expected_size}; "
                                f"the partial file was deleted, run again to download it afresh")
        log.warning("%s: %d bytes, the table says %d; the checksum decides", url, size, expected_size)
    for algorithm, expected in checks:
        actual = file_digest(part, algorithm)
        if actual != expected:
            part.unlink()
            raise DownloadError(
                f"checksum mismatch for {url}: expected {algorithm} {expected}, got {actual}. The download was "
                f"deleted; run again. If it fails again the file at the source changed: check the expected value."
            )
    if not checks:
        digest = file_digest(part, "sha256")
        log.warning("%s: checksum NOT verified (none is known); its sha256 is %s, pass --sha256 %s to pin it",
                    url, digest, digest)


def download(url: str, dest_file: str | Path, *, md5: str | None = None, sha256: str | None = None,
             expected_size: int | None = None, retries: int = 3, timeout: float = 60,
             progress: bool = True) -> Path:
    """Download ``url`` to ``dest_file`` with resume, retries and checksum check; returns the final path.

    Streams into ``dest_file.part`` (resumed with ``Range: bytes=N-`` when it exists), verifies md5/sha256 and
    size when given, then renames it into place. A complete ``dest_file`` with a matching checksum is kept.
    """
    dest = Path(dest_file)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)

    if dest.is_file():
        if md5 or sha256:
            if all(file_digest(dest, a) == v.lower() for a, v in (("md5", md5), ("sha256", sha256)) if v):
                log.info("%s is already downloaded and its checksum matches", dest)
                return dest
            log.warning("%s exists but its checksum does not match: downloading it again", dest)
        elif expected_size is None or dest.stat().st_size == expected_size:
            log.info("%s is already downloaded (no checksum to verify it)", dest)
            return dest

    failures = 0
    while True:
        try:
            _fetch_into(url, part, timeout=timeout, progress=progress, expected_size=expected_size)
            break
        except urllib.error.HTTPError as e:
            if e.code not in RETRY_HTTP_STATUS:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; check the URL (SOURCES in "
                                    f"pneumoscope/data/download.py) or download it by hand to {dest}") from e
            error: Exception = e
        except (http.client.HTTPException, OSError) as e:  # URLError, timeouts, resets, connection closed early
            error = e
        failures += 1
        have = part.stat().st_size if part.exists() else 0
        if failures > retries:
            kept = (f"The partial file {part} ({have} bytes) is kept: run the same command again to resume."
                    if have else "Nothing was downloaded: check the network (or a proxy) and run it again.")
            raise DownloadError(f"{url}: download failed after {failures} attempts ({error}). {kept}") from error
        log.warning("%s: %s; retrying (%d/%d) from byte %d", url, error, failures, retries, have)
        time.sleep(RETRY_BACKOFF_S * failures)

    _verify(part, url, md5=md5, sha256=sha256, expected_size=expected_size)
    os.replace(part, dest)
    log.info("downloaded %s (%d bytes)", dest, dest.stat().st_size)
    return dest


# ---------------------------------------------------------------------------------------------- extract
def _member_path(name: str, archive: Path) -> PurePosixPath | None:
    """Safe relative path of an archive member, None for junk (macOS resource forks); raises on traversal."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if name.startswith(("/", "\\")) or (parts and len(parts[0]) >= 2 and parts[0][1] == ":") or ".." in parts:
        raise DownloadError(f"{archive}: member {name!r} has an absolute path or '..' (path traversal); "
                            "refusing to extract this archive, it is not the expected dataset")
    if not parts or any(p in JUNK_NAMES for p in parts) or parts[-1].startswith("._"):
        return None
    return PurePosixPath(*parts)


def _target(dest: Path, rel: PurePosixPath, archive: Path, name: str) -> Path:
    target = (dest / rel).resolve()
    if not target.is_relative_to(dest):  # belt and braces (e.g. a symlinked folder already in dest)
        raise DownloadError(f"{archive}: member {name!r} would land outside {dest}; refusing to extract")
    return target


def extract(archive: str | Path, dest_dir: str | Path) -> Path:
    """Unpack a zip or tar(.gz) archive into ``dest_dir`` and return it.

    Every member is checked before anything is written: absolute paths, '..' and links are refused;
    ``__MACOSX``, ``._*`` and ``.DS_Store`` are skipped.
    """
    archive, dest = Path(archive), Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    n = 0
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = [(i, _member_path(i.filename, archive)) for i in zf.infolist()]
            members = [(i, _target(dest, rel, archive, i.filename)) for i, rel in members if rel is not None]
            for info, target in members:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK_SIZE)
                n += 1
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = []
            for m in tf.getmembers():
                rel = _member_path(m.name, archive)
                if rel is None:
                    continue
                if not (m.isfile() or m.isdir()):
                    raise DownloadError(f"{archive}: member {m.name!r} is a link or special file; "
                                        "refusing to extract this archive")
                members.append((m, _target(dest, rel, archive, m.name)))
            for m, target in members:
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tf.extractfile(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK_SIZE)
                n += 1
    else:
        raise DownloadError(f"{archive} is neither a zip nor a tar archive; delete it and download it again")
    log.info("extracted %d files from %s into %s", n, archive.name, dest)
    return dest


# ---------------------------------------------------------------------------------------------- datasets
def _with_base(url: str, base_url: str) -> str:
    """Replace scheme and host of ``url`` by those of ``base_url`` (path and query kept)."""
    u, b = urllib.parse.urlsplit(url), urllib.parse.urlsplit(base_url)
    return urllib.parse.urlunsplit((b.scheme, b.netloc, u.path, u.query, ""))


def _find_root(dest: Path, name: str) -> Path:
    """The extracted dataset folder: ``dest/name`` or, if the archive nests it, the shallowest ``*/name``."""
    found = [p for p in dest.glob(f"**/{name}") if p.is_dir() and "__MACOSX" not in p.parts]
    if not found:
        top = sorted(p.name for p in dest.iterdir())
        raise DatasetLayoutError(f"no folder '{name}' in {dest} after extraction (it holds {top}); "
                                 "the archive layout changed: point --data at the folder holding train/")
    return min(found, key=lambda p: (len(p.parts), str(p)))


def fetch_dataset(name: str, dest: str | Path, *, base_url: str | None = None, sha256: str | None = None,
                  files: list[str] | None = None, progress: bool = True) -> Path:
    """Download, verify and (for archives) extract one entry of SOURCES into ``dest``; returns the data root.

    ``base_url`` replaces the host of every URL (tests, mirrors). ``files`` picks some file names of the
    entry (default: all). ``sha256`` pins the archive when the entry has exactly one file.
    """
    if name not in SOURCES:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {sorted(SOURCES)}")
    entry, dest = SOURCES[name], Path(dest)
    chosen = [f for f in entry["files"] if files is None or f["filename"] in files]
    if not chosen:
        raise ConfigError(f"{name}: none of {files} is a file of this dataset; "
                          f"choose from {[f['filename'] for f in entry['files']]}")
    if sha256 and len(chosen) != 1:
        raise ConfigError(f"--sha256 pins one file but {name} has {len(chosen)}: pick one file")
    for f in chosen:
        url = _with_base(f["url"], base_url) if base_url else f["url"]
        path = download(url, dest / f["filename"], md5=f.get("md5"), sha256=sha256 or f.get("sha256"),
                        expected_size=f.get("size"), progress=progress)
        if entry["extract"]:
            extract(path, dest)
    return _find_root(dest.resolve(), entry["root"]) if entry.get("root") else dest
