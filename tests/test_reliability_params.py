"""Hostile or careless params.yaml: an alias bomb, a key given twice, a dataset outside
data/raw, a registry name that breaks MLflow's search filters; each one line, in milliseconds."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from helpers import MAX_NONBINARY, make_dataset
from kdas.cli import main
from kdas.config import ParamsError, load_params
from kdas.data.importer import import_dataset

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


def test_an_alias_name_imports_under_the_catalogue_name_and_gets_its_published_split(tmp_path):
    [out] = import_dataset(make_dataset(tmp_path / "ds", n=2), tmp_path / "raw", name="kvasir", track=False,
                           max_nonbinary=MAX_NONBINARY)
    assert out == tmp_path / "raw" / "kvasir-seg"
