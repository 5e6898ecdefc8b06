"""Synthetic datasets in the lab's export format, quirks included.

Comma plus tab between fields, a blank first line in users.csv, no newline at the end of
any file; compound popularity is skewed (a few compounds appear in most experiments)
and users' activity varies, like the real exports.
"""

from __future__ import annotations

import random
from datetime import date, timedelta
from itertools import accumulate
from pathlib import Path

SEP = ",\t"
BATCH = 100_000


def _write(path: Path, header: list[str], lines: list[str] | None = None) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write(SEP.join(header))
        if lines:
            f.write("\n" + "\n".join(lines))


def generate(
    out_dir: Path, users: int, experiments: int, compounds: int, seed: int = 0
) -> dict[str, Path]:
    """Write the three CSVs to ``out_dir``; the paths written."""
    if users < 1 and experiments > 0:
        raise ValueError("experiments need at least one user")
    if compounds < 1 and experiments > 0:
        raise ValueError("experiments need at least one compound")
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {
        "users": out_dir / "users.csv",
        "experiments": out_dir / "user_experiments.csv",
        "compounds": out_dir / "compounds.csv",
    }
    start = date(2023, 1, 1)
    with paths["users"].open("w", encoding="utf-8", newline="") as f:
        f.write("\n" + SEP.join(["user_id", "name", "email", "signup_date"]))
        for first in range(1, users + 1, BATCH):
            f.write(
                "".join(
                    f"\n{u}{SEP}User {u}{SEP}user{u}@example.com{SEP}"
                    f"{start + timedelta(days=u % 1000)}"
                    for u in range(first, min(first + BATCH, users + 1))
                )
            )
    _write(
        paths["compounds"],
        ["compound_id", "compound_name", "compound_structure"],
        [
            f"{c}{SEP}Compound {c}{SEP}C{c % 40 + 1}H{c % 61 + 2}N{c % 5}O{c % 7}"
            for c in range(1, compounds + 1)
        ],
    )
    compound_weights = list(accumulate(1.0 / (k + 1) for k in range(compounds)))
    user_weights = list(accumulate(rng.random() + 0.25 for _ in range(users)))
    with paths["experiments"].open("w", encoding="utf-8", newline="") as f:
        f.write(
            SEP.join(["experiment_id", "user_id", "experiment_compound_ids", "experiment_run_time"])
        )
        for first in range(1, experiments + 1, BATCH):
            n = min(BATCH, experiments + 1 - first)
            owners = rng.choices(range(1, users + 1), cum_weights=user_weights, k=n)
            sizes = rng.choices((0, 1, 2, 3, 4), weights=(1, 25, 35, 25, 14), k=n)
            picks = iter(
                rng.choices(range(1, compounds + 1), cum_weights=compound_weights, k=sum(sizes))
            )
            f.write(
                "".join(
                    f"\n{first + i}{SEP}{owner}{SEP}"
                    f"{';'.join(str(next(picks)) for _ in range(size))}{SEP}{rng.randint(1, 600)}"
                    for i, (owner, size) in enumerate(zip(owners, sizes, strict=True))
                )
            )
    return paths
