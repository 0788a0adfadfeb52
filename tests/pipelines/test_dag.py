"""dvc.yaml declares what each stage really uses, so `dvc repro` never calls a stale result
up to date; and no more, so that an edit re-runs only the stages that run it. For every
stage, read statically (ast) from its `kdas ...` command:

- the kdas modules it runs: kdas/cli.py and the module of its click command (which cli.py
  imports by name from its COMMANDS table, and no other command's), their module-level
  imports, the imports of the command function and of the command-layer helpers it calls
  (in its module or in cli.py), then every import (module- or function-level) of the library
  modules so reached, transitively, with their packages;
- the params keys it reads: attribute chains on the loaded Params object (`params.train`,
  `params_of(ctx).validation.max_size`, through local aliases and `getattr(x, role)`).

A module must be in the stage's deps (the file, or a folder holding it); a key must be in
its params (the key, or a prefix of it).

Then DVC itself (issue 22): in a DVC repository made of the project's dvc.yaml, params.yaml and
kdas code, an edit of the ONNX exporter or of `kdas predict`'s help leaves the teacher's
training (and the synthetic data) up to date, while an edit of the training command does not.
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from helpers import ROOT, TINY, dvc_project, tool_environ
from kdas.cli import COMMANDS, main
from kdas.training.methods import NONE

# the command layer: cli.py and the modules of the commands; a command runs their top level
# and the functions it calls, not all they import (each command imports its own needs)
COMMAND_LAYER = {"kdas.cli"} | {target.split(":")[0] for target, _ in COMMANDS.values()}
# plug-in packages: each imports, at run time, the one of its modules that a params key names
# (kdas.training.methods: distill.method); a stage that does not read the key runs the default
PLUGINS = {"kdas.training.methods": ("distill", f"kdas.training.methods.{NONE}")}
PARAMS_LOADERS = {"params_of", "load_params"}  # calls that return the Params object


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages, `foreach` expanded as DVC names them (evaluate@student)."""
    stages = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        if "foreach" not in stage:
            stages[name] = stage
            continue
        for item in stage["foreach"]:
            text = yaml.safe_dump(stage["do"]).replace("${item}", str(item))
            stages[f"{name}@{item}"] = yaml.safe_load(text)
    return stages


def click_command(cmd: str) -> tuple[str, str, dict]:
    """(module, function) of a `kdas ...` command line's callback and its arguments' values."""
    words = shlex.split(cmd)
    assert words[0] == "kdas", f"{cmd!r}: a stage is a kdas command"
    command, args = main, words[1:]
    while isinstance(command, click.Group):
        command, args = command.get_command(click.Context(command), args[0]), args[1:]
    ctx = command.make_context(command.name, args, resilient_parsing=True)
    return command.callback.__module__, command.callback.__name__, dict(ctx.params)


# ------------------------------------------------------------------------- kdas modules


def module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(tree: ast.AST, module: str, is_package: bool = False) -> set[str]:
    """Every kdas module an import statement anywhere in `tree` names (with `from pkg import
    sub`, the submodule too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from its package
                package = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}")}
    return {m for m in found if m.split(".")[0] == "kdas" and module_file(m)}


def closure(modules: set[str]) -> set[Path]:
    """The files of `modules`, of their packages and of all they import, transitively; of a
    command-layer module, only what its top level imports."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for k in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
            name = ".".join(parts[:k])
            if name in seen:
                continue
            seen.add(name)
            tree = parsed(name)
            if name in COMMAND_LAYER:
                tree = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
            todo += imported_modules(tree, name, module_file(name).name == "__init__.py")
            if name in PLUGINS:
                todo += [f"{name}.{f.stem}" for f in module_file(name).parent.glob("*.py") if f.stem != "__init__"]
    return {module_file(m).relative_to(ROOT) for m in seen}


@functools.cache
def parsed(module: str) -> ast.Module:
    return ast.parse(module_file(module).read_text())


@functools.cache
def functions(module: str) -> dict[str, ast.FunctionDef]:
    """A command-layer module's functions, by name, with the functions it imports (top level)
    from another command-layer module under the name it uses."""
    tree = parsed(module)
    found = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module in COMMAND_LAYER:
            found |= {a.asname or a.name: functions(node.module)[a.name] for a in node.names if a.name in functions(node.module)}
    return found


# ------------------------------------------------------------------------- command functions and params keys


class CommandReads:
    """What a command function (and the command-layer helpers it calls) imports and reads of Params."""

    def __init__(self) -> None:
        self.modules: set[str] = set()
        self.keys: set[tuple[str, ...]] = set()
        self._seen: set[tuple] = set()

    def visit(self, module: str, name: str, bound: dict) -> None:
        key = (module, name, tuple(sorted((k, v) for k, v in bound.items() if isinstance(v, str))))
        if key in self._seen or name in PARAMS_LOADERS:  # params_of: where Params comes from, no read
            return
        self._seen.add(key)
        fn = functions(module)[name]
        home = next(m for m in sorted(COMMAND_LAYER) if fn in parsed(m).body)  # a helper imported from cli.py: cli.py's
        self.modules |= imported_modules(fn, home) | {home}
        for node in ast.walk(fn):
            for child in ast.iter_child_nodes(node):
                child.parent = node  # type: ignore[attr-defined]
        aliases = self._aliases(fn, bound)
        for node in ast.walk(fn):
            path = params_path(node, aliases, bound)
            if path is not None and not _dereferenced(node, aliases, bound) and not _alias_value(node, aliases):
                self.keys.add(path)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in functions(home):
                callee = functions(home)[node.func.id]
                self.visit(home, node.func.id, _call_bindings(callee, node, bound))

    @staticmethod
    def _aliases(fn: ast.FunctionDef, bound: dict) -> dict[str, tuple[str, ...]]:
        """Local names bound to (a part of) Params: `p = params_of(ctx).data.synth`."""
        aliases: dict[str, tuple[str, ...]] = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                path = params_path(node.value, aliases, bound)
                if path is not None:
                    aliases[node.targets[0].id] = path
        return aliases


def params_path(node: ast.AST, aliases: dict, bound: dict) -> tuple[str, ...] | None:
    """The params key an expression stands for: () for the Params object itself."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id in PARAMS_LOADERS:
            return ()
        if node.func.id == "getattr" and len(node.args) == 2:
            base, attr = params_path(node.args[0], aliases, bound), node.args[1]
            value = attr.value if isinstance(attr, ast.Constant) else bound.get(getattr(attr, "id", None))
            if base is not None:
                assert isinstance(value, str), f"getattr on params with an unknown name: {ast.unparse(node)}"
                return (*base, value)
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
        return aliases.get(node.id)
    elif isinstance(node, ast.Attribute):
        base = params_path(node.value, aliases, bound)
        return None if base is None else (*base, node.attr)
    return None


def _dereferenced(node: ast.AST, aliases: dict, bound: dict) -> bool:
    """Whether an enclosing expression reads further into this one (only that one counts)."""
    parent = getattr(node, "parent", None)
    if isinstance(parent, ast.Attribute) and parent.value is node:
        return True
    return isinstance(parent, ast.Call) and params_path(parent, aliases, bound) is not None and node in parent.args


def _alias_value(node: ast.AST, aliases: dict) -> bool:
    """`p = params.data.synth` is no read by itself; what is done with `p` is."""
    parent = getattr(node, "parent", None)
    return isinstance(parent, ast.Assign) and parent.value is node and isinstance(parent.targets[0], ast.Name) \
        and parent.targets[0].id in aliases


def _call_bindings(fn: ast.FunctionDef, call: ast.Call, bound: dict) -> dict:
    """Constant (or already known) arguments of a call to a command-layer helper, by parameter name."""
    names = [a.arg for a in fn.args.args]
    values = {}
    for name, arg in [*zip(names, call.args), *((k.arg, k.value) for k in call.keywords if k.arg)]:
        if isinstance(arg, ast.Constant):
            values[name] = arg.value
        elif isinstance(arg, ast.Name) and arg.id in bound:
            values[name] = bound[arg.id]
    return values


def stage_reads(cmd: str) -> tuple[set[Path], set[str]]:
    """(files of kdas code the command runs, params keys it reads) for a `kdas ...` line."""
    module, callback, args = click_command(cmd)
    reads = CommandReads()
    reads.visit(module, callback, args)
    keys = {".".join(k) for k in reads.keys}
    files = closure(reads.modules | {"kdas.cli", module})
    for package, (key, default) in PLUGINS.items():
        runs = module_file(package).relative_to(ROOT) in files
        if runs and not any(k == key or k.startswith(key + ".") for k in keys):  # only the default plug-in runs
            plugins = {module_file(f"{package}.{f.stem}").relative_to(ROOT) for f in module_file(package).parent.glob("*.py") if f.stem != "__init__"}
            files -= plugins - {module_file(default).relative_to(ROOT)}
    return files, keys


def declared_params(stage: dict) -> list[str]:
    """A stage's params keys (`- key`, or `- other.yaml: [key, ...]`)."""
    keys = []
    for entry in stage.get("params", []):
        keys += [entry] if isinstance(entry, str) else [k for ks in entry.values() for k in ks]
    return keys


STAGES = dvc_stages()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_declares_the_code_and_params_its_command_reads(name: str) -> None:
    stage = STAGES[name]
    files, keys = stage_reads(stage["cmd"])
    deps = [Path(d) for d in stage.get("deps", [])]
    params = declared_params(stage)
    missing_deps = sorted(str(f) for f in files if not any(f == d or d in f.parents for d in deps))
    missing_params = sorted(k or "<the whole Params object>" for k in keys
                            if not any(k == p or k.startswith(p + ".") for p in params))
    assert not missing_deps, f"{name}: dvc.yaml deps lack {missing_deps} (its command `{stage['cmd']}` runs them)"
    # and no more: a code dep (a file, or a folder of code) is code the command runs, so an edit re-runs only its stages
    extra_deps = sorted(str(d) for d in deps if d.parts[0] == "kdas" and d not in files and
                        (d.suffix == ".py" or any(f.relative_to(ROOT) not in files for f in (ROOT / d).rglob("*.py"))))
    assert not extra_deps, f"{name}: dvc.yaml deps list {extra_deps}, which its command `{stage['cmd']}` does not run"
    assert not missing_params, f"{name}: dvc.yaml params lack {missing_params} (its command `{stage['cmd']}` reads them)"


def test_the_analysis_finds_what_it_must() -> None:
    """The reader itself, on commands whose reads are known: it cannot pass by seeing nothing."""
    files, keys = stage_reads("kdas train teacher")
    assert {Path("kdas/cli.py"), Path("kdas/commands/train.py"), Path("kdas/config/load.py"), Path("kdas/training/engine.py"),
            Path("kdas/evaluation/metrics.py"), Path("kdas/checkpoint.py"), Path("kdas/io.py"), Path("kdas/models/polyp_pvt.py"),
            Path("kdas/tracking/runs.py")} <= files
    assert {"train.nproc_per_node", "model.teacher", "model.teacher.weights", "train"} <= keys
    assert not any(k.startswith("model.student") for k in keys)
    # what the teacher's training does not run: the exporter, the registry, other commands (it
    # runs the inference path, kdas/serving/inference.py: the model file's reference profile)
    assert Path("kdas/serving/inference.py") in files and Path("kdas/monitoring/profile.py") in files
    assert not files & {Path("kdas/serving/export.py"), Path("kdas/serving/onnx_runtime.py"), Path("kdas/tracking/registry.py"),
                        Path("kdas/tracking/served.py"), Path("kdas/commands/data.py")}
    assert not any(f.parent == Path("kdas/commands") and f.name not in ("__init__.py", "train.py") for f in files)  # no other command
    files, keys = stage_reads("kdas train student")
    assert {"distill", "model.student"} <= keys and not any(k.startswith("model.teacher") for k in keys)
    assert "distill" not in stage_reads("kdas train teacher")[1]  # the teacher's stage is not re-run by a distill key
    files, keys = stage_reads("kdas register --role student")
    assert {"register.student_name", "register.teacher_name"} <= keys  # through cli.registry_name
    assert {Path("kdas/cli.py"), Path("kdas/commands/register.py"), Path("kdas/tracking/registry.py")} <= files
    files, keys = stage_reads("kdas data synth")
    assert keys >= {"data.synth", "data.synth.n_images"} and all(k.startswith("data.synth") for k in keys)
    assert {Path("kdas/data/synth.py"), Path("kdas/commands/data.py"), Path("kdas/cli.py")} <= files
    assert not any(f.parts[1] in ("models", "tracking", "training", "serving", "evaluation") or f.name in ("export.py", "importer.py", "fetch.py")
                   or f.parent == Path("kdas/commands") and f.name not in ("__init__.py", "data.py") for f in files), sorted(map(str, files))


# ------------------------------------------------------------------------- the lazy command table


def test_every_command_of_the_table_loads_and_its_summary_is_its_own() -> None:
    """cli.COMMANDS: each entry loads the command of that name, and the summary `kdas --help`
    prints from the table is the first paragraph of the command's help."""
    for name, (target, summary) in COMMANDS.items():
        module, attr = target.split(":")
        command = main.get_command(click.Context(main), name)
        assert command is getattr(importlib.import_module(module), attr) and command.name == name
        assert " ".join(command.help.split("\n\n")[0].split()) == summary, f"{name}: COMMANDS holds another summary than its help"


@pytest.mark.parametrize("argv, loaded", [(["--help"], set()), (["data", "synth", "--help"], {"kdas.commands.data"})])
def test_a_command_imports_its_own_module_alone(argv: list[str], loaded: set[str]) -> None:
    """What the static reading assumes, at run time: `kdas X` imports X's module and no other
    command's (`kdas --help` none)."""
    code = ("import sys\nfrom kdas.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    modules = set(out.strip().splitlines()[-1].split())
    commands = {target.split(":")[0] for target, _ in COMMANDS.values()}
    assert modules & commands == loaded
    if "data" in argv:  # the synth stage's command: no model, tracking or export code
        assert not {m for m in modules if m.startswith(("kdas.models", "kdas.tracking", "kdas.training", "kdas.serving.export", "torch"))}


# ------------------------------------------------------------------------- DVC itself: an edit re-runs the stages that run it alone


MODEL_CODE = ("kdas/models/", "kdas/training/", "kdas/tracking/", "kdas/serving/", "kdas/evaluation/", "kdas/commands/train.py",
              "kdas/commands/register.py", "kdas/commands/export.py", "kdas/checkpoint.py")


def test_the_synth_stage_lists_no_model_tracking_or_export_code() -> None:
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["synth"]["deps"]
    assert "kdas/data/synth.py" in deps
    assert not [d for d in deps if d.startswith(MODEL_CODE) or d in ("kdas/models", "kdas/training", "kdas/tracking")], deps


@pytest.fixture
def project(tmp_path: Path, mlflow_template_db: Path) -> Path:
    """The project's DAG and code with the tiny profile."""
    return dvc_project(tmp_path, mlflow_template_db, TINY)


def dvc(project: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=tool_environ(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def committed_without_running(project: Path, stages: tuple[str, ...]) -> None:
    """The lock `dvc repro` would write for `stages`, without running them: their outputs made
    (empty), then `dvc commit`. `dvc status` compares a stage's deps and params with its lock
    entry; what its outputs hold plays no part."""
    dag = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    for stage in stages:
        for kind in ("outs", "metrics", "plots"):
            for entry in dag[stage].get(kind, []):
                path = project / (entry if isinstance(entry, str) else next(iter(entry)))
                folder = not path.suffix  # data/raw/synth: a folder of images
                (path if folder else path.parent).mkdir(parents=True, exist_ok=True)
                (path / "empty" if folder else path).touch()
    dvc(project, "commit", "--force", *stages)


def changed(project: Path) -> set[str]:
    """The stages up to train_teacher that DVC would run again."""
    return set(json.loads(dvc(project, "status", "--json", "--with-deps", "train_teacher")))


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path}: no {old!r} to edit"
    path.write_text(text.replace(old, new, 1))


@pytest.mark.slow
def test_an_exporter_or_predict_help_edit_leaves_the_teacher_up_to_date(project: Path) -> None:
    committed_without_running(project, ("synth", "manifest", "validate", "train_teacher"))
    assert changed(project) == set()

    exporter = project / "kdas" / "serving" / "export.py"
    exporter.write_text(exporter.read_text() + "# an edit of the exporter\n")
    edit(project / "kdas" / "commands" / "predict.py", "runs on onnxruntime, without PyTorch.", "runs on onnxruntime alone.")
    assert changed(project) == set()  # neither the teacher nor the synthetic data is stale

    # the same check sees an edit of code the stage runs: the reading above is no blind one
    path = project / "kdas" / "commands" / "train.py"
    path.write_text(path.read_text() + "# an edit of the training command\n")
    assert changed(project) == {"train_teacher"}
