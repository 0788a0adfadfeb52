"""`kdas ...`: the command group, one line per expected failure, and params.yaml read once.

Every command lives in kdas/commands/, one module per command group (parse, call the
feature, print). This file names them in COMMANDS and imports a command's module only when that command runs, so a command
runs its own code and no other command's (and a DVC stage depends on its command alone).
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import re
import sys
from pathlib import Path

import click
from click.utils import make_default_short_help

from kdas.config import Params, load_params

ROLES = ("teacher", "student")
RAW = Path("data/raw")
MANIFEST = Path("data/manifest.parquet")
REPORTS = Path("reports")

# Every command: "module:object", and its summary for `kdas --help` (the first paragraph of
# its help), so that listing the commands imports none of them (the training group loads
# torch). tests/test_cli.py holds each summary to the command's own.
COMMANDS = {
    "data": ("kdas.commands.data:data", "Import, fetch or generate datasets and build the manifest."),
    "validate": ("kdas.commands.validate:validate", "Check the data contract; exit 1 naming each failing file and rule."),
    "params": ("kdas.commands.params:params", "Named parameter profiles (params.yaml `profiles:`)."),
    "plots": ("kdas.commands.plots:plots_cmd", "`dvc plots show` that works offline (chart libraries inlined), plus PNGs."),
    "import-teacher": ("kdas.commands.import_teacher:import_teacher",
                       "Turn an official Polyp-PVT checkpoint (PolypPVT.pth) into a kdas model file."),
    "train": ("kdas.commands.train:train", "Train the teacher, or distil it into the student."),
    "evaluate": ("kdas.commands.evaluate:evaluate", "Score a model on every test set by the standard protocol."),
    "metrics": ("kdas.commands.metrics:metrics_cmd", "Score saved prediction maps (8-bit PNG, value/255 = probability) against masks."),
    "register": ("kdas.commands.register:register", "Log the model to MLflow and register it as a new version, alias `challenger`."),
    "promote": ("kdas.commands.promote:promote",
                "Move `champion` to a registered version if it passes the gate in params.yaml (register.gate)."),
    "rollback": ("kdas.commands.promote:rollback", "Put `champion` back on the version that held it before."),
    "predict": ("kdas.commands.predict:predict", "Segment images: writes <stem>_mask.png (0/255) and <stem>_overlay.jpg to --out."),
    "monitor": ("kdas.commands.monitor:monitor", "Compare the frames in IMAGES_DIR with the model's training frames and say whether they drifted."),
    "export": ("kdas.commands.export:export_cmd",
               "Export a model to ONNX (dynamic batch, its training size, metadata) for onnxruntime."),
}  # fmt: skip


class KdasGroup(click.Group):
    """The root group: loads a command from COMMANDS when it is run (or its help asked for),
    and turns expected failures (bad data, bad params, missing files, a full disk, a failing
    tracking store) into one clear line and exit 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return super().get_command(ctx, name)
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """`kdas --help`: the summaries in COMMANDS, shortened as click shortens a command's own."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = [(name, make_default_short_help(COMMANDS[name][1], limit) if name in COMMANDS
                 else super().get_command(ctx, name).get_short_help_str(limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException):  # --help, usage errors: click's own
            raise
        except Exception as exc:
            line = None if ctx.obj and ctx.obj.get("debug") else _one_line(exc)
            if line is None:
                raise
            click.secho(f"error: {line}", fg="red", err=True)
            sys.exit(1)


# an output kdas may not write: a read-only folder or disk, another user's folder, a mount point
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.EBUSY)


def _one_line(exc: Exception) -> str | None:
    """What an expected failure says in one line; None for a bug (its traceback is wanted)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"disk full{where} (no space left on the device): free some space and run the command again; nothing half-written was kept"
    if isinstance(exc, OSError) and exc.errno in _UNWRITABLE:
        from kdas.io import target_of  # (numpy, PIL: not for every command's start)

        # pyarrow's OSError names the file in its text only
        name = exc.filename or next(iter(re.findall(r"'([^']+)'", str(exc))), "the output")
        return (f"cannot write {target_of(os.fspath(name))}: {os.strerror(exc.errno).lower()}; choose another output (--out) or "
                "make it writable; nothing half-written was kept")
    if isinstance(exc, (ValueError, FileNotFoundError, RuntimeError)):
        return str(exc)
    store = sys.modules.get("kdas.tracking.store")  # not loaded: no MLflow call was made, no store failed
    return store.store_error(exc) if store else None


def params_of(ctx: click.Context) -> Params:
    """params.yaml, read and checked once per command."""
    root = ctx.find_root()
    if "params" not in root.obj:
        root.obj["params"] = load_params(root.obj["params_path"])
    return root.obj["params"]


def role_option(f):
    return click.option("--role", type=click.Choice(ROLES), default="student", show_default=True, help="Which model.")(f)


def registry_name(ctx: click.Context, role: str) -> str:
    r = params_of(ctx).register
    return r.student_name if role == "student" else r.teacher_name


@click.group(cls=KdasGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False), help="Parameters file.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, and full tracebacks on errors.")
@click.version_option(package_name="kdas")
@click.pass_context
def main(ctx: click.Context, params_path: str, verbose: bool) -> None:
    """KDAS polyp segmentation: data, distillation, evaluation and registry.

    Run from the project root. Each command is one pipeline stage (dvc.yaml wires them;
    `dvc repro` runs them all).
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("PIL", "matplotlib", "urllib3", "git", "alembic", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = {"params_path": params_path, "debug": verbose}
