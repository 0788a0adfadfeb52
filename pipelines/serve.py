"""Serve the `retrain` flow on a schedule: registers the deployment with its cron
schedule on the Prefect server in PREFECT_API_URL and runs it when due (Ctrl-C stops).

    prefect server start                                   # another terminal
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m pipelines.serve

Work pools on other machines: see prefect.yaml (`prefect deploy --all`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from prefect.schedules import Cron

from pipelines.retrain import retrain

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


def deployment_schedule(name: str, path: Path = PREFECT_YAML) -> tuple[str, str]:
    """(cron, timezone) of deployment `name` in prefect.yaml: the schedule lives there only."""
    deployments = {d["name"]: d for d in yaml.safe_load(path.read_text())["deployments"]}
    if name not in deployments or not deployments[name].get("schedules"):
        raise SystemExit(f"{path}: no scheduled deployment {name!r} (scheduled: {', '.join(n for n, d in deployments.items() if d.get('schedules'))}); pass --cron")
    schedule = deployments[name]["schedules"][0]
    return schedule["cron"], schedule.get("timezone", "UTC")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="weekly", help="deployment name")
    parser.add_argument("--cron", help="schedule (default: the deployment's in prefect.yaml)")
    parser.add_argument("--workspace", default=".", help="project folder the flow runs in")
    args = parser.parse_args(argv)
    cron, tz = (args.cron, "UTC") if args.cron else deployment_schedule(args.name)
    retrain.serve(name=args.name, schedule=Cron(cron, timezone=tz), parameters={"workspace": str(Path(args.workspace).resolve())},
                  description="Retrain, distil, evaluate and gate-promote kdas models on a schedule")


if __name__ == "__main__":
    main()
