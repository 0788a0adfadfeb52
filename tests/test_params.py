"""params.yaml: typed loading (unknown keys, wrong types, ranges), set_params and the
profile overlay of `kdas params use`. Each test works on its own copy of the project's file."""

from __future__ import annotations

import shutil

import pytest
import yaml
from click.testing import CliRunner

from conftest import ROOT
from kdas.cli import main
from kdas.config import ParamsError, load_params, set_params, use_profile


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


def edit(path, dotted: str, value) -> None:
    raw = yaml.safe_load(path.read_text())
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
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
    ("distill.alpha", 1.5, r"distill\.alpha = 1\.5 is out of range \[0, 1\]"),
    ("train.batch_size", 0, r"train\.batch_size = 0 is out of range"),
    ("train.image_size", 100, r"train\.image_size = 100 must be a multiple of 32 \(nearest: 96 or 128\)"),
    ("distill.method", "kd", r"distill\.method must be one of none, sgm, kdas"),
    ("train.multiscale", [], r"train\.multiscale must be a non-empty list"),
    ("train.teacher.image_size", 300, r"train\.teacher\.image_size = 300 must be a multiple of 32 \(nearest: 288 or 320\)"),
    ("train.teacher.epochs", 0, r"train\.teacher\.epochs = 0 must be null \(as train\.epochs\) or at least 1"),
])
def test_out_of_range_values_are_refused_at_load(params_file, key, value, message):
    edit(params_file, key, value)
    with pytest.raises(ParamsError, match=message):
        load_params(params_file)


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
    assert set_params({"train.epochs": 3, "distill.alpha": 0.5}, params_file) is True
    text = params_file.read_text()
    assert "# Every parameter of the pipeline." in text  # comments survive
    p = load_params(params_file)
    assert (p.train.epochs, p.distill.alpha) == (3, 0.5)
    assert set_params({"train.epochs": 3}, params_file) is False  # nothing to change
    with pytest.raises(ParamsError, match="unknown key 'train.epoch'"):
        set_params({"train.epoch": 3}, params_file)


def test_a_profile_overlays_its_keys_and_nothing_else(params_file):
    before = load_params(params_file)
    profile = before.profiles["paper"]
    assert use_profile("paper", params_file) == profile
    after = load_params(params_file)
    assert (after.train.image_size, after.train.multiscale, after.model.teacher.weights) == (352, [0.75, 1.0, 1.25], "hub")
    untouched = {"train.seed", "train.grad_clip", "distill.alpha", "evaluate.batch_size", "data.datasets"} - set(profile)
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
