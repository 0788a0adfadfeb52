"""The real-data KDAS benchmark on a CPU: the PraNet split, an EfficientNet-Lite2 teacher and
EfficientNet-Lite0 students (ImageNet weights from ../shared/weights), one DVC experiment
per distillation method, variant and seed, each tracked in MLflow. Writes benchmarks/results/real-cpu.md.

    python benchmarks/real_cpu.py                 # import the data, run every experiment, write the table
    python benchmarks/real_cpu.py --report-only   # rebuild the table from the experiments already run

Run it in a clone of its own (the experiments rewrite params.yaml and the workspace
outputs): `git clone . ../kdas-bench && cd ../kdas-bench && python benchmarks/real_cpu.py`.
Each experiment is `dvc exp run -n NAME -S distill.method=M -S distill.seed=S [-S ...]` (see
`plan`); DVC's run cache trains the teacher once. What ran is printed; nothing is hidden here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASETS = {"kvasir-seg": "kvasir-seg", "cvc-clinicdb": "cvc-clinicdb", "cvc-colondb": "cvc-colondb"}
# each student: its `dvc exp run -S` settings besides the seed, every varied key given (a
# workspace experiment leaves its -S values in params.yaml for the next one)
STUDENTS = {
    "none": ["distill.method=none"],
    "sgm": ["distill.method=sgm", "distill.alpha=0.3"],
    # KDAS's grid, run on the first seed; the best on val goes on to the other seeds
    "kdas-spatial-0.3": ["distill.method=kdas", "distill.attention=spatial", "distill.alpha=0.3"],
    "kdas-spatial-0.1": ["distill.method=kdas", "distill.attention=spatial", "distill.alpha=0.1"],
    "kdas-pairwise-0.3": ["distill.method=kdas", "distill.attention=pairwise", "distill.alpha=0.3"],
    "kdas-pairwise-0.1": ["distill.method=kdas", "distill.attention=pairwise", "distill.alpha=0.1"],
}
RESULTS = ROOT / "benchmarks" / "results" / "real-cpu.md"
# The papers' numbers (KDAS, ICME 2024, Table 1: GPU, 352 px, 100 epochs, PVTv2 backbones,
# best epoch picked on the test sets): theirs, for reference only.
PUBLISHED = {
    "KDAS student (PVTv2-B0), paper": {"kvasir-seg": (0.913, 0.848, 0.027), "cvc-clinicdb": (0.925, 0.872, None), "cvc-colondb": (0.759, 0.679, 0.032)},
}


def sh(*cmd: str) -> str:
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(out.stdout[-4000:], flush=True)
    if out.returncode:
        sys.exit(f"`{' '.join(cmd)}` failed (exit {out.returncode})")
    return out.stdout


def plan(seeds: list[int], done: dict[str, dict]) -> dict[str, list[str]]:
    """Experiment name -> its `dvc exp run -S` settings, in the order they run. On the first
    seed: the student alone, SGM, and each KDAS variant; on each further seed: the student
    alone, SGM, and the KDAS variant with the best val meanDic on the first seed (selected on
    val, never on a test set; known once the first seed's runs in `done` are over).
    `distill.seed` seeds the student alone, so DVC's run cache trains the teacher once."""
    first, *others = seeds
    runs = {f"real-cpu-{name}-seed{first}": [*settings, f"distill.seed={first}"] for name, settings in STUDENTS.items()}
    scored = {name: _metrics(done[f"real-cpu-{name}-seed{first}"], "models/student/metrics.json").get("best_val_meanDic", -1.0)
              for name in STUDENTS if name.startswith("kdas") and f"real-cpu-{name}-seed{first}" in done}
    kdas = max(scored, key=scored.get) if scored else "kdas-spatial-0.3"
    for seed in others:
        runs |= {f"real-cpu-{name}-seed{seed}": [*STUDENTS[name], f"distill.seed={seed}"] for name in ("none", "sgm", kdas)}
    return runs


def run(seeds: list[int]) -> None:
    for name, folder in DATASETS.items():
        if not (ROOT / "data" / "raw" / name).exists():
            sh("kdas", "data", "import", str(SHARED / "datasets" / folder))
    sh("kdas", "params", "use", "real-cpu")
    while True:  # the plan is read again after each run: later runs depend on earlier results
        done = experiments()
        todo = [(name, settings) for name, settings in plan(seeds, done).items() if name not in done]
        if not todo:
            return
        exp, settings = todo[0]
        started = time.time()
        sh("dvc", "exp", "run", "-n", exp, *[arg for s in settings for arg in ("-S", s)])
        print(f"{exp}: {(time.time() - started) / 60:.1f} min", flush=True)


def experiments() -> dict[str, dict]:
    """name -> {params, metrics (file -> data), rev, baseline} from `dvc exp show --json`, on
    every commit (a later baseline keeps the experiments run at an earlier one)."""
    raw = json.loads(subprocess.run(["dvc", "exp", "show", "--all-commits", "--json"], cwd=ROOT, text=True, capture_output=True,
                                    check=True).stdout)
    found = {}
    for baseline in raw:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                if rev.get("name") and rev.get("rev") != "workspace":  # "workspace": still running there
                    found[rev["name"]] = {"rev": rev.get("rev"), "baseline": baseline.get("rev"), "params": data.get("params", {}),
                                          "metrics": data.get("metrics", {})}
    return found


def _metrics(exp: dict, path: str) -> dict:
    return (exp["metrics"].get(path) or {}).get("data") or {}


def _mean_published(exp: dict) -> float | None:
    ev = _metrics(exp, "reports/evaluate/student/metrics.json")
    return ev["published"]["mean"]["meanDic"] if ev else None


def scores_by_seed(exps: dict[str, dict]) -> dict[str, dict[int, float]]:
    """student variant -> seed -> mean published meanDic over the test sets."""
    by_variant: dict[str, dict[int, float]] = {}
    for name, exp in exps.items():
        variant, _, seed = name.removeprefix("real-cpu-").rpartition("-seed")
        if (score := _mean_published(exp)) is not None:
            by_variant.setdefault(variant, {})[int(seed)] = score
    return by_variant


def seed_table(by_variant: dict[str, dict[int, float]]) -> list[str]:
    """Mean published meanDic over the test sets, per student and seed: the spread between
    seeds is the yardstick for any difference between methods."""
    seeds = sorted({s for v in by_variant.values() for s in v})
    lines = ["| student | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread (max - min) |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for variant, scores in sorted(by_variant.items()):
        cells = [f"{scores[s]:.4f}" if s in scores else "-" for s in seeds]
        values = list(scores.values())
        spread = f"{max(values) - min(values):.4f}" if len(values) > 1 else "-"
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {statistics.mean(values):.4f} | {spread} |")
    return lines


def paired_table(by_variant: dict[str, dict[int, float]]) -> list[str]:
    """Each method minus the student alone on the same seed (same data order, augmentation
    and decoder initialisation): the mean difference against its standard deviation says
    whether distillation helps, not the means alone."""
    alone = by_variant.get("none", {})
    seeds = sorted(alone)
    lines = ["| method - none | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std | seeds |",
             "|---|" + "---|" * (len(seeds) + 3)]
    for variant, scores in sorted(by_variant.items()):
        diffs = {s: scores[s] - alone[s] for s in seeds if s in scores}
        if variant == "none" or not diffs:
            continue
        values = list(diffs.values())
        std = f"{statistics.stdev(values):.4f}" if len(values) > 1 else "-"
        cells = [f"{diffs[s]:+.4f}" if s in diffs else "-" for s in seeds]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {statistics.mean(values):+.4f} | {std} | {len(values)} |")
    return lines


def teacher_gap(exps: dict[str, dict], by_variant: dict[str, dict[int, float]]) -> list[str]:
    """The teacher against the student alone, the first condition for distillation to help."""
    teacher = next((ev for exp in exps.values() if (ev := _metrics(exp, "reports/evaluate/teacher/metrics.json"))), None)
    if teacher is None or not by_variant.get("none"):
        return []
    score, alone = teacher["published"]["mean"]["meanDic"], statistics.mean(by_variant["none"].values())
    return [f"Teacher {score:.4f} against the student alone {alone:.4f} (mean over its seeds): {score - alone:+.4f} "
            "(the goal: at least +0.03).", ""]


def commands(seeds: list[int], done: dict[str, dict]) -> list[str]:
    return ["```bash", "git clone . ../kdas-bench && cd ../kdas-bench",
            "python -m venv .venv && .venv/bin/pip install -e '.[test]'",
            f".venv/bin/python benchmarks/real_cpu.py --seeds {' '.join(map(str, seeds))}"
            "   # imports ../shared/datasets, `kdas params use real-cpu`, then:",
            *[f"#   dvc exp run -n {name} " + " ".join(f"-S {s}" for s in settings) for name, settings in plan(seeds, done).items()],
            ".venv/bin/python benchmarks/real_cpu.py --report-only   # this file again, from `dvc exp show`", "```", ""]


def report(seeds: list[int], reading: str) -> str:
    exps = {k: v for k, v in experiments().items() if k.startswith("real-cpu-")}
    if not exps:
        sys.exit("no real-cpu experiment found (`dvc exp show`); run without --report-only first")
    by_variant = scores_by_seed(exps)
    lines = ["# Real-data KDAS benchmark on a 2-core CPU", "", READING, "", reading.strip() or "(to be written: what the numbers say)", "",
             "## Commands", "", *commands(seeds, exps),
             "## Results", "",
             "Measured here by `python benchmarks/real_cpu.py` (see its docstring); every row is a DVC experiment",
             "(`dvc exp show`), tracked in MLflow (`mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db`).", "",
             "Mean over the three test sets of the student's meanDic (`published` maps), per seed (`distill.seed`; the teacher is",
             "the same for all):", "", *seed_table(by_variant), "", *teacher_gap(exps, by_variant),
             "Paired differences, each method minus the student alone with the same seed:", "", *paired_table(by_variant), "",
             "Maps prepared as the published test scripts do (`published`: min-max normalised sigmoid, 8-bit), scored",
             "with the standard protocol (UACANet port of PraNet's toolbox); meanDic under `calibrated` maps beside it.", ""]
    header = "| model | test set | meanDic | meanIoU | wFm | Sm | MAE | maxDic | meanDic (calibrated) |"
    rows = [header, "|---|---|---|---|---|---|---|---|---|"]
    seen_teacher = False
    cost = ["", "| model | params (M) | GMACs | CPU latency, batch 1 (ms) | best epoch / run | best val meanDic | train time (s) |",
            "|---|---|---|---|---|---|---|"]
    for name, exp in sorted(exps.items()):
        roles = [("student", name)] + ([] if seen_teacher else [("teacher", "teacher (EfficientNet-Lite2)")])
        seen_teacher = True
        for role, label in roles:
            ev = _metrics(exp, f"reports/evaluate/{role}/metrics.json")
            if not ev:
                continue
            for ds, m in ev["published"].items():
                cal = ev["datasets"][ds]["meanDic"]
                rows.append(f"| {label} | {ds} | {m['meanDic']:.4f} | {m['meanIoU']:.4f} | {m['wFm']:.4f} | {m['Sm']:.4f} | {m['mae']:.4f} "
                            f"| {m['maxDic']:.4f} | {cal:.4f} |")
            tr = _metrics(exp, f"models/{role}/metrics.json")
            e = ev["efficiency"]
            cost.append(f"| {label} | {e['params_m']:.2f} | {e['gmacs']:.2f} | {e['latency_ms']:.1f} | {tr.get('best_epoch', '?')} / "
                        f"{tr.get('epochs_run', '?')} | {tr.get('best_val_meanDic', float('nan')):.4f} | {tr.get('train_seconds', float('nan')):.0f} |")
    lines += rows + cost
    lines += ["", "Published numbers for reference (theirs, not measured here: GPU, 352 px, 100 epochs, PVTv2-B2 teacher",
              "and PVTv2-B0 student, epoch picked on the test sets):", "", "| model | test set | meanDic | meanIoU | MAE |", "|---|---|---|---|---|"]
    for label, sets in PUBLISHED.items():
        for ds, (dice, iou, mae) in sets.items():
            lines.append(f"| {label} | {ds} | {dice:.3f} | {iou:.3f} | {'-' if mae is None else f'{mae:.3f}'} |")
    lines += ["", "Experiments (DVC experiment commit, at baseline git commit): "
              + ", ".join(f"`{k}` ({(v['rev'] or '?')[:7]} at {(v['baseline'] or '?')[:7]})" for k, v in sorted(exps.items())), ""]
    lines += lineage()
    return "\n".join(lines)


def lineage() -> list[str]:
    """The code, data and MLflow runs behind the table."""
    from kdas.provenance import dvc_hashes

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, capture_output=True).stdout.strip()
    hashes = dvc_hashes(ROOT)
    lines = ["## Lineage", "", f"- code: git commit `{commit}` (the latest baseline; each experiment names its own above)",
             f"- data: `data/manifest.parquet` md5 `{hashes.get('data/manifest.parquet', '?')}`; "
             + ", ".join(f"`{k}` `{v}`" for k, v in sorted(hashes.items()) if k.startswith("data/raw/"))]
    store = ROOT / "mlflow" / "mlflow.db"
    if store.exists():
        import sqlite3

        runs = sqlite3.connect(store).execute(
            "select r.name, r.run_uuid, r.status, group_concat(p.key || '=' || p.value, ' ') from runs r left join params p "
            "on p.run_uuid = r.run_uuid and (p.key like 'distill%' or p.key = 'train.seed') "
            "where r.name like 'train_%' group by r.run_uuid order by r.start_time").fetchall()

        def settings(params: str) -> str:  # flat keys (distill.alpha=0.1 ...) or one repr (distill=DistillParams(...))
            found = dict(re.findall(r"(method|attention|alpha|seed)\W{1,2}([\w.]+)", params or ""))
            return ", ".join(f"{k} {found[k]}" for k in ("method", "attention", "alpha", "seed") if k in found)

        lines.append("- MLflow runs (`mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db`): "
                     + "; ".join(f"{name} ({settings(p)}) `{run}` ({status})" for name, run, status, p in runs))
    return lines + [""]


READING = "## What the numbers say"


def kept_reading() -> str:
    """The hand-written reading of the existing results file, which a rebuild keeps."""
    if not RESULTS.exists():
        return ""
    text = RESULTS.read_text()
    if READING not in text:
        return ""
    after = text.split(READING, 1)[1]
    return after.split("\n## ", 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report-only", action="store_true", help="rebuild the table from the experiments already run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="distill.seed of each round of students")
    args = parser.parse_args()
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    if not args.report_only:
        run(args.seeds)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = report(args.seeds, kept_reading())
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
