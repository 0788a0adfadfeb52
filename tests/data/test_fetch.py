"""`kdas data fetch` against an HTTP server the test starts on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import MAX_NONBINARY, free_port, left_in, write_pair
from kdas.data import catalog
from kdas.data.fetch import FetchError, fetch
from kdas.data.importer import import_dataset

HTML = b"<!DOCTYPE html><html><body>Please log in to download</body></html>"


class ReleaseServer(BaseHTTPRequestHandler):
    """Serves `payload` with Range support. First, `corrupt_first` copies cut 10 bytes short
    (with a matching Content-Length), `html_first` HTML pages, `cut_first` halves sent
    without Content-Length (HTTP/1.0: the body ends when the connection closes)."""

    payload = b""
    corrupt_first = html_first = cut_first = 0
    requests: list[str] = []

    def do_GET(self):  # noqa: N802
        cls = type(self)
        cls.requests.append(self.headers.get("Range", ""))
        body = cls.payload
        if cls.html_first or cls.cut_first:
            html = bool(cls.html_first)
            cls.html_first, cls.cut_first = (cls.html_first - 1, cls.cut_first) if html else (0, cls.cut_first - 1)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(HTML if html else body[: len(body) // 2])
            return
        if cls.corrupt_first:
            cls.corrupt_first -= 1
            body = body[:-10]
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def release(tmp_path):
    src = tmp_path / "release" / "Kvasir-SEG"
    for i in range(3):
        write_pair(src / "images", src / "masks", f"k{i}", img_ext=".jpg", mask_ext=".jpg", seed=i)
    archive = tmp_path / "kvasir-seg.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in src.rglob("*"):
            zf.write(p, p.relative_to(tmp_path / "release"))
    ReleaseServer.payload = archive.read_bytes()
    ReleaseServer.corrupt_first = ReleaseServer.html_first = ReleaseServer.cut_first = 0
    ReleaseServer.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ReleaseServer)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()  # a quick shutdown
    yield f"http://127.0.0.1:{server.server_address[1]}/kvasir-seg.zip"
    server.shutdown()


def test_fetch_then_import(tmp_path, release):
    archive = fetch("kvasir-seg", tmp_path / "downloads", url=release)
    assert archive.read_bytes() == ReleaseServer.payload
    assert not list((tmp_path / "downloads").glob("*.part"))
    [out] = import_dataset(archive, tmp_path / "raw", name="kvasir-seg", track=False, max_nonbinary=MAX_NONBINARY)
    assert len(list((out / "images").iterdir())) == 3


def test_interrupted_download_resumes_with_a_range_request(tmp_path, release):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    half = len(ReleaseServer.payload) // 2
    (downloads / "kvasir-seg.zip.part").write_bytes(ReleaseServer.payload[:half])
    archive = fetch("kvasir-seg", downloads, url=release)
    assert archive.read_bytes() == ReleaseServer.payload
    assert ReleaseServer.requests == [f"bytes={half}-"]


def test_bad_download_is_retried_clean_then_refused(tmp_path, release, monkeypatch):
    good = hashlib.sha256(ReleaseServer.payload).hexdigest()
    monkeypatch.setitem(catalog.CATALOG, "kvasir-seg", dataclasses.replace(catalog.CATALOG["kvasir-seg"], sha256=good))
    ReleaseServer.corrupt_first = 1
    archive = fetch("kvasir-seg", tmp_path / "d1", url=release)
    assert archive.read_bytes() == ReleaseServer.payload and ReleaseServer.requests == ["", ""]

    ReleaseServer.corrupt_first = 2
    with pytest.raises(FetchError, match="failed its check twice.*sha256"):
        fetch("kvasir-seg", tmp_path / "d2", url=release)
    assert not list((tmp_path / "d2").iterdir())  # nothing half-written


def test_unknown_or_uncatalogued_release(tmp_path):
    with pytest.raises(FetchError, match="unknown dataset 'nope'"):
        fetch("nope", tmp_path)
    with pytest.raises(FetchError, match="kdas data import PATH --name cvc-colondb"):
        fetch("cvc-colondb", tmp_path)


def test_unreachable_server_says_to_resume(tmp_path):
    with pytest.raises(FetchError, match="run the command again to resume"):
        fetch("kvasir-seg", tmp_path, url="http://127.0.0.1:9/kvasir-seg.zip", timeout=2)


@pytest.mark.parametrize("fault", ["html_first", "cut_first"])
def test_a_download_that_is_no_zip_is_never_kept(tmp_path, release, fault):
    setattr(ReleaseServer, fault, 1)  # one bad answer, then the release: retried from scratch
    archive = fetch("kvasir-seg", tmp_path / "d1", url=release)
    assert archive.read_bytes() == ReleaseServer.payload and ReleaseServer.requests == ["", ""]

    setattr(ReleaseServer, fault, 2)
    with pytest.raises(FetchError, match=r"failed its check twice \(not a readable zip archive .*it starts with b'"):
        fetch("kvasir-seg", tmp_path / "d2", url=release)
    assert not list((tmp_path / "d2").iterdir())


def test_another_zip_is_refused_by_the_catalogued_hash(tmp_path, release, monkeypatch):
    good = hashlib.sha256(ReleaseServer.payload).hexdigest()
    monkeypatch.setitem(catalog.CATALOG, "kvasir-seg", dataclasses.replace(catalog.CATALOG["kvasir-seg"], sha256=good))
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("readme.txt", "another release")
    ReleaseServer.payload = other.read_bytes()
    with pytest.raises(FetchError, match=f"failed its check twice \\(sha256 .*, expected {good}"):
        fetch("kvasir-seg", tmp_path / "d", url=release)
    assert not list((tmp_path / "d").iterdir())


@pytest.mark.parametrize("kept", ["html", "truncated", "bad-crc"])
def test_a_corrupt_kept_archive_is_fetched_again(tmp_path, release, kept):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    payload = ReleaseServer.payload
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        first = zf.infolist()[-1]
    at = first.header_offset + 30 + len(first.filename) + len(first.extra) + 10  # inside the entry's data
    bad = {"html": HTML, "truncated": payload[:-100],
           "bad-crc": payload[:at] + bytes(b ^ 0xFF for b in payload[at : at + 8]) + payload[at + 8 :]}[kept]
    (downloads / "kvasir-seg.zip").write_bytes(bad)
    archive = fetch("kvasir-seg", downloads, url=release)
    assert archive.read_bytes() == payload and ReleaseServer.requests == [""]
    fetch("kvasir-seg", downloads, url=release)  # now good: kept, not downloaded again
    assert ReleaseServer.requests == [""]


def test_a_fetch_address_ending_in_dotdot_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    port = free_port()  # nobody listens: the download fails at once, named
    with pytest.raises(FetchError, match=rf"http://127.0.0.1:{port}/x/..: download failed"):
        fetch("kvasir-seg", tmp_path / "downloads", url=f"http://127.0.0.1:{port}/x/..", timeout=5)
    assert left_in(tmp_path) == ["downloads"] and left_in(tmp_path / "downloads") == []
