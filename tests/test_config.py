"""params.yaml (kdas.config): typed loading (unknown keys, wrong types, ranges), set_params and
the profile overlay of `kdas params use`; hostile or careless files (an alias bomb, a key given
twice, a dataset outside data/raw, a registry name that breaks MLflow's search filters), each
one line, in milliseconds. Each test works on its own copy of the project's file."""

from __future__ import annotations

import dataclasses
import shutil
import time

import pytest
import yaml
from click.testing import CliRunner
from pydantic import ValidationError

from helpers import ROOT, set_key
from kdas.cli import main
from kdas.config import DistillParams, ParamsError, TeacherTraining, TrainParams, load_params, set_params, use_profile
from kdas.tracking.rules import gate_rules


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


def edit(path, dotted: str, value) -> None:
    raw = yaml.safe_load(path.read_text())
    set_key(raw, tuple(dotted.split(".")), value)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_the_projects_params_load(params_file):
    p = load_params(params_file)
    assert p.train.lr > 0 and p.model.student.arch and p.profiles


def test_an_unknown_key_is_named_with_the_known_ones(params_file):
    edit(params_file, "train.learning_rate", 1e-4)
    with pytest.raises(ParamsError, match=r"train: unknown key\(s\) \['learning_rate'\]; known: .*'lr'"):
        load_params(params_file)


def test_a_number_written_as_text_is_refused_with_the_fix(params_file):
    params_file.write_text(params_file.read_text().replace("  lr: 3.0e-4", '  lr: "1e-4"'))
    with pytest.raises(ParamsError, match=r"train\.lr: expected float, got '1e-4' \(str\); e\.g\. write 1\.0e-4"):
        load_params(params_file)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("evaluate.grid_size", 0, r"evaluate\.grid_size = 0 is out of range \[1, 100\]"),
    ("train.batch_size", 0, r"train\.batch_size = 0 is out of range"),
    ("train.image_size", 100, r"train\.image_size = 100 must be a multiple of 32 \(nearest: 96 or 128\)"),
    ("train.multiscale", [], r"train\.multiscale must be a non-empty list"),
    ("train.teacher.image_size", 300, r"train\.teacher\.image_size = 300 must be a multiple of 32 \(nearest: 288 or 320\)"),
    ("train.teacher.epochs", 0, r"train\.teacher\.epochs = 0 must be null \(as train\.epochs\) or at least 1"),
])
def test_out_of_range_values_are_refused_at_load(params_file, key, value, message):
    edit(params_file, key, value)
    with pytest.raises(ParamsError, match=message):
        load_params(params_file)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("train.epochs", True, r"params\.yaml: train\.epochs: expected int, got True \(bool\)$"),  # a bool is no int
    ("train.epochs", 3.0, r"train\.epochs: expected int, got 3\.0 \(float\)$"),
    ("train.amp", "yes", r"train\.amp: expected bool, got 'yes' \(str\)$"),
    ("model.student.backbone", 5, r"model\.student\.backbone: expected str or null, got 5 \(int\)$"),
    ("data.datasets", [1], r"data\.datasets\[0\]: expected str, got 1 \(int\)$"),
    ("train.teacher", 5, r"params\.yaml: train\.teacher: expected a mapping, got 5 \(int\)$"),
    ("train.teacher.epochs", 10**6, r"train\.teacher\.epochs = 1000000 must be null \(as train\.epochs\) or at most 100000$"),
    ("distill.method", 5, r"distill\.method: expected str, got 5 \(int\)$"),
    ("distill.kd", 5, r"params\.yaml: distill\.kd: expected a mapping, got 5 \(int\)$"),  # a method's section (typed by its module)
    ("distill.seed", -1, r"distill\.seed = -1 is out of range \[0, 4294967295\]$"),
])
def test_wrong_types_and_values_are_one_line_naming_the_key(params_file, key, value, message):
    edit(params_file, key, value)
    with pytest.raises(ParamsError, match=message) as info:
        load_params(params_file)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("register.gate.floor", 0.2, r"register\.gate\.floor: expected a mapping, got 0\.2 \(float\)$"),  # the gate before its rules
    ("register.gate.floor.rule", 5, r"register\.gate\.floor\.rule: expected str, got 5 \(int\)$"),
    ("register.gate.floor.rule", "flor", r"register\.gate\.floor\.rule must be one of floor, .*margin.*, not 'flor'$"),
    ("register.gate.floor.mn", 0.1, r"register\.gate\.floor: unknown key\(s\) \['mn'\]; known: \['each_set', 'metric', 'min'\]$"),
    ("register.gate.floor.min", 2, r"register\.gate\.floor\.min = 2 is out of range \[0, 1\]$"),
    ("register.gate.margin.each_set", "yes", r"register\.gate\.margin\.each_set: expected bool, got 'yes' \(str\)$"),
])
def test_a_bad_gate_rule_is_one_line_naming_its_key(params_file, key, value, message):
    """Each rule's kind types its settings (kdas.tracking.rules), as `kdas promote` and the flow read them first."""
    edit(params_file, key, value)
    with pytest.raises(ParamsError, match=rf"^{params_file}: {message}"):
        gate_rules(load_params(params_file).register.gate, str(params_file))


def test_an_int_is_a_float_and_a_missing_key_is_named(params_file):
    edit(params_file, "train.lr", 1)
    assert load_params(params_file).train.lr == 1.0 and isinstance(load_params(params_file).train.lr, float)
    raw = yaml.safe_load(params_file.read_text())
    del raw["train"]["lr"], raw["serve"]
    raw["train"]["b"] = raw["train"]["a"] = 1
    params_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"params\.yaml: train: unknown key\(s\) \['a', 'b'\]; known: "):  # unknown keys first, together
        load_params(params_file)
    del raw["train"]["a"], raw["train"]["b"]
    params_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"params\.yaml: train: missing key 'lr'$"):
        load_params(params_file)


def test_params_built_in_code_are_checked_the_same_way(params_file):
    p = load_params(params_file)
    assert DistillParams(method="none", seed=0).settings == {}
    assert p.distill.settings["kd"] == {"weight": p.distill.settings["kd"]["weight"], "temperature": p.distill.settings["kd"]["temperature"]}
    assert TrainParams(**dataclasses.asdict(p.train)) == p.train  # nested sections from their dicts
    assert dataclasses.replace(p.train, epochs=3).teacher == TeacherTraining(None, None)
    for bad in (lambda: DistillParams(method=5, seed=0), lambda: dataclasses.replace(p.train, epochs=0),
                lambda: dataclasses.replace(p.train, amp="yes"), lambda: dataclasses.replace(p.distill, seed="0")):
        with pytest.raises(ValidationError):
            bad()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train.epochs = 3  # type: ignore[misc]


def test_the_teachers_own_epochs_and_size_apply_to_the_teacher_alone(params_file):
    p = load_params(params_file)
    assert p.train.for_role("teacher") == p.train  # null: as the student
    edit(params_file, "train.teacher.epochs", 40)
    edit(params_file, "train.teacher.image_size", p.train.image_size + 64)
    p = load_params(params_file)
    teacher = p.train.for_role("teacher")
    assert (teacher.epochs, teacher.image_size) == (40, p.train.image_size + 64)
    assert p.train.for_role("student") == p.train and teacher.lr == p.train.lr


def test_set_params_writes_keys_in_place_keeping_comments(params_file):
    assert set_params({"train.epochs": 3, "distill.kd.weight": 0.5}, params_file) is True
    text = params_file.read_text()
    assert "# Every parameter of the pipeline." in text  # comments survive
    p = load_params(params_file)
    assert (p.train.epochs, p.distill.settings["kd"]["weight"]) == (3, 0.5)
    assert set_params({"train.epochs": 3}, params_file) is False  # nothing to change
    with pytest.raises(ParamsError, match="unknown key 'train.epoch'"):
        set_params({"train.epoch": 3}, params_file)


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", r"not a text file"),
    (b"a: " + b"[" * 20000 + b"]" * 20000, r"nested too deeply|not valid YAML"),
    (b"train:\n  epochs: " + b"9" * 5000, r"not a params file|out of range"),
])
def test_a_file_that_is_no_yaml_text_is_one_line_naming_it(params_file, content, message):
    params_file.write_bytes(content)
    with pytest.raises(ParamsError, match=message) as info:
        load_params(params_file)
    assert str(info.value).startswith(f"{params_file}: ") and "\n" not in str(info.value)


def test_a_hub_backbone_needs_weights_hub(params_file):
    edit(params_file, "model.student.backbone", "hf-hub:timm/mobilenetv3_small_100.lamb_in1k")
    with pytest.raises(ParamsError, match=r"model\.student\.backbone = 'hf-hub:.*' is on the model hub, but model\.student\.weights is 'none'"):
        load_params(params_file)
    edit(params_file, "model.student.weights", "hub")
    assert load_params(params_file).model.student.weights == "hub"


def test_a_bad_profile_is_refused_before_it_is_written(params_file):
    """`kdas params use` checks the profile's values first: a bad one leaves params.yaml as it
    was, and a key under a scalar or an unknown section is one line, not a traceback."""
    before = params_file.read_text()
    for profile, message in (({"train.epochs": -5}, r"train\.epochs = -5 is out of range .*\(not written\)$"),
                             ({"train.lr.x": 1}, r"unknown key 'train\.lr\.x' \(train\.lr is a value, not a section\)"),
                             ({"nosuch.key": 1}, r"unknown key 'nosuch\.key' \(the file has no section 'nosuch'\)")):
        with pytest.raises(ParamsError, match=message) as info:
            set_params(profile, params_file)
        assert str(params_file) in str(info.value) and ".tmp" not in str(info.value)
        assert params_file.read_text() == before
    edit(params_file, "profiles", {"broken": {"train.epochs": -5}})
    before = params_file.read_text()
    with pytest.raises(ParamsError, match="not written"):
        use_profile("broken", params_file)
    assert params_file.read_text() == before and load_params(params_file).train.epochs > 0


def test_a_profile_overlays_its_keys_and_nothing_else(params_file):
    before = load_params(params_file)
    profile = before.profiles["paper"]
    assert use_profile("paper", params_file) == profile
    after = load_params(params_file)
    assert (after.train.image_size, after.train.multiscale, after.model.teacher.weights) == (352, [0.75, 1.0, 1.25], "hub")
    untouched = {"train.seed", "train.grad_clip", "distill.seed", "evaluate.batch_size", "data.datasets"} - set(profile)
    for key in untouched:
        a, b = before, after
        for part in key.split("."):
            a, b = getattr(a, part), getattr(b, part)
        assert a == b, key


def test_params_use_through_the_cli_and_an_unknown_profile(params_file):
    runner = CliRunner()
    ok = runner.invoke(main, ["--params", str(params_file), "params", "use", "real-cpu"])
    assert ok.exit_code == 0, ok.output
    assert load_params(params_file).model.student.backbone == "tf_efficientnet_lite0"
    bad = runner.invoke(main, ["--params", str(params_file), "params", "use", "nope"])
    assert bad.exit_code == 1 and "unknown profile 'nope'" in bad.output and "paper" in bad.output


# --------------------------------------------------------------------------- hostile or careless params.yaml: one line each, in milliseconds


BOMB = """\
  bomb:
    a: &a [x, x, x, x, x, x, x, x, x, x]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_an_alias_bomb_under_profiles_is_refused_in_milliseconds(workdir):
    with (workdir / "params.yaml").open("a") as fh:
        fh.write(BOMB)
    start = time.monotonic()
    with pytest.raises(ParamsError, match=r"params.yaml: its YAML aliases expand to more than 10000 values \(an alias bomb\?\)"):
        load_params(workdir / "params.yaml")
    assert time.monotonic() - start < 1


def test_a_key_given_twice_is_one_line_also_for_params_use(workdir):
    text = (workdir / "params.yaml").read_text()
    (workdir / "params.yaml").write_text(text.replace("  epochs: ", "  epochs: 3\n  epochs: ", 1))
    line = text[: text.index("  epochs: ")].count("\n") + 1
    with pytest.raises(ParamsError, match=rf"params.yaml: key 'epochs' given twice \(lines {line} and {line + 1}\); a key may appear once"):
        load_params(workdir / "params.yaml")
    result = CliRunner().invoke(main, ["params", "use", "paper"])
    assert result.exit_code == 1 and result.output.startswith("error: params.yaml: key 'epochs' given twice")
    assert len(result.output.strip().splitlines()) == 1 and (workdir / "params.yaml").read_text().count("\n  epochs: ") == 2


def test_yaml_anchors_within_the_bound_still_load(workdir):
    text = (workdir / "params.yaml").read_text()
    (workdir / "params.yaml").write_text(text.replace("  multiscale: [1.0]", "  multiscale: &scales [1.0]", 1)
                                         + "  same:\n    train.multiscale: *scales\n")
    assert load_params(workdir / "params.yaml").profiles["same"] == {"train.multiscale": [1.0]}


@pytest.mark.parametrize("datasets", ["[/etc]", "['../elsewhere']", "[synth, 'a/b']", "['']"])
def test_data_datasets_are_folders_under_data_raw(workdir, datasets):
    text = (workdir / "params.yaml").read_text()
    (workdir / "params.yaml").write_text(text.replace("  datasets: [synth]", f"  datasets: {datasets}", 1))
    with pytest.raises(ParamsError, match=r"data.datasets: '.*' is not a dataset name \(a folder under data/raw"):
        load_params(workdir / "params.yaml")


@pytest.mark.parametrize("name", ["kdas-'student", 'a"b', "a b", "", "x' or name = 'y"])
def test_a_registry_name_that_would_break_search_filters_is_refused(workdir, name):
    text = (workdir / "params.yaml").read_text()
    (workdir / "params.yaml").write_text(text.replace("  student_name: kdas-student", f"  student_name: {name!r}", 1))
    with pytest.raises(ParamsError, match=r"register.student_name = .*: use letters, digits"):
        load_params(workdir / "params.yaml")
