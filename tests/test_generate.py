"""The generator's shapes have the properties the benchmark claims for them.

Files are read back with the csv module (the lab's comma plus tab turned into a comma
first), never with the pipeline's reader, and each shape goes through the real pipeline
into PostgreSQL and must give what the obvious implementation gives.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import random
import re
from collections import Counter
from datetime import date, timedelta
from itertools import accumulate, pairwise
from pathlib import Path

import pytest
from test_equivalence import loaded, obvious

from service import generate as gen
from service.generate import SHAPES, IdPermutation, Shape, generate
from service.jobs import run_once
from service.settings import Settings

USERS, EXPERIMENTS, COMPOUNDS = 200, 2000, 40
FILES = ("users.csv", "user_experiments.csv", "compounds.csv")


def lab_rows(path: Path) -> list[list[str]]:
    """The non-blank rows of a lab CSV, fields as written (quotes removed by csv)."""
    text = path.read_text(encoding="utf-8").replace(",\t", ",")
    return [row for row in csv.reader(io.StringIO(text, newline="")) if row]


def raw_fields(path: Path, column: int) -> list[str]:
    """One column as it stands in the file, quotes included: the lines split on ',\\t'."""
    lines = path.read_bytes().decode("utf-8").split("\r\n")
    return [line.split(",\t")[column] for line in lines if line][1:]


@pytest.fixture(scope="module")
def shaped(tmp_path_factory: pytest.TempPathFactory) -> dict[Shape, Path]:
    out = tmp_path_factory.mktemp("shapes")
    for shape in SHAPES:
        generate(out / shape, USERS, EXPERIMENTS, COMPOUNDS, seed=3, shape=shape)
    return {shape: out / shape for shape in SHAPES}


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8, 13, 16])
def test_id_permutation_is_a_bijection(bits: int) -> None:
    for seed in range(3):
        perm = IdPermutation(bits, random.Random(seed))
        assert sorted(map(perm, range(1 << bits))) == list(range(1 << bits))


def test_more_ids_than_the_width_holds_is_refused(tmp_path: Path) -> None:
    """6-digit compound ids come from 2**19 numbers: one more cannot be distinct."""
    generate(tmp_path / "fits", 1, 0, 2**19, shape="sparse")
    with pytest.raises(ValueError, match="at most 524288 compounds"):
        generate(tmp_path / "over", 1, 0, 2**19 + 1, shape="sparse")


@pytest.mark.parametrize("shape", ["sparse", "hot"])
def test_realistic_shapes_have_random_distinct_ids_in_no_order(
    shaped: dict[Shape, Path], shape: Shape
) -> None:
    d = shaped[shape]
    users, experiments, compounds = (lab_rows(d / name)[1:] for name in FILES)
    for rows, digits, count in (
        (users, 10, USERS),
        (experiments, 12, EXPERIMENTS),
        (compounds, 6, COMPOUNDS),
    ):
        ids = [row[0] for row in rows]
        assert len(ids) == count
        assert all(re.fullmatch(rf"[1-9]\d{{{digits - 1}}}", i) for i in ids), ids[:5]
        assert len(set(ids)) == count
        rising = sum(a < b for a, b in pairwise(map(int, ids))) / (count - 1)
        assert 0.35 < rising < 0.65, rising  # neither sorted nor reversed nor in runs
    assert {int(c[0]) for c in compounds} != set(range(1, COMPOUNDS + 1))
    owners = [row[1] for row in experiments]
    assert set(owners) <= {row[0] for row in users}
    # Not grouped by user: a user's experiments are scattered, not one run of lines.
    assert sum(a != b for a, b in pairwise(owners)) > 0.6 * EXPERIMENTS


@pytest.mark.parametrize("shape", ["sparse", "hot"])
def test_realistic_shapes_have_crlf_quoted_names_decimal_times_and_lists(
    shaped: dict[Shape, Path], shape: Shape
) -> None:
    d = shaped[shape]
    for name in FILES:
        data = (d / name).read_bytes()
        assert data.count(b"\n") == data.count(b"\r\n") > 1
        assert data.endswith(b"\r\n") and b",\t" in data
    assert (d / "users.csv").read_bytes().startswith(b"\r\nuser_id,\tname,\temail")
    names = raw_fields(d / "users.csv", 1)
    assert len(names) == USERS
    assert all(re.fullmatch(r'"[^",]+, [^",]+"', n) for n in names), names[:5]
    assert all(re.fullmatch(r"[a-z0-9.]+@[a-z.]+", e) for e in raw_fields(d / "users.csv", 2))
    experiments = lab_rows(d / "user_experiments.csv")[1:]
    times = [row[3] for row in experiments]
    assert all(re.fullmatch(r"\d+(\.\d\d)?", t) for t in times), times[:5]
    whole = sum("." not in t for t in times)
    assert 0.05 * EXPERIMENTS < whole < 0.2 * EXPERIMENTS
    known = {row[0] for row in lab_rows(d / "compounds.csv")[1:]}
    lists = [row[2].split(";") for row in experiments]
    assert {len(ids) for ids in lists} == {1, 2, 3, 4, 5}
    used = Counter(c for ids in lists for c in ids)
    assert set(used) <= known
    counts = sorted(used.values())
    assert counts[-1] > 5 * counts[len(counts) // 2]  # a few compounds in most experiments


def test_hot_shape_has_one_robot_user_with_thirty_percent(shaped: dict[Shape, Path]) -> None:
    owners = Counter(row[1] for row in lab_rows(shaped["hot"] / "user_experiments.csv")[1:])
    (robot, most), (_, second) = owners.most_common(2)
    assert abs(most / EXPERIMENTS - 0.3) <= 0.01
    assert second < 0.03 * EXPERIMENTS
    names = {row[0]: row[1] for row in lab_rows(shaped["hot"] / "users.csv")[1:]}
    assert names[robot] == "Robot, Liquid Handler 3"
    sparse = Counter(row[1] for row in lab_rows(shaped["sparse"] / "user_experiments.csv")[1:])
    assert sparse.most_common(1)[0][1] < 0.03 * EXPERIMENTS


def dense_expected(
    users: int, experiments: int, compounds: int, seed: int, batch: int
) -> dict[str, str]:
    """The dense files, written out from the rules the first benchmark's data followed."""
    rng = random.Random(seed)
    popularity = list(accumulate(1 / k for k in range(1, compounds + 1)))
    activity = list(accumulate(rng.random() + 0.25 for _ in range(users)))
    experiment_lines = []
    for first in range(0, experiments, batch):
        n = min(batch, experiments - first)
        owners = rng.choices(range(1, users + 1), cum_weights=activity, k=n)
        sizes = rng.choices(range(5), weights=[1, 25, 35, 25, 14], k=n)
        picks = rng.choices(range(1, compounds + 1), cum_weights=popularity, k=sum(sizes))
        for i in range(n):
            listed = picks[sum(sizes[:i]) : sum(sizes[: i + 1])]
            run_time = rng.randint(1, 600)
            experiment_lines.append(
                [first + i + 1, owners[i], ";".join(map(str, listed)), run_time]
            )
    lines = {
        "users.csv": [
            [u, f"User {u}", f"user{u}@example.com", date(2023, 1, 1) + timedelta(u % 1000)]
            for u in range(1, users + 1)
        ],
        "compounds.csv": [
            [c, f"Compound {c}", f"C{c % 40 + 1}H{c % 61 + 2}N{c % 5}O{c % 7}"]
            for c in range(1, compounds + 1)
        ],
        "user_experiments.csv": experiment_lines,
    }
    headers = {
        "users.csv": "\nuser_id,\tname,\temail,\tsignup_date",
        "compounds.csv": "compound_id,\tcompound_name,\tcompound_structure",
        "user_experiments.csv": (
            "experiment_id,\tuser_id,\texperiment_compound_ids,\texperiment_run_time"
        ),
    }
    return {
        name: "".join([headers[name], *("\n" + ",\t".join(map(str, r)) for r in rows)])
        for name, rows in lines.items()
    }


@pytest.mark.parametrize(("batch", "seed"), [(gen.BATCH, 0), (gen.BATCH, 7), (64, 5)])
def test_dense_shape_is_the_first_benchmarks_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int, seed: int
) -> None:
    """Byte for byte, batch boundaries included (the generator batches its random draws)."""
    monkeypatch.setattr(gen, "BATCH", batch)
    generate(tmp_path, 150, 300, 25, seed=seed)
    expected = dense_expected(150, 300, 25, seed, batch)
    assert {name: (tmp_path / name).read_text(encoding="utf-8") for name in FILES} == expected


@pytest.mark.parametrize("shape", SHAPES)
def test_generation_is_deterministic_for_a_seed(tmp_path: Path, shape: Shape) -> None:
    for name in ("a", "b", "c"):
        generate(tmp_path / name, 30, 200, 10, seed=1 if name == "c" else 4, shape=shape)
    same = [(tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in FILES]
    other = (tmp_path / "c" / FILES[1]).read_bytes() != (tmp_path / "a" / FILES[1]).read_bytes()
    assert same == [True, True, True] and other


def normalised(directory: Path, out: Path) -> Path:
    """The same rows as plain comma-separated files, for the obvious implementation."""
    out.mkdir()
    for name in FILES:
        with (out / name).open("w", encoding="utf-8", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(lab_rows(directory / name))
    return out


@pytest.mark.parametrize("shape", SHAPES)
async def test_every_shape_loads_the_obvious_results(
    settings: Settings, shaped: dict[Shape, Path], shape: Shape
) -> None:
    forced = dataclasses.replace(settings, partitions=3, workers=2, chunk_bytes=4096)
    run = await run_once(forced, shaped[shape])
    assert run["status"] == "succeeded", run
    assert run["stats"]["experiments"] == EXPERIMENTS
    expected = obvious(normalised(shaped[shape], settings.tmp_dir.parent / "plain"))
    assert await loaded(settings) == expected
    if shape != "dense":
        counts = expected["experiment_counts"].values()
        assert any(", " in name for _, name, _ in counts)  # names arrive unquoted
