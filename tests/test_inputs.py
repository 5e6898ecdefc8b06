"""Real exports, end to end on the server: compressed files, zips, encodings, ``;``.

Each test posts runs to a real server on a real PostgreSQL and compares the tables
with those of the plain sample files.
"""

from __future__ import annotations

import asyncio
import bz2
import gzip
import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from aiohttp import FormData
from badinput import Tables, snapshot
from test_web_support import Client, Serve, entries, problem, wait_for

from service.settings import Settings

pytest_plugins = ["test_web_support"]

FILES = ("users.csv", "user_experiments.csv", "compounds.csv")
COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".zst": zstandard.ZstdCompressor().compress,
}


async def run(client: Client, **body: object) -> dict[str, object]:
    async with client.post("/runs", json=body) as response:
        assert response.status == 202, await response.text()
        started = await response.json()
    return await wait_for(client, started["id"], {"succeeded", "failed"})


async def plain_tables(client: Client, settings: Settings) -> Tables:
    """The tables a run of the plain sample files loads."""
    done = await run(client)
    assert done["status"] == "succeeded", done
    return await snapshot(settings)


async def gone(directory: Path) -> None:
    """Wait for a finished run's scratch files to go (removed just after it is recorded)."""
    async with asyncio.timeout(10):
        while True:
            if not entries(directory):
                return
            await asyncio.sleep(0.05)


def dataset(settings: Settings, name: str, files: dict[str, bytes]) -> str:
    directory = settings.data_dir / name
    directory.mkdir()
    for file, data in files.items():
        (directory / file).write_bytes(data)
    return name


def sample(settings: Settings) -> dict[str, bytes]:
    return {name: (settings.data_dir / name).read_bytes() for name in FILES}


def zipped(files: dict[str, bytes], folder: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(folder + name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
async def test_compressed_datasets_give_the_same_tables_as_plain(
    client: Client, settings: Settings, suffix: str
) -> None:
    expected = await plain_tables(client, settings)
    compress = COMPRESSORS[suffix]
    name = dataset(
        settings, "packed", {f + suffix: compress(d) for f, d in sample(settings).items()}
    )

    done = await run(client, dataset=name)
    assert done["status"] == "succeeded", done
    assert await snapshot(settings) == expected
    files = done["stats"]["inputs"]["files"]  # type: ignore[index]
    assert files["users"] == {
        "file": "users.csv" + suffix,
        "compression": {".gz": "gzip", ".bz2": "bzip2", ".zst": "zstd"}[suffix],
        "decompressed": True,
        "encoding": "utf-8",
        "delimiter": ",",
    }
    await gone(settings.tmp_dir)  # the plain copies are removed


async def test_errors_in_a_compressed_file_name_it_at_the_same_line(
    client: Client, settings: Settings
) -> None:
    files = sample(settings)
    experiments = files.pop("user_experiments.csv").replace(b"11,\t10,", b"11,\t99,")
    name = dataset(
        settings, "bad", {**files, "user_experiments.csv.gz": gzip.compress(experiments)}
    )
    done = await run(client, dataset=name)
    assert done["status"] == "failed"
    assert done["errors"] == [
        {
            "file": "user_experiments.csv.gz",
            "line": 12,
            "column": 2,
            "field": "user_id",
            "message": "unknown user_id 99 (not in users.csv)",
        }
    ]
    both = dataset(settings, "both", {**sample(settings), "users.csv.gz": gzip.compress(b"")})
    done = await run(client, dataset=both)
    assert done["status"] == "failed"
    assert done["errors"][0]["message"] == "ambiguous: both users.csv and users.csv.gz"  # type: ignore[index]


async def test_a_zip_dataset_and_a_zip_upload_give_the_same_tables(
    client: Client, settings: Settings
) -> None:
    expected = await plain_tables(client, settings)
    archive = zipped(sample(settings), folder="march/")
    (settings.data_dir / "march.zip").write_bytes(archive)

    done = await run(client, dataset="march.zip")
    assert done["status"] == "succeeded", (done["message"], done["errors"])
    assert done["source"] == {"kind": "dataset", "name": "march.zip"}
    assert done["stats"]["inputs"]["archive"] == "march.zip"  # type: ignore[index]
    assert await snapshot(settings) == expected

    form = FormData()
    form.add_field("archive", archive, filename="march.zip", content_type="application/zip")
    async with client.post("/runs", data=form) as response:
        assert response.status == 202, await response.text()
        started = await response.json()
    assert started["source"]["files"]["archive"]["members"] == {
        name: f"march/{name}" for name in FILES
    }
    done = await wait_for(client, started["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert await snapshot(settings) == expected
    await gone(settings.tmp_dir)


async def post_archive(client: Client, archive: bytes) -> tuple[int, dict[str, object]]:
    form = FormData()
    form.add_field("archive", archive, filename="a.zip", content_type="application/zip")
    async with client.post("/runs", data=form) as response:
        status = response.status
        body = await problem(response, status) if status >= 400 else await response.json()
    return status, body


async def test_zip_bombs_and_escaping_paths_are_refused(serve: Serve, settings: Settings) -> None:
    client = await serve(max_upload_bytes=1 << 20)
    files = sample(settings)

    # Within the ratio but more than the limit once decompressed: the declared sizes.
    big = {**files, "users.csv": files["users.csv"] + b"\n" * (2 << 20)}
    status, body = await post_archive(client, zipped(big))
    assert status == 413
    assert "decompress to more than 1048576 bytes" in str(body["detail"])

    # A member inflating 1000-fold (declared sizes can lie, so this is counted as written).
    client = await serve(max_upload_bytes=1 << 30)
    bomb = {**files, "users.csv": files["users.csv"] + b"\n" * (8 << 20)}
    status, body = await post_archive(client, zipped(bomb))
    assert status == 413
    assert "inflates more than 200 times" in str(body["detail"])

    for name in ("../users.csv", "/etc/users.csv", "a/../../users.csv", "C:/users.csv"):
        status, body = await post_archive(client, zipped({**files, name: b"x"}))
        assert status == 400, name
        assert "unsafe member path" in str(body["detail"]), body

    status, body = await post_archive(client, zipped({"users.csv": files["users.csv"]}))
    assert status == 400
    assert "no user_experiments.csv or experiments.csv in the archive" in str(body["detail"])
    status, body = await post_archive(client, b"PK\x03\x04 not really a zip")
    assert status == 400
    assert entries(settings.tmp_dir) == []  # nothing written survives a refusal

    # A dataset zip is checked when its run starts: a failed run with a clear error.
    (settings.data_dir / "evil.zip").write_bytes(zipped({**files, "../users.csv": b"x"}))
    done = await run(client, dataset="evil.zip")
    assert done["status"] == "failed"
    assert done["errors"] == [
        {
            "file": "evil.zip",
            "line": None,
            "column": None,
            "field": None,
            "message": "unsafe member path '../users.csv' (leaves the archive)",
        }
    ]


async def test_latin1_input_needs_the_encoding_option_which_the_error_suggests(
    client: Client, settings: Settings
) -> None:
    files = sample(settings)
    users = files["users.csv"].decode().replace("Bob", "Zoë Müller").encode("latin-1")
    name = dataset(settings, "latin", {**files, "users.csv": users})

    failed = await run(client, dataset=name)
    assert failed["status"] == "failed"
    [error] = failed["errors"]  # type: ignore[misc]
    assert (error["file"], error["line"], error["column"]) == ("users.csv", 4, 2)
    assert "invalid UTF-8 (byte 0xeb at character 6)" in error["message"]
    assert "option encoding, e.g. latin-1" in error["message"]

    done = await run(client, dataset=name, encoding="latin-1")
    assert done["status"] == "succeeded", done
    assert done["options"]["encoding"] == "iso8859-1"  # type: ignore[index]
    assert done["stats"]["inputs"]["files"]["users"]["encoding"] == "iso8859-1"  # type: ignore[index]
    async with client.get("/users/2/features") as response:
        assert (await response.json())["name"] == "Zoë Müller"

    # cp1252 has no character for 0x81: the error names the place and the encoding.
    bad = dataset(settings, "cp", {**files, "users.csv": users.replace(b"Zo", b"\x81o")})
    failed = await run(client, dataset=bad, encoding="cp1252")
    assert failed["errors"][0]["message"] == "not cp1252 (byte 0x81 at character 4)"  # type: ignore[index]
    assert (failed["errors"][0]["line"], failed["errors"][0]["column"]) == (4, 2)  # type: ignore[index]

    async with client.post("/runs", json={"encoding": "klingon"}) as response:
        assert "unknown encoding 'klingon'" in (await problem(response, 422))["detail"]


def semicolons(data: bytes) -> bytes:
    """A ``,\\t`` export as European Excel writes it: ``;`` between fields, lists quoted."""
    out = []
    for line in data.decode().split("\n"):
        fields = line.split(",\t")
        out.append(";\t".join(f'"{f}"' if ";" in f or "," in f else f for f in fields))
    return "\n".join(out).encode()


async def test_semicolon_delimited_input_gives_the_same_tables(
    client: Client, settings: Settings
) -> None:
    expected = await plain_tables(client, settings)
    files = sample(settings)
    converted = {name: semicolons(data) for name, data in files.items()}
    assert b'1;\t1;\t"1;2";\t10' in converted["user_experiments.csv"]
    # A name with a comma is quoted, as Excel does; a space before its quote makes the
    # converter use the exact reader for that file (the fast one reads the others).
    converted["compounds.csv"] = converted["compounds.csv"].replace(
        b";\tCompound A", b'; \t"Compound, A"'
    )
    # A comma needs no quotes in a ; file.
    converted["users.csv"] = converted["users.csv"].replace(b";\tBob;", b";\tBob, Jr;")
    name = dataset(settings, "excel", converted)
    done = await run(client, dataset=name)
    assert done["status"] == "succeeded", done
    assert done["stats"]["inputs"]["files"]["experiments"]["delimiter"] == ";"  # type: ignore[index]
    tables = await snapshot(settings)
    renamed = {"Compound A": "Compound, A", "Bob": "Bob, Jr"}
    tables_expected = {
        t: [tuple(renamed.get(v, v) for v in row) for row in rows] for t, rows in expected.items()
    }
    assert tables == tables_expected

    # Errors keep their line and column: line 12 of the user's file, field 2.
    broken = converted["user_experiments.csv"].replace(b"11;\t10;", b"11;\t99;")
    bad = dataset(settings, "excel-bad", {**converted, "user_experiments.csv": broken})
    failed = await run(client, dataset=bad)
    assert [(e["file"], e["line"], e["column"]) for e in failed["errors"]] == [  # type: ignore[attr-defined]
        ("user_experiments.csv", 12, 2)
    ]
    unclosed = converted["user_experiments.csv"].replace(b'10;\t"1;3";\t60', b'10;\t"1;3;\t60')
    bad = dataset(settings, "excel-open", {**converted, "user_experiments.csv": unclosed})
    failed = await run(client, dataset=bad)
    assert failed["errors"] == [
        {
            "file": "user_experiments.csv",
            "line": 12,
            "column": 3,
            "field": None,
            "message": "unterminated quoted field",
        }
    ]
    # Given as an option, the delimiter is not guessed: a , file read with ; has no columns.
    forced = await run(client, delimiter=";")
    assert forced["status"] == "failed"
    assert "missing column 'user_id' in header" in str(forced["message"])
