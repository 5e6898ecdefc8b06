"""A ``POST /runs`` request into a :class:`RunRequest`: which files, which options.

The files are either a dataset (the data directory or a sub-directory of it, never a
path outside it) or a multipart upload, streamed to a temporary directory chunk by chunk
under a size limit and a deadline. The request hash behind ``Idempotency-Key`` covers
the options and the dataset name, or the uploaded bytes (hashed while streaming).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiofiles
from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from aiohttp.http_exceptions import InvalidHeader

from ..archive import ArchiveLimits, ArchiveRejected, extract_inputs
from ..etl import RunOptions
from ..inputs import DELIMITERS, check_encoding
from ..jobs import RunRequest
from ..pipeline.csvfile import SPECS
from ..scratch import ScratchDir
from ..settings import Settings
from ..webhooks import check_callback
from .errors import Problem

# Upload part name -> the file name the pipeline looks for.
UPLOAD_FILES = {spec.kind: spec.filenames[0] for spec in SPECS}
OPTION_FIELDS = ("on_error", "max_errors", "dry_run", "encoding", "delimiter", "callback_url")
ARCHIVE_PART = "archive"  # a zip of the three files, instead of three parts
ARCHIVE_FILE = "upload.zip"
JSON_FIELDS = ("dataset", *OPTION_FIELDS)
ON_ERROR = ("abort", "skip")
CHUNK_BYTES = 256 * 1024
MAX_FIELD_BYTES = 1024
MAX_KEY_LENGTH = 255
BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


async def read_run_request(request: web.Request, settings: Settings) -> RunRequest:
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if encoding not in ("", "identity"):
        # Decompressing would let a small body inflate past every limit.
        raise Problem(415, f"Content-Encoding {encoding!r} is not accepted; send it uncompressed")
    key = idempotency_key(request)
    try:
        async with asyncio.timeout(settings.upload_timeout):
            if request.body_exists and request.content_type == "multipart/form-data":
                if "dataset" in request.query:
                    raise Problem(400, "send either a dataset or an upload, not both")
                return await _upload(request, settings, key)
            fields = await _json_fields(request)
    except TimeoutError:
        raise Problem(
            408, f"the request body did not arrive within {settings.upload_timeout:g} s"
        ) from None
    options = parse_options({**request.query, **fields}, settings.webhook_allow)
    dataset = fields.get("dataset")
    if dataset is None:
        dataset = request.query.get("dataset", "")
    return await dataset_request(settings, dataset, options, key)


async def dataset_request(
    settings: Settings, dataset: object, options: RunOptions, key: str | None = None
) -> RunRequest:
    """A run of a dataset under the data directory (the API's JSON body, the pages' form)."""
    if not isinstance(dataset, str):
        raise Problem(422, "dataset must be a string")
    path, name = await asyncio.to_thread(resolve_dataset, settings.data_dir, dataset)
    return RunRequest(
        source_dir=path,
        source={"kind": "dataset", "name": name},
        options=options,
        idempotency_key=key,
        request_hash=_digest({"dataset": name, "options": options.to_json()}),
    )


def discard(run_request: RunRequest) -> None:
    """Remove what the request brought along (an upload), when no run will own it."""
    if run_request.cleanup is not None:
        run_request.cleanup()


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 0 < len(key) <= MAX_KEY_LENGTH or not key.isprintable() or not key.isascii():
        raise Problem(
            400, f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters"
        )
    return key


def parse_options(raw: Mapping[str, Any], allow: tuple[str, ...] = ()) -> RunOptions:
    """Options from JSON fields, query parameters or form parts (the latter two as text).

    ``allow``: the hosts a ``callback_url`` may name (ETL_WEBHOOK_ALLOW).
    """
    defaults = RunOptions()
    on_error = raw.get("on_error", defaults.on_error)
    if on_error not in ON_ERROR:
        raise Problem(422, f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    max_errors = raw.get("max_errors", defaults.max_errors)
    if isinstance(max_errors, str) and max_errors.strip().isdigit():
        max_errors = int(max_errors)
    if isinstance(max_errors, bool) or not isinstance(max_errors, int) or max_errors < 0:
        raise Problem(422, f"max_errors must be an integer >= 0, got {max_errors!r}")
    dry_run = raw.get("dry_run", defaults.dry_run)
    if isinstance(dry_run, str) and dry_run.strip().lower() in BOOLEANS:
        dry_run = BOOLEANS[dry_run.strip().lower()]
    if not isinstance(dry_run, bool):
        raise Problem(422, f"dry_run must be true or false, got {dry_run!r}")
    encoding = raw.get("encoding", defaults.encoding)
    try:
        encoding = check_encoding(encoding)
    except ValueError as exc:
        raise Problem(422, f"encoding: {exc}") from None
    delimiter = raw.get("delimiter", defaults.delimiter)
    if delimiter not in DELIMITERS:
        raise Problem(422, f"delimiter must be one of {', '.join(DELIMITERS)}, got {delimiter!r}")
    callback_url = raw.get("callback_url")
    if callback_url is not None:
        if not isinstance(callback_url, str):
            raise Problem(422, "callback_url must be a string")
        try:
            check_callback(callback_url, allow)
        except ValueError as exc:
            raise Problem(422, str(exc)) from None
    return RunOptions(
        on_error=on_error,
        max_errors=max_errors,
        dry_run=dry_run,
        encoding=encoding,
        delimiter=delimiter,
        callback_url=callback_url,
    )


def resolve_dataset(data_dir: Path, name: str) -> tuple[Path, str]:
    """The directory (or zip) of a dataset name, checked to stay inside the data directory."""
    relative = Path(name)
    if "\0" in name or relative.is_absolute() or ".." in relative.parts:
        raise Problem(400, f"dataset must be a name inside the data directory, got {name!r}")
    root = data_dir.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise Problem(400, f"dataset {name!r} resolves outside the data directory")
    try:
        if path.suffix.lower() == ".zip" and path.is_file():
            return path, path.relative_to(root).as_posix()
        found = path.is_dir()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise Problem(
            400, f"dataset {name[:80]!r}... is not a usable name: {exc.strerror}"
        ) from None
    if not found:
        raise Problem(404, f"no dataset {name!r} in the data directory", kind="dataset-not-found")
    for entry in path.iterdir():
        if entry.is_symlink() and not entry.resolve().is_relative_to(root):
            raise Problem(400, f"dataset {name!r} links to files outside the data directory")
    return path, path.relative_to(root).as_posix()


def list_datasets(data_dir: Path, depth: int = 2, limit: int = 200) -> list[str]:
    """Dataset names the pages offer: directories under the data dir holding a users file."""
    root = data_dir.resolve()
    users_file = UPLOAD_FILES["users"]
    found: list[str] = []
    level = [root]
    for _ in range(depth + 1):
        following: list[Path] = []
        for directory in level:
            if (directory / users_file).is_file():
                found.append(directory.relative_to(root).as_posix())
            try:
                following += sorted(
                    d for d in directory.iterdir() if d.is_dir() and not d.is_symlink()
                )
            except OSError:
                continue
        level = following
    return found[:limit]


async def _json_fields(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    if request.content_type != "application/json":
        raise Problem(
            415,
            f"unsupported Content-Type {request.content_type!r}: send application/json "
            "or multipart/form-data",
        )
    body = await request.read()
    if not body.strip():
        return {}
    try:
        fields = json.loads(body)
    except ValueError as exc:
        raise Problem(400, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise Problem(400, "malformed JSON: nested too deeply") from None
    if not isinstance(fields, dict):
        raise Problem(400, "the body must be a JSON object")
    unknown = sorted(set(fields) - set(JSON_FIELDS))
    if unknown:
        raise Problem(422, f"unknown fields {unknown}; expected some of {list(JSON_FIELDS)}")
    return fields


async def _upload(request: web.Request, settings: Settings, key: str | None) -> RunRequest:
    scratch = ScratchDir("etl-upload-", settings.tmp_dir)
    directory, cleanup = scratch.path, scratch.remove
    try:
        try:
            reader = await request.multipart()
            files, fields = await _receive(reader, directory, settings.max_upload_bytes)
        except (ValueError, InvalidHeader) as exc:
            raise Problem(400, f"malformed multipart body: {exc}") from None
        options = parse_options({**request.query, **fields}, settings.webhook_allow)
        if ARCHIVE_PART in files:
            files[ARCHIVE_PART]["members"] = await _unpack(directory, settings)
    except BaseException:
        cleanup()
        raise
    return RunRequest(
        source_dir=directory,
        source={"kind": "upload", "files": files},
        options=options,
        idempotency_key=key,
        request_hash=_digest(
            {"files": {k: v["sha256"] for k, v in files.items()}, "options": options.to_json()}
        ),
        cleanup=cleanup,
    )


async def _receive(
    reader: MultipartReader, directory: Path, limit: int
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Stream the file parts to ``directory``; their sizes and hashes, and the text parts."""
    files: dict[str, dict[str, Any]] = {}
    fields: dict[str, str] = {}
    total = 0
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            raise Problem(400, "nested multipart bodies are not supported")
        name = part.name or ""
        if name in files or name in fields:
            raise Problem(400, f"part {name!r} appears twice")
        if name in OPTION_FIELDS:
            fields[name] = await _small_text(part)
            continue
        if name not in UPLOAD_FILES and name != ARCHIVE_PART:
            expected = ", ".join([*UPLOAD_FILES, ARCHIVE_PART, *OPTION_FIELDS])
            raise Problem(400, f"unexpected part {name!r}; expected {expected}")
        digest, size = hashlib.sha256(), 0
        target = ARCHIVE_FILE if name == ARCHIVE_PART else UPLOAD_FILES[name]
        async with aiofiles.open(directory / target, "wb") as out:
            while chunk := await part.read_chunk(CHUNK_BYTES):
                size += len(chunk)
                if total + size > limit:
                    raise Problem(413, f"uploads are limited to {limit} bytes in total")
                digest.update(chunk)
                await out.write(chunk)
        total += size
        files[name] = {"bytes": size, "sha256": digest.hexdigest()}
    if ARCHIVE_PART in files:
        if len(files) > 1:
            raise Problem(400, f"send either an {ARCHIVE_PART!r} part or the three files, not both")
        return files, fields
    missing = [name for name in UPLOAD_FILES if name not in files]
    if missing:
        raise Problem(400, f"missing upload parts: {', '.join(missing)} (or one {ARCHIVE_PART!r})")
    return files, fields


async def _unpack(directory: Path, settings: Settings) -> dict[str, str]:
    """Extract an uploaded zip next to it, within the upload limit; then drop the zip.

    Done before answering, so a bomb or an unsafe path is refused with a 4xx.
    """
    archive = directory / ARCHIVE_FILE
    limits = ArchiveLimits(settings.max_upload_bytes, settings.zip_max_ratio)
    try:
        members = await asyncio.to_thread(extract_inputs, archive, directory, limits)
    except ArchiveRejected as exc:
        raise Problem(413 if exc.too_large else 400, f"the uploaded archive: {exc}") from None
    finally:
        await asyncio.to_thread(archive.unlink, True)
    return members


async def _small_text(part: BodyPartReader) -> str:
    data = b""
    while chunk := await part.read_chunk(MAX_FIELD_BYTES):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise Problem(400, f"part {part.name!r} is longer than {MAX_FIELD_BYTES} bytes")
    try:
        return data.decode().strip()
    except UnicodeDecodeError:
        raise Problem(400, f"part {part.name!r} is not UTF-8 text") from None


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
