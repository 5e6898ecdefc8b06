"""The container's entry point (the Dockerfile's ENTRYPOINT): arguments to a command line.

    (no arguments)                      experiment-etl serve   (the compose default)
    -d /data -db exampledb -hs ... -p N experiment-etl run -d /data -db exampledb ...
    serve | run | show | ... ARGS       experiment-etl serve | run | show | ... ARGS

Arguments that start with a dash are flags of ``run``, so the original take-home's
``docker run IMAGE -d /data -db ...`` loads once and exits 0 or 1, like the CLI.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli import main as cli


def command_line(args: Sequence[str]) -> list[str]:
    """The ``experiment-etl`` arguments the container's arguments stand for."""
    if not args:
        return ["serve"]
    if args[0].startswith("-"):
        return ["run", *args]
    return list(args)


def main(args: Sequence[str] | None = None) -> None:
    cli(args=command_line(sys.argv[1:] if args is None else args), prog_name="experiment-etl")


if __name__ == "__main__":
    main()
