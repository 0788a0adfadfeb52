"""The real-data KDAS benchmark on a CPU: the PraNet split, an EfficientNet-Lite2 teacher and
EfficientNet-Lite0 students (ImageNet weights from ../shared/weights), one DVC experiment
per distillation method, each tracked in MLflow. Writes benchmarks/results/real-cpu.md.

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
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASETS = {"kvasir-seg": "kvasir-seg", "cvc-clinicdb": "cvc-clinicdb", "cvc-colondb": "cvc-colondb"}
METHODS = ("none", "sgm", "kdas")
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


def plan(seeds: list[int]) -> dict[str, list[str]]:
    """Experiment name -> its `dvc exp run -S` settings, in the order they run: every method on
    the first seed, then KDAS's variants (a weaker attention term, the pairwise form) on it, then
    every method on each further seed. `distill.seed` seeds the student alone, so DVC's run
    cache trains the teacher once for all of them."""
    first, *others = seeds
    runs = {f"real-cpu-{m}-seed{first}": [f"distill.method={m}", f"distill.seed={first}"] for m in METHODS}
    runs[f"real-cpu-kdas-alpha0.1-seed{first}"] = ["distill.method=kdas", "distill.alpha=0.1", f"distill.seed={first}"]
    runs[f"real-cpu-kdas-pairwise-seed{first}"] = ["distill.method=kdas", "distill.attention=pairwise", f"distill.seed={first}"]
    for seed in others:
        runs |= {f"real-cpu-{m}-seed{seed}": [f"distill.method={m}", f"distill.seed={seed}"] for m in METHODS}
    return runs


def run(seeds: list[int]) -> None:
    for name, folder in DATASETS.items():
        if not (ROOT / "data" / "raw" / name).exists():
            sh("kdas", "data", "import", str(SHARED / "datasets" / folder))
    sh("kdas", "params", "use", "real-cpu")
    for exp, settings in plan(seeds).items():
        if exp in experiments():
            print(f"{exp}: already run, kept", flush=True)
            continue
        started = time.time()
        sh("dvc", "exp", "run", "-n", exp, *[arg for s in settings for arg in ("-S", s)])
        print(f"{exp}: {(time.time() - started) / 60:.1f} min", flush=True)


def experiments() -> dict[str, dict]:
    """name -> {params, metrics (file -> data), rev} from `dvc exp show --json`."""
    raw = json.loads(subprocess.run(["dvc", "exp", "show", "--all-commits", "--json"], cwd=ROOT, text=True, capture_output=True, check=True).stdout)
    found = {}
    for baseline in raw:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                if rev.get("name"):
                    found[rev["name"]] = {"rev": rev.get("rev"), "params": data.get("params", {}), "metrics": data.get("metrics", {})}
    return found


def _metrics(exp: dict, path: str) -> dict:
    return (exp["metrics"].get(path) or {}).get("data") or {}


def report() -> str:
    exps = {k: v for k, v in experiments().items() if k.startswith("real-cpu-")}
    if not exps:
        sys.exit("no real-cpu experiment found (`dvc exp show`); run without --report-only first")
    lines = ["# Real-data KDAS benchmark on a 2-core CPU", "",
             "Measured here by `python benchmarks/real_cpu.py` (see its docstring); every row is a DVC experiment",
             "(`dvc exp show`), tracked in MLflow (`mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db`).", "",
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
    lines += ["", "Experiments: " + ", ".join(f"`{k}` ({v['rev'][:7] if v['rev'] else '?'})" for k, v in sorted(exps.items())), ""]
    lines += lineage()
    return "\n".join(lines)


def lineage() -> list[str]:
    """The code, data and MLflow runs behind the table."""
    from kdas.provenance import dvc_hashes

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, capture_output=True).stdout.strip()
    hashes = dvc_hashes(ROOT)
    lines = ["## Lineage", "", f"- code: git commit `{commit}` (the experiments' baseline)",
             f"- data: `data/manifest.parquet` md5 `{hashes.get('data/manifest.parquet', '?')}`; "
             + ", ".join(f"`{k}` `{v}`" for k, v in sorted(hashes.items()) if k.startswith("data/raw/"))]
    store = ROOT / "mlflow" / "mlflow.db"
    if store.exists():
        import sqlite3

        rows = sqlite3.connect(store).execute(
            "select r.name, r.run_uuid, r.status, coalesce(p.value, '') from runs r left join params p "
            "on p.run_uuid = r.run_uuid and p.key in ('distill', 'distill.method') "
            "where r.name like 'train_%' order by r.start_time").fetchall()
        def method(value: str) -> str:  # "DistillParams(method='kdas', ...)" or "kdas"
            found = re.search(r"method=.([a-z]+)", value)
            return found.group(1) if found else value

        lines.append("- MLflow runs (`mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db`): "
                     + "; ".join(f"{name} {method(m)} `{run}` ({status})" for name, run, status, m in rows))
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report-only", action="store_true", help="rebuild the table from the experiments already run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="distill.seed of each round of students")
    args = parser.parse_args()
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    if not args.report_only:
        run(args.seeds)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = report()
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
