"""The real-data distillation benchmark on a CPU, round three: does distillation earn its cost?

The PraNet split of Kvasir-SEG + CVC-ClinicDB (CVC-ColonDB test only), an EfficientNet-Lite2
teacher and EfficientNet-Lite0 students with the ImageNet weights of ../shared/weights (the
`real-cpu` profile). Every student trains on the same input pipeline and one schedule
(SCHEDULE, chosen on val for the student alone); the methods differ only by their teacher terms.

    python benchmarks/real_cpu.py              # every step not done yet, in order; kill and rerun at will
    python benchmarks/real_cpu.py --plan       # what is done and what would run
    python benchmarks/real_cpu.py --report-only

Run it in a clone of its own (the experiments rewrite params.yaml and the workspace's outputs),
alone on the CPU or with OMP_WAIT_POLICY=PASSIVE (two PyTorch processes spinning on 2 cores
slow each other down up to 30x): `git clone . ../kdas-bench && cd ../kdas-bench &&
OMP_WAIT_POLICY=PASSIVE python benchmarks/real_cpu.py`. The steps:

1. the data (`kdas data import` x3, `kdas params use real-cpu`, `dvc repro validate`);
2. the teacher, trained once per workspace (`kdas train teacher --resume`: a killed run
   continues), scored on the test sets (`kdas evaluate --role teacher`) and on train and val
   (its headroom), and recorded in dvc.lock (`dvc commit train_teacher`); a fresh clone
   trains it again with the same recipe and seed, and every student records which teacher
   it learnt from;
3. the control check: each method at teacher weight 0 against method none, 2 short epochs on
   real frames, in process: the same val meanDic and structure loss at every epoch or the
   benchmark stops; then each method's training speed, measured in one process (`speed`);
4. the students, one DVC experiment each, trained as `dvc exp run -s distill
   evaluate@student -n NAME -S ...` would train them, but resumably (`student`: one killed
   with its session continues from its last epoch); the teacher is not retrained. Seed 0
   runs the student alone and every variant of GRID; the variant of each method with the
   best val meanDic (never a test score) goes on to seeds 1 and 2, the student alone too;
   then the equal-time arm (the student alone trained as much longer as the slowest
   distilled method is slower, by `speed`'s ratio).

Each finished student is written at once to benchmarks/results/real-cpu.json (commit it as it
grows: a rerun skips what it holds), and real-cpu.md is made from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASETS = ("kvasir-seg", "cvc-clinicdb", "cvc-colondb")
RESULTS = ROOT / "benchmarks" / "results"
JSON, MD = RESULTS / "real-cpu.json", RESULTS / "real-cpu.md"
SEEDS = (0, 1, 2)
# the students' schedule (the official StepLR, x0.1): chosen on val for the student alone on
# seed 0 and used unchanged in every arm; its best val epoch must not be one of the last two
SCHEDULE = {"train.epochs": 14, "train.decay_epochs": 6}
# how `speed` measures each method's training rate: the best of 3 interleaved rounds of 12 steps
SPEED = {"rounds": 3, "steps": 12}
# each method's variants, tried on seed 0 (one each: params.yaml's defaults, so that no method
# gets more tries on val than another); `none` is the control
GRID = {
    "none": {"none": {}},
    "kd": {"kd-w1-t1": {"weight": 1.0, "temperature": 1.0}},
    "sgm": {"sgm-w0.43": {"weight": 0.43}},  # the official recipe's ratio (alpha 0.3)
    "kdas": {"kdas-corr-w0.43": {"weight": 0.43, "attention": "correlation"}},
}
EQUAL_TIME = "none-equal-time"


def sh(*cmd: str) -> str:
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(out.stdout[-3000:], flush=True)
    if out.returncode:
        sys.exit(f"`{' '.join(cmd)}` failed (exit {out.returncode})")
    return out.stdout


def read(path: str | Path) -> dict:
    path = ROOT / path
    return json.loads(path.read_text()) if path.exists() else {}


def load() -> dict:
    return json.loads(JSON.read_text()) if JSON.exists() else {"runs": {}}


def save(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = JSON.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    tmp.replace(JSON)


def machine() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, {'AVX-512' if 'avx512f' in flags else 'AVX2'}"


# -- 1, 2: data and teacher ------------------------------------------------------------------


def setup() -> None:
    for name in DATASETS:
        if not (ROOT / "data" / "raw" / name).exists():
            sh("kdas", "data", "import", str(SHARED / "datasets" / name))
    from kdas.config import load_params

    if load_params(ROOT / "params.yaml").data.datasets != list(DATASETS):
        sh("kdas", "params", "use", "real-cpu")
    sh("dvc", "repro", "validate")


def teacher(results: dict) -> None:
    from kdas.config import load_params

    epochs = load_params(ROOT / "params.yaml").train.for_role("teacher").epochs
    if read("models/teacher/metrics.json").get("epochs_run") != epochs or not (ROOT / "models/teacher/best.pt").exists():
        sh("kdas", "train", "teacher", "--resume")
    # trained outside `dvc repro` (to resume across sessions): record it in dvc.lock and the
    # cache, so the students' experiments name a teacher DVC can restore (and `dvc exp run`,
    # which checks out the lock's outputs first, does not delete it: round three lost one so)
    sh("dvc", "commit", "--force", "train_teacher")
    sha = _sha(ROOT / "models/teacher/best.pt")
    if sha in results.setdefault("teachers", {}):
        return
    # a session that finds no teacher trains it again with the same recipe and seed; each
    # student records the teacher it learnt from, and each teacher is scored here
    sh("kdas", "evaluate", "--role", "teacher")
    results["teachers"][sha] = {"machine": machine(), **_scores("reports/evaluate/teacher/metrics.json"), **_training("models/teacher"),
                                "headroom": headroom(ROOT / "models/teacher/best.pt")}
    save(results)


def _sha(path: Path) -> str:
    from kdas.io import file_sha256

    return file_sha256(path)


def headroom(model: Path) -> dict[str, float]:
    """The teacher's mean published meanDic on its own train and val frames, beside test: how
    much it knows that the students could learn."""
    import tempfile

    import pandas as pd

    from kdas.evaluation.evaluate import evaluate_model
    from kdas.serving.inference import Segmenter

    manifest = pd.read_parquet(ROOT / "data" / "manifest.parquet")
    seg, found = Segmenter.load(model, "cpu"), {}
    for split in ("train", "val"):
        rows = manifest[manifest["split"] == split].assign(split="test")
        with tempfile.TemporaryDirectory() as out:
            found[split] = evaluate_model(seg, rows, out, batch_size=8, grid_size=1)["published"]["mean"]["meanDic"]
    return found


def _scores(path: str) -> dict:
    ev = read(path)
    return {"published": {d: m["meanDic"] for d, m in ev["published"].items() if d != "mean"}, "mean": ev["published"]["mean"]["meanDic"],
            "calibrated_mean": ev["datasets"]["mean"]["meanDic"], "latency_ms": ev["efficiency"]["latency_ms"]}


def _training(folder: str) -> dict:
    import pandas as pd

    m = read(f"{folder}/metrics.json")
    history = pd.read_csv(ROOT / folder / "history.csv")
    return {"best_val_meanDic": m["best_val_meanDic"], "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
            "train_seconds": m["train_seconds"], "val_curve": [round(v, 4) for v in history["val_meanDic"]],
            "train_structure": [round(v, 4) for v in history["train_structure"]]}


def _distill(distill, method: str, overrides: dict):
    """params.yaml's distill section running `method`, its settings with `overrides` on top."""
    settings = {**distill.settings, method: {**distill.settings.get(method, {}), **overrides}}
    return dataclasses.replace(distill, method=method, settings=settings)


# -- 3: the control --------------------------------------------------------------------------


def control(results: dict) -> None:
    """Each method at teacher weight 0 beside method none on 128 real training frames (32 val),
    2 epochs of 8 steps: the same val meanDic and structure loss at every epoch (within 1e-6)."""
    if "control" in results:
        return
    import tempfile

    import pandas as pd

    from kdas.config import load_params
    from kdas.training import TrainJob, train
    from kdas.training.methods import names

    params = load_params(ROOT / "params.yaml")
    manifest = pd.read_parquet(ROOT / "data" / "manifest.parquet")
    rows = pd.concat([manifest[manifest["split"] == "train"].head(128), manifest[manifest["split"] == "val"].head(32)])
    job = dict(role="student", model=params.model.student, manifest=rows, train=dataclasses.replace(params.train, epochs=2, workers=0),
               teacher=ROOT / "models/teacher/best.pt", max_steps=8)
    with tempfile.TemporaryDirectory() as out:
        histories = {}
        for method in names():
            distill = _distill(params.distill, method, {"weight": 0.0} if method != "none" else {})
            histories[method] = train(TrainJob(**job, out_dir=Path(out) / method, distill=distill)).history
    gaps = {m: max(max(abs(a[k] - b[k]) for k in ("val_meanDic", "train_structure")) for a, b in zip(histories["none"], h))
            for m, h in histories.items() if m != "none"}
    results["control"] = {"max_abs_difference": gaps, "epochs": 2, "steps_per_epoch": 8, "train_frames": 128, "val_frames": 32}
    save(results)
    if any(gap > 1e-6 for gap in gaps.values()):
        sys.exit(f"the control is no control: at teacher weight 0 the methods differ from none by {gaps}")


# -- 4: the students -------------------------------------------------------------------------


def variants() -> dict[str, tuple[str, dict]]:
    return {name: (method, settings) for method, grid in GRID.items() for name, settings in grid.items()}


def chosen(results: dict) -> dict[str, str]:
    """Per method, its variant with the best val meanDic on seed 0 (once all of them ran)."""
    runs, picks = results["runs"], {}
    for method, grid in GRID.items():
        scored = {name: runs[f"{name}-seed0"]["best_val_meanDic"] for name in grid if f"{name}-seed0" in runs}
        if len(scored) == len(grid):
            picks[method] = max(scored, key=scored.get)
    return picks


def speed(results: dict) -> None:
    """Training images per second of each method as the benchmark runs it, measured in one process
    on real frames: SPEED's rounds, the methods interleaved, each round 2 epochs of SPEED's steps
    (the second epoch's rate), and each method's best round (a passing job on the CPU only ever
    slows a round down): the equal-time arm's ratio never mixes machines, sessions or loads.
    A rate measured with another recipe is measured again (round three's first, one round of
    10 steps, read sgm 2.3x slower than none where its epochs ran 1.75x)."""
    if results.get("speed", {}).get("recipe") == SPEED:
        return
    import tempfile

    import pandas as pd

    from kdas.config import load_params
    from kdas.training import TrainJob, train

    params = load_params(ROOT / "params.yaml")
    manifest = pd.read_parquet(ROOT / "data" / "manifest.parquet")
    rows = pd.concat([manifest[manifest["split"] == "train"].head(160), manifest[manifest["split"] == "val"].head(8)])
    rates = dict.fromkeys(GRID, 0.0)
    recipe = dataclasses.replace(params.train, epochs=2, workers=0)
    with tempfile.TemporaryDirectory() as out:
        for round_ in range(SPEED["rounds"]):
            for method, grid in GRID.items():
                distill = _distill(params.distill, method, next(iter(grid.values())))
                job = TrainJob(role="student", model=params.model.student, manifest=rows, train=recipe, teacher=ROOT / "models/teacher/best.pt",
                               max_steps=SPEED["steps"], out_dir=Path(out) / f"{method}-{round_}", distill=distill)
                rates[method] = max(rates[method], round(train(job).history[-1]["images_per_s"], 3))
    results["speed"] = {"images_per_s": rates, "machine": machine(), "recipe": SPEED}
    save(results)


def equal_time_schedule(results: dict, picks: dict[str, str]) -> dict[str, int] | None:
    """The student alone trained as long as the slowest distilled method: its epochs scaled by
    the ratio of training speeds measured in one process (`speed`), the decay at the same share."""
    if "none-seed0" not in results["runs"] or set(picks) != set(GRID) or "speed" not in results:
        return None
    rates = results["speed"]["images_per_s"]
    ratio = rates["none"] / min(rates[m] for m in GRID if m != "none")
    epochs = round(SCHEDULE["train.epochs"] * ratio)
    return {"train.epochs": epochs, "train.decay_epochs": round(SCHEDULE["train.decay_epochs"] * epochs / SCHEDULE["train.epochs"])}


def plan(results: dict) -> list[tuple[str, list[str]]]:
    """(experiment, its -S settings) in the order they run; what is known decides what follows."""
    todo, picks = [], chosen(results)
    for seed in SEEDS:
        names = list(variants()) if seed == 0 else [picks[m] for m in GRID if m in picks]
        for name in names:
            method, settings = variants()[name]
            todo.append((f"{name}-seed{seed}", [f"distill.method={method}", f"distill.seed={seed}", *(f"{k}={v}" for k, v in SCHEDULE.items()),
                                                *(f"distill.{method}.{k}={v}" for k, v in settings.items())]))
    if schedule := equal_time_schedule(results, picks):
        todo.append((f"{EQUAL_TIME}-seed0", ["distill.method=none", "distill.seed=0", *(f"{k}={v}" for k, v in schedule.items())]))
    return todo


def student(results: dict, name: str, settings: list[str]) -> None:
    """One student, as `dvc exp run -s distill evaluate@student -S ...` would run it, but
    resumable: its settings are written into params.yaml (as -S writes them), it trains with
    --resume (a run killed with its session continues in the next one), is scored, and then
    `dvc exp save` records both stages in dvc.lock and the cache and saves the experiment NAME
    (`dvc exp show` lists them)."""
    import yaml

    from kdas.config import set_params

    started = time.time()
    set_params({key: yaml.safe_load(value) for key, value in (s.split("=", 1) for s in settings)}, ROOT / "params.yaml")
    sh("kdas", "train", "student", "--resume")
    sh("kdas", "evaluate", "--role", "student")
    sh("dvc", "exp", "save", "--force", "-n", name, "distill", "evaluate@student")
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, capture_output=True).stdout.strip()
    results["runs"][name] = {"settings": settings, "baseline": rev, "machine": machine(), "teacher": _sha(ROOT / "models/teacher/best.pt"),
                             **_scores("reports/evaluate/student/metrics.json"), **_training("models/student")}
    save(results)
    print(f"{name}: mean published meanDic {results['runs'][name]['mean']:.4f} ({(time.time() - started) / 60:.1f} min in this run)", flush=True)


def schedule_check(results: dict) -> None:
    run = results["runs"].get("none-seed0")
    if run and run["best_epoch"] > run["epochs_run"] - 2:
        sys.exit(f"the student alone's best val epoch is {run['best_epoch']} of {run['epochs_run']}: not converged; lengthen SCHEDULE "
                 "and rerun (delete the runs of real-cpu.json made with the old one)")


def run() -> None:
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    results = load()
    setup()
    teacher(results)
    control(results)
    speed(results)
    while todo := [(n, s) for n, s in plan(results) if n not in results["runs"]]:
        student(results, *todo[0])
        schedule_check(results)
        write_report(results)


# -- the report ------------------------------------------------------------------------------


def arms(results: dict) -> dict[str, dict[int, dict]]:
    """arm (variant name) -> seed -> run."""
    found: dict[str, dict[int, dict]] = {}
    for name, run in results["runs"].items():
        arm, _, seed = name.rpartition("-seed")
        found.setdefault(arm, {})[int(seed)] = run
    return found


def paired(results: dict) -> list[dict]:
    """Each arm minus the student alone on the same seed: mean, std, t = mean / (std / sqrt(n)),
    per test set, and the share of the teacher - student gap recovered."""
    by_arm, rows = arms(results), []
    alone = by_arm.get("none", {})
    teachers = results.get("teachers", {}).values()
    gap = statistics.mean(t["mean"] for t in teachers) - statistics.mean(r["mean"] for r in alone.values()) if teachers and alone else None
    for arm, seeds in sorted(by_arm.items()):
        common = sorted(s for s in seeds if s in alone)
        if arm == "none" or not common:
            continue
        diffs = [seeds[s]["mean"] - alone[s]["mean"] for s in common]
        mean = statistics.mean(diffs)
        std = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
        rows.append({"arm": arm, "seeds": common, "diffs": diffs, "mean": mean, "std": std,
                     "t": mean / (std / math.sqrt(len(diffs))) if len(diffs) > 1 and std > 0 else math.nan,
                     "per_set": {d: statistics.mean(seeds[s]["published"][d] - alone[s]["published"][d] for s in common) for d in DATASETS},
                     "gap_share": mean / gap if gap else math.nan})
    return rows


def _f(x: float, fmt: str = "+.4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def report(results: dict, reading: str) -> str:
    lines = ["# Real-data distillation benchmark on a 2-core CPU, round three", "", READING, "",
             reading.strip() or "(to be written when the runs are in: what the numbers say)", "",
             "## How it was run", "",
             "`python benchmarks/real_cpu.py` in a clone of its own (its docstring gives every step); each student is a DVC experiment",
             "(`dvc exp show`), trained as `dvc exp run -s distill evaluate@student -S ...` would train it, but resumably.",
             f"Schedule for every student: {SCHEDULE} (StepLR x0.1);",
             "variants chosen on val on seed 0. Round two (another input pipeline for the distilled arms, the convex loss):",
             "[real-cpu-round2.md](real-cpu-round2.md); round one: [real-cpu-round1.md](real-cpu-round1.md).", ""]
    if teachers := results.get("teachers"):
        lines += ["## The teacher", "", "Trained once in the benchmark's clone (again, same recipe and seed, by a clone that has none); "
                  "each student lists the one it learnt from.", "",
                  "| EfficientNet-Lite2, published meanDic | train | val | test (mean of 3) | " + " | ".join(DATASETS) + " | best epoch / run | train s |",
                  "|---|---|---|---|" + "---|" * len(DATASETS) + "---|---|"]
        for sha, t in teachers.items():
            lines.append(f"| `{sha[:8]}` | {t['headroom']['train']:.4f} | {t['headroom']['val']:.4f} | {t['mean']:.4f} | "
                         + " | ".join(f"{t['published'][d]:.4f}" for d in DATASETS) + f" | {t['best_epoch']} / {t['epochs_run']} | {t['train_seconds']:.0f} |")
        notes = [f"- `{sha[:8]}`: {t['note']}." for sha, t in teachers.items() if "note" in t]
        lines += ["", *notes, ""] if notes else [""]
    if c := results.get("control"):
        lines += ["## The control", "", f"Each method at teacher weight 0 against method none ({c['train_frames']} real training frames, "
                  f"{c['epochs']} epochs of {c['steps_per_epoch']} steps), the largest difference of val meanDic or structure loss over the epochs: "
                  + ", ".join(f"{m} {v:.1e}" for m, v in sorted(c["max_abs_difference"].items())) + ".", ""]
    by_arm = arms(results)
    if sp := results.get("speed"):
        rates = sp["images_per_s"]
        cost = [f"{m} {rates[m]:.2f}" + (f" ({rates['none'] / rates[m]:.2f}x slower)" if m != "none" else "") for m in GRID if m in rates]
        epoch_s = {arm: statistics.mean(r["train_seconds"] / r["epochs_run"] for r in seeds.values()) for arm, seeds in by_arm.items()}
        lines += ["## What each method costs", "", f"Training images per second, measured in one process on {sp['machine']} (the best of "
                  f"{sp['recipe']['rounds']} interleaved rounds of 2 epochs of {sp['recipe']['steps']} steps on real frames, the second epoch's "
                  "rate): " + ", ".join(cost) + ". Seconds per epoch in the students' own runs (across sessions, so across loads): "
                  + ", ".join(f"{arm} {t:.0f}" for arm, t in sorted(epoch_s.items())) + ".", ""]
    if by_arm:
        lines += ["## Every student", "", "Mean published meanDic over the three test sets (best val meanDic, epoch / run, training s):", "",
                  "| arm | " + " | ".join(f"seed {s}" for s in SEEDS) + " | mean |", "|---|" + "---|" * (len(SEEDS) + 1)]
        for arm, seeds in sorted(by_arm.items()):
            cells = [f"{seeds[s]['mean']:.4f} ({seeds[s]['best_val_meanDic']:.4f}, {seeds[s]['best_epoch']}/{seeds[s]['epochs_run']}, "
                     f"{seeds[s]['train_seconds']:.0f})" if s in seeds else "-" for s in SEEDS]
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {statistics.mean(r['mean'] for r in seeds.values()):.4f} |")
        lines.append("")
    if rows := paired(results):
        lines += ["## Paired against the student alone", "",
                  "Each arm minus `none` with the same seed (same data order, augmentation and initialisation); t = mean / (std / sqrt(n))"
                  " (one-sided p < 0.05 with three seeds: t > 2.92); gap share = mean / (teacher - none).", "",
                  "| arm | per seed | mean | std | t | " + " | ".join(DATASETS) + " | gap share |", "|---|---|---|---|---|" + "---|" * len(DATASETS) + "---|"]
        for r in rows:
            lines.append(f"| {r['arm']} | " + ", ".join(f"{d:+.4f}" for d in r["diffs"]) + f" | {_f(r['mean'])} | {_f(r['std'], '.4f')} | "
                         f"{_f(r['t'], '+.2f')} | " + " | ".join(_f(r["per_set"][d]) for d in DATASETS) + f" | {_f(r['gap_share'], '+.2f')} |")
        lines.append("")
    lines += ["Machine(s): " + ", ".join(sorted({r["machine"] for r in results["runs"].values()})) if results["runs"] else "", ""]
    return "\n".join(lines)


READING = "## What the numbers say"


def kept_reading() -> str:
    text = MD.read_text() if MD.exists() else ""
    return text.split(READING, 1)[1].split("\n## ", 1)[0] if READING in text else ""


def write_report(results: dict) -> str:
    text = report(results, kept_reading())
    MD.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report-only", action="store_true", help="write real-cpu.md from real-cpu.json, run nothing")
    parser.add_argument("--plan", action="store_true", help="print what is done and what would run next")
    args = parser.parse_args()
    results = load()
    if args.plan:
        for name, settings in plan(results):
            print(("done " if name in results["runs"] else "todo ") + name + " " + " ".join(f"-S {s}" for s in settings))
        return
    if not args.report_only:
        run()
        results = load()
    print(write_report(results))


if __name__ == "__main__":
    main()
