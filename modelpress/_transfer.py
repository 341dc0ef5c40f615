"""Moving bytes: folder uploads (streaming sha256, bounded parallel part PUTs, resume) and verified
downloads (HTTP Range resume, sha256 check, nothing at the destination unless every file is right).

Memory stays flat whatever the model's size: files are read in ``CHUNK`` pieces, at most ``concurrency``
PUTs or GETs run at once, and each holds one piece at a time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import httpx
from tqdm.auto import tqdm

from modelpress._errors import APIConnectionError, IntegrityError, error_from_response
from modelpress._http import RETRY_STATUSES, HTTPClient, Retries
from modelpress.schemas import Artifact, ArtifactList, FileTarget, UploadProgress

CHUNK = 1024 * 1024
Item = TypeVar("Item")


@dataclass(frozen=True)
class LocalFile:
    """A file to upload: its path inside the upload, where it is on disk, its size and sha256."""

    path: str
    source: Path
    size: int
    sha256: str


def scan(root: Path) -> list[tuple[str, Path]]:
    """``(upload path, file)`` for ``root`` (one file) or every file under it, sorted. Hidden files and folders
    (``.git``, ``.cache``) are skipped: the server refuses such paths and a model never needs them."""
    if root.is_file():
        return [(root.name, root)]
    if not root.is_dir():
        raise FileNotFoundError(f"no such file or folder: {root}")
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        found.append((rel.as_posix(), path))
    if not found:
        raise ValueError(f"{root} holds no files to upload")
    return found


def sha256_file(path: Path, on_bytes: Callable[[int], object] | None = None) -> str:
    """sha256 of a file read in ``CHUNK`` pieces (never whole in memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()


def hash_files(root: Path, progress: bool = False) -> list[LocalFile]:
    """Scan ``root`` and hash every file, with one progress bar for the lot."""
    entries = scan(root)
    sizes = [source.stat().st_size for _, source in entries]
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="hashing", disable=not progress) as bar:
        return [
            LocalFile(path, source, size, sha256_file(source, bar.update))
            for (path, source), size in zip(entries, sizes, strict=True)
        ]


@dataclass
class _Piece:
    """One PUT: a whole file, or one part of a multipart file."""

    file: LocalFile
    offset: int
    length: int
    part_number: int | None  # None: a single-PUT file


def run_all(fn: Callable[[Item], None], items: list[Item], concurrency: int, thread_name: str) -> None:
    """``fn`` on every item, ``concurrency`` at a time; the first failure cancels what has not started and is
    raised."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=thread_name) as pool:
        futures: list[Future[None]] = [pool.submit(fn, item) for item in items]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in done:
            if future.exception() is not None:
                raise future.exception()  # type: ignore[misc]


class SafeBar:
    """A tqdm bar that several threads update (tqdm's own counter is not atomic)."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.lock = threading.Lock()

    def update(self, n: int) -> None:
        with self.lock:
            self.bar.update(n)


def _read_range(source: Path, offset: int, length: int, sent: Callable[[int], None]) -> Iterator[bytes]:
    with source.open("rb") as handle:
        handle.seek(offset)
        left = length
        while left > 0:
            chunk = handle.read(min(CHUNK, left))
            if not chunk:
                raise OSError(f"{source} shrank while it was being uploaded")
            left -= len(chunk)
            sent(len(chunk))
            yield chunk


def plan_pieces(files: list[LocalFile], targets: list[FileTarget], received: UploadProgress | None) -> list[_Piece]:
    """The PUTs still to do: every file or part that storage does not already hold whole."""
    by_path = {f.path: f for f in files}
    have = {f.path: f for f in received.files} if received is not None else {}
    pieces: list[_Piece] = []
    for target in targets:
        local = by_path[target.path]
        got = have.get(target.path)
        if got is not None and got.received:
            continue
        if target.parts is None:
            pieces.append(_Piece(local, 0, local.size, None))
            continue
        part_size = int(target.part_size or 0)
        stored = {p.part_number: p.size for p in (got.parts or [])} if got is not None else {}
        for part in target.parts:
            offset = (part.part_number - 1) * part_size
            length = min(part_size, local.size - offset)
            if stored.get(part.part_number) != length:
                pieces.append(_Piece(local, offset, length, part.part_number))
    return pieces


class PieceUploader:
    """PUTs pieces to presigned URLs from a bounded pool, retrying each with backoff; fresh URLs on a 403
    (expired) from ``renew``. Progress counts bytes that reached the server; a failed try is taken back."""

    def __init__(
        self,
        http: HTTPClient,
        targets: list[FileTarget],
        renew: Callable[[], list[FileTarget]],
        concurrency: int,
        bar: Any,
    ) -> None:
        self.http, self.renew_fn, self.concurrency, self.bar = http, renew, concurrency, bar
        self.lock = threading.Lock()
        self.generation = 0
        self.urls = self._index(targets)

    @staticmethod
    def _index(targets: list[FileTarget]) -> dict[tuple[str, int | None], str]:
        urls: dict[tuple[str, int | None], str] = {}
        for target in targets:
            if target.url is not None:
                urls[(target.path, None)] = target.url
            for part in target.parts or []:
                urls[(target.path, part.part_number)] = part.url
        return urls

    def _renew(self, seen_generation: int) -> None:
        with self.lock:
            if self.generation == seen_generation:  # one renewal for all the pieces that hit the expiry
                self.urls = self._index(self.renew_fn())
                self.generation += 1

    def put(self, piece: _Piece) -> None:
        retries, renewed = Retries(self.http.retry), False
        while True:
            with self.lock:
                url, generation = self.urls[(piece.file.path, piece.part_number)], self.generation
            sent = 0

            def count(n: int) -> None:
                nonlocal sent
                sent += n
                self.bar.update(n)

            body = _read_range(piece.file.source, piece.offset, piece.length, count)
            try:
                # Presigned: no Authorization header, the URL carries the permission. Content-Length keeps the
                # body streamed from disk and lets S3 accept it (it refuses chunked PUTs).
                response = self.http.client.put(url, content=body, headers={"Content-Length": str(piece.length)})
            except httpx.TransportError as exc:
                self.bar.update(-sent)
                if not retries.again():
                    raise APIConnectionError(f"PUT {piece.file.path} part {piece.part_number}: {exc}") from exc
                continue
            if response.is_success:
                return
            self.bar.update(-sent)
            if response.status_code == 403 and not renewed:  # the URL expired: fresh ones, same piece
                self._renew(generation)
                renewed = True
                continue
            if response.status_code in RETRY_STATUSES and retries.again(response):
                continue
            raise error_from_response(response)

    def run(self, pieces: list[_Piece]) -> None:
        """PUT every piece, ``concurrency`` at a time; the first failure stops the rest and is raised."""
        run_all(self.put, pieces, self.concurrency, "modelpress-put")


# ---------------------------------------------------------------- downloads


def _safe_join(root: Path, path: str) -> Path:
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or not path:
        raise IntegrityError(path, "a relative path", "an unsafe path")
    return root.joinpath(*pure.parts)


def _hash_existing(path: Path) -> tuple[Any, int]:
    digest = hashlib.sha256()
    size = 0
    if path.exists():
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
    return digest, size


class Downloader:
    """Downloads a job's artifacts into a staging folder next to ``dest``, resuming cut transfers with
    ``Range``, checks every size and sha256, and only then moves the files into ``dest``."""

    def __init__(
        self, http: HTTPClient, refresh: Callable[[], ArtifactList], concurrency: int = 4, progress: bool = False
    ) -> None:
        self.http, self.refresh, self.concurrency, self.progress = http, refresh, concurrency, progress
        self.lock = threading.Lock()
        self.urls: dict[str, str] = {}

    def _fetch(self, artifact: Artifact, staged: Path, bar: Any) -> None:
        staged.parent.mkdir(parents=True, exist_ok=True)
        digest, have = _hash_existing(staged)  # a previous, cut try: continue after its bytes
        if have > artifact.size:
            staged.unlink()
            digest, have = _hash_existing(staged)
        bar.update(have)
        retries, renewed = Retries(self.http.retry), False
        while have < artifact.size or (have == 0 and not staged.exists()):
            with self.lock:
                url = self.urls[artifact.path]
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with self.http.client.stream("GET", url, headers=headers) as response:
                    if response.status_code == 403 and not renewed:  # expired URL: fresh ones
                        with self.lock:
                            self.urls = {a.path: a.url for a in self.refresh().data}
                        renewed = True
                        continue
                    if response.status_code in RETRY_STATUSES and retries.again(response):
                        continue
                    if not response.is_success:
                        response.read()
                        raise error_from_response(response)
                    if response.status_code != 206 and have:  # storage ignored the Range: start over
                        bar.update(-have)
                        digest, have = hashlib.sha256(), 0
                    with staged.open("ab" if have else "wb") as out:
                        for chunk in response.iter_bytes():  # as it arrives: a cut keeps every byte that came
                            out.write(chunk)
                            digest.update(chunk)
                            have += len(chunk)
                            bar.update(len(chunk))
                    if have == 0:
                        break  # an empty file
                    # The body ended early without an error: count it as one.
                    if have < artifact.size and not retries.again():
                        raise APIConnectionError(f"GET {artifact.path}: body ended after {have} bytes")
            except httpx.TransportError as exc:
                if not retries.again():
                    raise APIConnectionError(f"GET {artifact.path}: {exc}") from exc
        actual = digest.hexdigest()
        if have != artifact.size or actual != artifact.sha256:
            staged.unlink(missing_ok=True)  # bad bytes are never resumed from
            raise IntegrityError(artifact.path, artifact.sha256, actual if have == artifact.size else f"size {have}")

    def download(self, listing: ArtifactList, dest: Path) -> list[Path]:
        """Fetch and verify every artifact, then move them into ``dest``; return their final paths."""
        manifest = [a for a in listing.data if a.path == "manifest.json"]
        if manifest and manifest[0].sha256 != listing.manifest_sha256:
            raise IntegrityError("manifest.json", listing.manifest_sha256, manifest[0].sha256)
        dest = dest.resolve()
        staging = dest.parent / f".{dest.name}.modelpress-partial"
        self.urls = {a.path: a.url for a in listing.data}
        targets = [(a, _safe_join(staging, a.path), _safe_join(dest, a.path)) for a in listing.data]
        total = sum(a.size for a in listing.data)
        with tqdm(total=total, unit="B", unit_scale=True, desc="download", disable=not self.progress) as bar:
            safe = SafeBar(bar)
            run_all(lambda target: self._fetch(target[0], target[1], safe), targets, self.concurrency, "modelpress-get")
        final = []
        for _, staged, target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
            final.append(target)
        shutil.rmtree(staging, ignore_errors=True)
        return final
