"""Serve the `retrain` flow on a schedule: registers the deployment with its cron
schedule on the Prefect server in PREFECT_API_URL and runs it when due (Ctrl-C stops).

    prefect server start                                   # another terminal
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m pipelines.serve

Work pools on other machines: see prefect.yaml (`prefect deploy --all`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect.schedules import Cron

from pipelines.retrain import retrain

DEFAULT_CRON = "0 3 * * 1"  # Mondays 03:00 UTC: weekly retraining


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="weekly", help="deployment name")
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"schedule (default: {DEFAULT_CRON!r})")
    parser.add_argument("--workspace", default=".", help="project folder the flow runs in")
    args = parser.parse_args(argv)
    retrain.serve(name=args.name, schedule=Cron(args.cron, timezone="UTC"), parameters={"workspace": str(Path(args.workspace).resolve())},
                  description="Retrain, distil, evaluate and gate-promote kdas models on a schedule")


if __name__ == "__main__":
    main()
