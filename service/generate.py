"""Synthetic datasets in the lab's export format, quirks included, in three shapes.

All shapes: comma plus tab between fields, a header line, a blank first line in users.csv;
compound popularity is skewed (a few compounds appear in most experiments) and users'
activity varies, like the real exports.

- ``dense``: the first benchmark's shape. Ids 1..n in file order, whole-second run times,
  LF line ends and no newline at the end of a file.
- ``sparse``: shaped like a real export. User ids are distinct random 10-digit numbers,
  experiment ids distinct random 12-digit numbers, compound ids distinct random 6-digit
  catalogue numbers; experiment rows are in no order (not grouped by user, not sorted by
  id); run times have two decimals (one in ten is whole: ``60``); names are quoted and hold
  a comma (``"Smith, Alice"``); CRLF line ends, the last line ended too.
- ``hot``: ``sparse`` plus one robot account that owns exactly 30% of the experiments,
  spread through the file.

Generation streams in batches: memory holds the users' ids and weights (a few bytes per
user, in arrays), never the rows. Distinct random ids come from :class:`IdPermutation`, a
seeded bijection, so no set of the ids drawn so far is needed.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Iterable, Iterator, Sequence
from datetime import date, timedelta
from itertools import accumulate
from pathlib import Path
from typing import Literal, TypeVar, get_args

T = TypeVar("T")
SEP = ",\t"
BATCH = 100_000
Shape = Literal["dense", "sparse", "hot"]
SHAPES: tuple[Shape, ...] = get_args(Shape)
HOT_SHARE = 0.3  # of all experiments, owned by the hot shape's robot account
WHOLE_TIMES = 10  # one run time in this many is a whole number of seconds (sparse, hot)
START = date(2023, 1, 1)

USER_HEADER = ["user_id", "name", "email", "signup_date"]
COMPOUND_HEADER = ["compound_id", "compound_name", "compound_structure"]
EXPERIMENT_HEADER = [
    "experiment_id",
    "user_id",
    "experiment_compound_ids",
    "experiment_run_time",
]
SURNAMES = (  # noqa: SIM905 - a list of words reads better as words
    "Smith Johnson Garcia Müller Rossi Novak Kowalski Tanaka Nguyen Silva Dubois Jensen "
    "O'Brien Petrov Haddad Okafor Larsen Moreau Kim Schmidt"
).split()
GIVEN = (  # noqa: SIM905
    "Alice Bob Carol Dan Eve Frank Grace Heidi Ivan Judy Karim Lena Mateo Nadia Oscar "
    "Priya Quinn Rafael Sofia Tomas"
).split()
ROBOT = '"Robot, Liquid Handler 3"'


def _mailbox(name: str) -> str:
    """An address's local part: lower-case ASCII, as mail systems hand them out."""
    return name.lower().replace("ü", "ue").replace("'", "")


def _formula(c: int) -> str:
    return f"C{c % 40 + 1}H{c % 61 + 2}N{c % 5}O{c % 7}"


class IdPermutation:
    """A seeded bijection of ``[0, 2**bits)``: distinct inputs give distinct outputs.

    Each step is invertible on ``bits``-bit numbers (an odd multiplier plus a constant, or
    ``x ^ (x >> s)``), so the composition is too, and ``i -> base + p(i)`` turns the
    indices ``0..n-1`` into ``n`` distinct ids in no visible order or stride, without a set.
    """

    def __init__(self, bits: int, rng: random.Random) -> None:
        self.bits = bits
        self.mask = (1 << bits) - 1
        self.shift = max(1, bits // 2)
        self.multipliers = [rng.getrandbits(bits) | 1 for _ in range(3)]
        self.offset = rng.getrandbits(bits)

    def __call__(self, i: int) -> int:
        mask, shift = self.mask, self.shift
        m0, m1, m2 = self.multipliers
        x = (i * m0 + self.offset) & mask
        x = ((x ^ (x >> shift)) * m1) & mask
        x = ((x ^ (x >> shift)) * m2) & mask
        return x ^ (x >> shift)

    @classmethod
    def for_digits(cls, digits: int, rng: random.Random) -> tuple[IdPermutation, int]:
        """A permutation whose outputs plus the returned base all have ``digits`` digits."""
        base = 10 ** (digits - 1)
        return cls((9 * base).bit_length() - 1, rng), base

    def check(self, n: int, what: str) -> None:
        """Refuse ``n`` indices when the permutation's range has fewer numbers."""
        if n > 1 << self.bits:
            raise ValueError(f"at most {1 << self.bits} {what} have distinct ids of this width")

    def ids(self, base: int, start: int, stop: int) -> list[int]:
        """The distinct ids of indices ``start..stop-1``."""
        return [base + self(i) for i in range(start, stop)]


def _write(path: Path, head: str, chunks: Iterable[str], tail: str = "") -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write(head)
        for chunk in chunks:
            f.write(chunk)
        f.write(tail)


def _drawing_table(values: Sequence[T], weights: Sequence[float], size: int = 1 << 20) -> list[T]:
    """Each value repeated in proportion to its weight (at least once), to draw from uniformly.

    A uniform draw indexes the list; a weighted one bisects the cumulative weights, which
    took half of the generation's time (0.45 against 0.15 us per draw).
    """
    scale = size / math.fsum(weights)
    return [
        v for v, w in zip(values, weights, strict=True) for _ in range(max(1, round(w * scale)))
    ]


def _batches(n: int) -> Iterator[tuple[int, int]]:
    """``(first, count)`` for the 0-based rows of ``n`` in batches of ``BATCH``."""
    return ((first, min(BATCH, n - first)) for first in range(0, n, BATCH))


def generate(
    out_dir: Path,
    users: int,
    experiments: int,
    compounds: int,
    seed: int = 0,
    shape: Shape = "dense",
) -> dict[str, Path]:
    """Write the three CSVs to ``out_dir``; the paths written."""
    if users < 1 and experiments > 0:
        raise ValueError("experiments need at least one user")
    if compounds < 1 and experiments > 0:
        raise ValueError("experiments need at least one compound")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "users": out_dir / "users.csv",
        "experiments": out_dir / "user_experiments.csv",
        "compounds": out_dir / "compounds.csv",
    }
    rng = random.Random(seed)
    if shape == "dense":
        _dense(paths, rng, users, experiments, compounds)
    else:
        _sparse(paths, rng, users, experiments, compounds, hot=shape == "hot")
    return paths


def _dense(
    paths: dict[str, Path], rng: random.Random, users: int, experiments: int, compounds: int
) -> None:
    _write(
        paths["users"],
        "\n" + SEP.join(USER_HEADER),
        (
            "".join(
                f"\n{u}{SEP}User {u}{SEP}user{u}@example.com{SEP}{START + timedelta(days=u % 1000)}"
                for u in range(first + 1, first + n + 1)
            )
            for first, n in _batches(users)
        ),
    )
    _write(
        paths["compounds"],
        SEP.join(COMPOUND_HEADER),
        (f"\n{c}{SEP}Compound {c}{SEP}{_formula(c)}" for c in range(1, compounds + 1)),
    )
    compound_weights = array("d", accumulate(1.0 / (k + 1) for k in range(compounds)))
    user_weights = array("d", accumulate(rng.random() + 0.25 for _ in range(users)))

    def batch(first: int, n: int) -> str:
        owners = rng.choices(range(1, users + 1), cum_weights=user_weights, k=n)
        sizes = rng.choices((0, 1, 2, 3, 4), weights=(1, 25, 35, 25, 14), k=n)
        picks = iter(
            rng.choices(range(1, compounds + 1), cum_weights=compound_weights, k=sum(sizes))
        )
        return "".join(
            f"\n{first + 1 + i}{SEP}{owner}{SEP}"
            f"{';'.join(str(next(picks)) for _ in range(size))}{SEP}{rng.randint(1, 600)}"
            for i, (owner, size) in enumerate(zip(owners, sizes, strict=True))
        )

    _write(
        paths["experiments"],
        SEP.join(EXPERIMENT_HEADER),
        (batch(first, n) for first, n in _batches(experiments)),
    )


def _sparse(
    paths: dict[str, Path],
    rng: random.Random,
    users: int,
    experiments: int,
    compounds: int,
    *,
    hot: bool,
) -> None:
    nl = "\r\n"
    if hot and experiments and users < 2:
        raise ValueError("the hot shape needs a robot account and at least one other user")
    user_perm, user_base = IdPermutation.for_digits(10, rng)
    compound_perm, compound_base = IdPermutation.for_digits(6, rng)
    experiment_perm, experiment_base = IdPermutation.for_digits(12, rng)
    user_perm.check(users, "users")
    compound_perm.check(compounds, "compounds")
    experiment_perm.check(experiments, "experiments")
    user_ids = array("q", (user_base + user_perm(i) for i in range(users)))  # no list of 3M
    robot = rng.randrange(users) if hot else -1
    days = [str(START + timedelta(days=d)) for d in range(1000)]
    people = [(f'"{s}, {g}"', _mailbox(f"{g}.{s}")) for s in SURNAMES for g in GIVEN]

    def user_batch(first: int, n: int) -> str:
        picked = rng.choices(people, k=n)
        signed = rng.choices(days, k=n)
        lines = [
            f"{nl}{user_ids[first + i]}{SEP}{name}{SEP}{mail}.{first + i}@lab.example{SEP}{day}"
            for i, ((name, mail), day) in enumerate(zip(picked, signed, strict=True))
        ]
        if first <= robot < first + n:
            lines[robot - first] = (
                f"{nl}{user_ids[robot]}{SEP}{ROBOT}{SEP}robot3@lab.example{SEP}{days[0]}"
            )
        return "".join(lines)

    _write(
        paths["users"],
        nl + SEP.join(USER_HEADER),
        (user_batch(first, n) for first, n in _batches(users)),
        nl,
    )
    catalogue = [str(c) for c in compound_perm.ids(compound_base, 0, compounds)]
    _write(
        paths["compounds"],
        SEP.join(COMPOUND_HEADER),
        (f"{nl}{c}{SEP}Compound {c}{SEP}{_formula(int(c))}" for c in catalogue),
        nl,
    )
    popular = _drawing_table(catalogue, [1.0 / (k + 1) for k in range(compounds)])
    list_sizes = _drawing_table((1, 2, 3, 4, 5), (30, 30, 20, 12, 8))
    # The robot's weight is zero: it owns exactly its share, placed below, and no more.
    user_weights = array(
        "d", accumulate(0.0 if u == robot else rng.random() + 0.25 for u in range(users))
    )
    whole = WHOLE_TIMES

    def robot_rows(rows: int) -> int:
        return round(rows * HOT_SHARE)

    def batch(first: int, n: int) -> str:
        owners = rng.choices(user_ids, cum_weights=user_weights, k=n)
        if hot:
            for row in rng.sample(range(n), robot_rows(first + n) - robot_rows(first)):
                owners[row] = user_ids[robot]
        sizes = rng.choices(list_sizes, k=n)
        picks = rng.choices(popular, k=sum(sizes))
        ends = accumulate(sizes)
        cents = [int(rng.random() * 59_900) + 100 for _ in range(n)]
        return "".join(
            f"{nl}{eid}{SEP}{owner}{SEP}{';'.join(picks[end - size : end])}{SEP}"
            + (f"{t // 100}" if t % whole == 0 else f"{t // 100}.{t % 100:02d}")
            for eid, owner, size, end, t in zip(
                experiment_perm.ids(experiment_base, first, first + n),
                owners,
                sizes,
                ends,
                cents,
                strict=True,
            )
        )

    _write(
        paths["experiments"],
        SEP.join(EXPERIMENT_HEADER),
        (batch(first, n) for first, n in _batches(experiments)),
        nl,
    )
