"""`kdas validate`: the data contract, checked before any training starts.

A Great Expectations suite runs over the manifest (one row per image/mask pair), plus
leakage checks across splits. Each failed rule is reported with the files that broke it;
errors fail the run, warnings are only reported. Great Expectations is imported lazily:
its import alone costs about two seconds.
"""

from __future__ import annotations

import html
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kdas.config import ValidationParams
from kdas.data.catalog import CATALOG
from kdas.data.splits import hamming
from kdas.io import write_text

log = logging.getLogger(__name__)

SPLITS = ["train", "val", "test"]


@dataclass
class Finding:
    rule: str
    severity: str  # error | warning
    file: str
    detail: str
    other: str = ""  # the file a (near-)duplicate finding pairs `file` with


@dataclass
class RuleResult:
    rule: str
    severity: str
    description: str
    failed: int


@dataclass
class ValidationReport:
    n_pairs: int
    counts: dict[str, dict[str, int]]
    rules: list[RuleResult] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def success(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"success": self.success, "n_pairs": self.n_pairs, "n_errors": len(self.errors), "n_warnings": len(self.warnings),
                "counts": self.counts, "rules": [asdict(r) for r in self.rules], "findings": [asdict(f) for f in self.findings]}


def _row_file(row: pd.Series) -> str:
    return str(row["image_path"] or row["mask_path"])


def _suite(params: ValidationParams):
    """(expectation, rule name, severity, what it means, how to describe a failing row)."""
    import great_expectations as gx

    E = gx.expectations
    size = lambda r: f"image {r['width']}x{r['height']}, mask {r['mask_width']}x{r['mask_height']}"  # noqa: E731
    return [
        (E.ExpectColumnValuesToBeInSet(column="error", value_set=[""]), "decodable", "error",
         "every image and mask decodes (a mask's foreground can be told: kdas.io.read_mask) and has its partner",
         lambda r: r["error"]),
        (E.ExpectCompoundColumnsToBeUnique(column_list=["dataset", "id"]), "unique_ids", "error",
         "ids are unique within a dataset", lambda r: f"id {r['id']} appears more than once in {r['dataset']}"),
        (E.ExpectColumnPairValuesToBeEqual(column_A="width", column_B="mask_width", ignore_row_if="either_value_is_missing"),
         "mask_size", "error", "image and mask have the same width", size),
        (E.ExpectColumnPairValuesToBeEqual(column_A="height", column_B="mask_height", ignore_row_if="either_value_is_missing"),
         "mask_size", "error", "image and mask have the same height", size),
        (E.ExpectColumnValuesToBeBetween(column="width", min_value=params.min_size, max_value=params.max_size), "image_size", "error",
         f"width within {params.min_size}..{params.max_size} px", lambda r: f"width {r['width']}"),
        (E.ExpectColumnValuesToBeBetween(column="height", min_value=params.min_size, max_value=params.max_size), "image_size", "error",
         f"height within {params.min_size}..{params.max_size} px", lambda r: f"height {r['height']}"),
        (E.ExpectColumnValuesToBeInSet(column="channels", value_set=[3]), "three_channels", "error",
         "3 colour channels after conversion", lambda r: f"{r['channels']} channels (source mode {r['mode']})"),
        (E.ExpectColumnValuesToBeBetween(column="nonbinary_fraction", max_value=params.max_nonbinary_fraction), "binary_mask", "error",
         f"at most {params.max_nonbinary_fraction:.0%} of mask pixels far from 0 and 255",
         lambda r: f"{r['nonbinary_fraction']:.1%} of mask pixels are near neither 0 nor 255"),
        (E.ExpectColumnValuesToBeBetween(column="foreground_fraction", max_value=params.max_foreground_fraction), "foreground_fraction",
         "error", f"polyp covers at most {params.max_foreground_fraction:.0%} of the frame",
         lambda r: f"mask foreground {r['foreground_fraction']:.1%}"),
        (E.ExpectColumnValuesToBeInSet(column="split", value_set=SPLITS), "split", "error", "split is train, val or test",
         lambda r: f"split '{r['split']}'"),
        (E.ExpectColumnValuesToBeBetween(column="foreground_fraction", min_value=0, strict_min=True), "empty_mask", "warning",
         "the frame shows a polyp (an empty mask is allowed but unusual)", lambda r: "empty mask"),
        (E.ExpectColumnValuesToNotBeInSet(column="mode", value_set=["L", "LA", "I;16", "I"]), "grayscale_image", "warning",
         "colour frames (a grey frame is replicated to 3 channels)", lambda r: f"source mode {r['mode']}"),
    ]


def _run_suite(df: pd.DataFrame, params: ValidationParams, report: ValidationReport) -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no network calls
    import great_expectations as gx

    # it sets this logger to INFO itself ("Created temporary directory ... for ephemeral docs site")
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    batch = (
        context.data_sources.add_pandas("manifest").add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    )
    checks = _suite(params)
    suite = gx.ExpectationSuite(name="kdas-data-contract")
    for n, (expectation, *_rest) in enumerate(checks):
        expectation.meta = {"check": n}
        suite.add_expectation(expectation)
    result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
    for res in result.results:
        _, rule, severity, description, explain = checks[res.expectation_config.meta["check"]]
        if res.exception_info and res.exception_info.get("raised_exception"):
            raise RuntimeError(f"data contract rule '{rule}' could not run: {res.exception_info.get('exception_message')}")
        bad = sorted(set(res.result.get("unexpected_index_list") or []))
        report.rules.append(RuleResult(rule, severity, description, len(bad)))
        for i in bad:
            row = df.loc[i]
            report.findings.append(Finding(rule, severity, _row_file(row), str(explain(row))))


def _counts(df: pd.DataFrame, report: ValidationReport) -> None:
    missing = [s for s in SPLITS if s not in set(df["split"])]
    report.rules.append(RuleResult("splits_present", "error", "the manifest has train, val and test images", len(missing)))
    for s in missing:
        report.findings.append(Finding("splits_present", "error", "(manifest)", f"no '{s}' images; add data or change data.split"))
    expected_total = 0
    for dataset, n in df.groupby("dataset").size().items():
        entry = CATALOG.get(str(dataset))
        if entry and entry.images and n != entry.images:
            expected_total += 1
            report.findings.append(Finding("release_count", "warning", f"data/raw/{dataset}", f"{n} pairs, the public release has {entry.images}"))
    report.rules.append(RuleResult("release_count", "warning", "catalogued datasets have their release's number of pairs", expected_total))


def _leakage(df: pd.DataFrame, params: ValidationParams, report: ValidationReport) -> None:
    """Exact copies across splits are errors; near-duplicates (video frames of the same polyp,
    present in the published PraNet split itself) are warnings, listed for the reader."""
    ok = df[df["image_sha256"].notna() & df["phash"].notna()].reset_index(drop=True)
    split = ok["split"].to_numpy(dtype=object)
    exact = ok["image_sha256"].to_numpy(dtype=object)
    pairs = ("train_val", "test_train", "test_val")
    counts = {"duplicate_across_splits": 0, "duplicate_within_split": 0, **{f"near_duplicate_{p}": 0 for p in pairs}}
    dist = hamming(np.array([int(h, 16) for h in ok["phash"]], dtype=np.uint64)) if len(ok) else np.zeros((0, 0))
    for i, j in zip(*np.nonzero(np.triu(dist <= params.near_duplicate_distance, k=1))):
        a, b = ok.loc[i], ok.loc[j]
        same_bytes = exact[i] == exact[j]
        if split[i] != split[j]:
            rule = "duplicate_across_splits" if same_bytes else f"near_duplicate_{'_'.join(sorted((split[i], split[j])))}"
            severity = "error" if same_bytes else "warning"
        elif same_bytes:
            rule, severity = "duplicate_within_split", "warning"
        else:
            continue
        counts[rule] += 1
        what = "the same file" if same_bytes else f"a near-duplicate (hash distance {dist[i, j]})"
        report.findings.append(Finding(rule, severity, a["image_path"], f"{what} of {b['image_path']}: {split[i]} vs {split[j]}",
                                       b["image_path"]))
    report.rules += [
        RuleResult("duplicate_across_splits", "error", "no image is in two splits", counts["duplicate_across_splits"]),
        *(RuleResult(f"near_duplicate_{p}", "warning", f"no near-duplicate image in both {' and '.join(p.split('_'))}",
                     counts[f"near_duplicate_{p}"]) for p in pairs),
        RuleResult("duplicate_within_split", "warning", "no image twice in one split", counts["duplicate_within_split"]),
    ]


def validate_manifest(df: pd.DataFrame, params: ValidationParams) -> ValidationReport:
    counts = {str(d): {str(s): int(n) for s, n in g.groupby("split").size().items()} for d, g in df.groupby("dataset")}
    report = ValidationReport(n_pairs=len(df), counts=counts)
    if len(df) == 0:
        report.rules.append(RuleResult("non_empty", "error", "the manifest lists at least one pair", 1))
        report.findings.append(Finding("non_empty", "error", "(manifest)", "no image/mask pairs; check data.datasets in params.yaml"))
        return report
    _run_suite(df.reset_index(drop=True), params, report)
    _counts(df, report)
    _leakage(df, params, report)
    return report


THUMB_PX = 96  # a thumbnail's longer side in the page
MAX_THUMBS = 300  # thumbnails per page at most (the page stays a few MB on a large dataset)


def thumbnail(path: str, size: int = THUMB_PX) -> str | None:
    """A small inline JPEG of an image file (a data: URI), or None where it cannot be read."""
    import base64
    import io

    from PIL import Image

    try:
        with Image.open(path) as im:
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="JPEG", quality=70)
    except Exception:  # unreadable is what some findings are about: the page says so instead
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _groups(findings: list[Finding]) -> list[list[str]]:
    """Files linked by (near-)duplicate findings, as connected groups (video frames of one polyp
    come as chains of pairs), largest first."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for f in findings:
        parent[root(f.file)] = root(f.other)
    groups: dict[str, list[str]] = {}
    for x in sorted(parent):
        groups.setdefault(root(x), []).append(x)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def _findings_html(report: ValidationReport) -> str:
    """Findings by rule, errors first: a thumbnail of each file; duplicates as groups of files."""
    e = html.escape
    budget = [MAX_THUMBS]

    def thumb(path: str) -> str:
        if budget[0] <= 0:
            return "<span class='nothumb'>(no more thumbnails)</span>"
        budget[0] -= 1
        uri = thumbnail(path)
        return f"<img src='{uri}' alt='{e(path)}' title='{e(path)}'>" if uri else "<span class='nothumb'>unreadable</span>"

    by_rule: dict[str, list[Finding]] = {}
    for f in sorted(report.findings, key=lambda f: (f.severity != "error", f.rule)):
        by_rule.setdefault(f.rule, []).append(f)
    parts = []
    for rule, found in by_rule.items():
        severity = found[0].severity
        parts.append(f"<details{' open' if severity == 'error' or len(found) <= 50 else ''}><summary><b class='{severity}'>{e(severity)}</b> "
                     f"<code>{e(rule)}</code>: {len(found)} finding{'s' * (len(found) != 1)}</summary>")
        if all(f.other for f in found):
            groups = _groups(found)
            parts.append(f"<p>{len(groups)} group{'s' * (len(groups) != 1)} of files; each group's details below its pictures.</p>")
            details = {}
            for f in found:
                details.setdefault(f.file, []).append(f.detail)
            for group in groups[:200]:
                cells = "".join(f"<figure>{thumb(x)}<figcaption>{e(Path(x).name)}</figcaption></figure>" for x in group)
                lines = "".join(f"<li><code>{e(x)}</code>: {e(d)}</li>" for x in group for d in details.get(x, []))
                parts.append(f"<div class='group'><div class='thumbs'>{cells}</div><ul>{lines}</ul></div>")
        else:
            rows = "".join(f"<tr><td>{thumb(f.file) if Path(f.file).is_file() else ''}</td><td><code>{e(f.file)}</code></td><td>{e(f.detail)}</td></tr>"
                           for f in found[:500])
            parts.append(f"<table><tr><th>picture</th><th>file</th><th>detail</th></tr>{rows}</table>")
        parts.append("</details>")
    return "".join(parts) or "<p>None.</p>"


def render_html(report: ValidationReport) -> str:
    status = "PASSED" if report.success else "FAILED"
    colour = "#1a7f37" if report.success else "#cf222e"
    e = html.escape
    rules = "".join(
        f"<tr><td>{e(r.rule)}</td><td>{e(r.severity)}</td><td>{e(r.description)}</td>"
        f"<td style='color:{'#1a7f37' if not r.failed else ('#cf222e' if r.severity == 'error' else '#9a6700')}'>{r.failed}</td></tr>"
        for r in report.rules
    )
    counts = "".join(f"<tr><td>{e(d)}</td>" + "".join(f"<td>{c.get(s, 0)}</td>" for s in SPLITS) + "</tr>" for d, c in report.counts.items())
    findings = _findings_html(report)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>kdas data contract</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}th{{background:#f4f4f4}}
details{{margin:.6em 0}}summary{{cursor:pointer;font-size:1.05em}}.error{{color:#cf222e}}.warning{{color:#9a6700}}
.group{{border:1px solid #ddd;border-radius:6px;padding:6px;margin:6px 0}}.thumbs{{display:flex;flex-wrap:wrap;gap:6px}}
figure{{margin:0;text-align:center;font-size:.75em}}img{{max-height:{THUMB_PX}px;border-radius:3px}}.nothumb{{color:#888;font-size:.8em}}
ul{{margin:.3em 0;font-size:.85em}}</style></head><body>
<h1>Data contract: <span style="color:{colour}">{status}</span></h1>
<p>{report.n_pairs} image/mask pairs, {len(report.errors)} errors, {len(report.warnings)} warnings.</p>
<h2>Pairs per dataset and split</h2><table><tr><th>dataset</th>{''.join(f'<th>{s}</th>' for s in SPLITS)}</tr>{counts}</table>
<h2>Rules</h2><table><tr><th>rule</th><th>severity</th><th>expects</th><th>failing</th></tr>{rules}</table>
<h2>Findings</h2>{findings}
</body></html>"""


def write_report(report: ValidationReport, json_path: str | Path, html_path: str | Path) -> None:
    write_text(json_path, json.dumps(report.to_dict(), indent=2))
    write_text(html_path, render_html(report))
