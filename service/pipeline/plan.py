"""Finding and checking the three input files before any row is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .csvfile import COMPOUNDS, EXPERIMENTS, USERS, FilePlan, find_file, plan_file
from .errors import FileError, FileOrder, InputError, RowError


@dataclass(frozen=True)
class InputPlan:
    users: FilePlan
    experiments: FilePlan
    compounds: FilePlan

    @property
    def order(self) -> FileOrder:
        """Errors are reported file by file (compounds, users, experiments), by line."""
        return FileOrder((self.compounds.name, self.users.name, self.experiments.name))

    @property
    def total_bytes(self) -> int:
        return self.users.size + self.experiments.size + self.compounds.size


def plan_inputs(directory: Path, block: int = 8 << 20, experiments_read: bool = True) -> InputPlan:
    """Check the directory's three files and headers; report every problem at once.

    With ``experiments_read`` False, the experiments' data is left for ``scan_plan``: a
    run reads it while the other files' scans already go.
    """
    if not directory.is_dir():
        raise InputError([RowError(str(directory), None, None, "input directory not found")])
    plans: list[FilePlan] = []
    errors: list[RowError] = []
    for spec in (USERS, EXPERIMENTS, COMPOUNDS):
        try:
            scan = experiments_read or spec is not EXPERIMENTS
            plans.append(plan_file(find_file(directory, spec), spec, block, scan))
        except FileError as exc:
            errors.append(exc.error)
        except OSError as exc:
            errors.append(RowError(spec.filenames[0], None, None, f"cannot read: {exc}"))
    if errors:
        raise InputError(errors)
    return InputPlan(*plans)
