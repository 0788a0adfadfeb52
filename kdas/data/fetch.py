"""`kdas data fetch NAME`: download a catalogued public release, then import it.

Downloads go to data/downloads/<file>.part and are renamed only once complete and
checked: size from the catalogue or the server's Content-Length, sha256 when the
catalogue has it, and always a zip whose every entry reads back (an HTML error page, or a
body cut short without Content-Length, fails here). An interrupted download resumes with
an HTTP Range request; a download that fails its check is deleted and tried once more from
scratch. A kept archive is checked again before it is reused, and fetched again if bad.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from pathlib import Path
from urllib.parse import urlparse

import requests
from tqdm import tqdm

from kdas.data.catalog import CATALOG, CatalogEntry
from kdas.io import file_sha256

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class FetchError(RuntimeError):
    pass


def _download(url: str, part: Path, timeout: float) -> int | None:
    """Append the rest of `url` to `part`; returns the expected total size if known."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, stream=True, headers=headers, timeout=timeout) as resp:
        if resp.status_code == 416:  # nothing left to fetch: the part file is complete
            return have
        resp.raise_for_status()
        if have and resp.status_code != 206:  # server ignored the range: start over
            log.info("%s: server does not resume; downloading from the start", url)
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with part.open("ab" if have else "wb") as fh, tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name.removesuffix(".part"), disable=None) as bar:
            for block in resp.iter_content(CHUNK):
                fh.write(block)
                bar.update(len(block))
    return total


def _check(path: Path, entry: CatalogEntry, total: int | None) -> str | None:
    """What is wrong with a finished download, or None."""
    size = path.stat().st_size
    expected = entry.size or total
    if expected is not None and size != expected:
        return f"size {size} bytes, expected {expected}"
    if entry.sha256 and (digest := file_sha256(path)) != entry.sha256:
        return f"sha256 {digest}, expected {entry.sha256}"
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()  # reads every entry back against its CRC
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        with path.open("rb") as fh:
            return f"not a readable zip archive ({exc}; it starts with {fh.read(40)!r})"
    return f"corrupt zip entry '{bad}'" if bad else None


def fetch(name: str, downloads: str | Path = "data/downloads", *, url: str | None = None, timeout: float = 60.0) -> Path:
    """Download the release of catalogued dataset `name` (or from `url`, e.g. a mirror); returns the archive's path."""
    if name not in CATALOG:
        raise FetchError(f"unknown dataset '{name}'; catalogued: {', '.join(CATALOG)}")
    entry = CATALOG[name]
    url = url or entry.url
    if not url:
        raise FetchError(f"{name}: no public download address is catalogued; download it yourself and run `kdas data import PATH --name {name}`")
    downloads = Path(downloads)
    downloads.mkdir(parents=True, exist_ok=True)
    file_name = Path(urlparse(url).path).name
    target = downloads / (file_name if file_name not in ("", "..") else f"{name}.zip")  # '..' would be downloads' parent
    if target.exists():
        if (problem := _check(target, entry, None)) is None:
            log.info("%s already downloaded", target)
            return target
        log.warning("%s: %s; fetching it again", target, problem)
        target.unlink()
    part = target.with_name(target.name + ".part")
    for attempt in (1, 2):
        try:
            total = _download(url, part, timeout)
        except requests.RequestException as exc:
            raise FetchError(f"{url}: download failed ({exc}); run the command again to resume") from exc
        problem = _check(part, entry, total)
        if problem is None:
            os.replace(part, target)
            return target
        part.unlink()
        log.warning("%s: %s; %s", url, problem, "retrying from scratch" if attempt == 1 else "giving up")
    raise FetchError(f"{url}: the download failed its check twice ({problem}); the server's file may have changed")
