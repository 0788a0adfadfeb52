"""kdas.io: temporaries of killed writers are swept by the next writer; written files get the
process's normal permissions; kdas never replaces a folder it did not make; a lock per output
folder names its holder and dies with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import MAX_NONBINARY, ROOT, make_dataset
from kdas.data.importer import import_dataset
from kdas.io import FolderBusyError, atomic_dir, atomic_path, folder_lock, write_text

# a writer that dies (SIGKILL) half-way: what it leaves is what a killed import or save leaves
WRITER = textwrap.dedent("""\
    import sys, time
    from kdas.io import atomic_dir, atomic_path
    kind, target = sys.argv[1], sys.argv[2]
    with (atomic_dir if kind == "dir" else atomic_path)(target) as tmp:
        if kind == "dir":
            (tmp / "images").mkdir()
            (tmp / "images" / "a.png").write_bytes(b"half")
        else:
            tmp.write_bytes(b"")
        print("ready", flush=True)
        time.sleep(120)
""")


def writer(kind: str, target: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(target)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def test_a_killed_saves_temporary_is_swept_by_the_next_save_not_a_live_ones(tmp_path):
    target = tmp_path / "models" / "last.ckpt"
    dead, live = writer("file", target), writer("file", target)
    kill(dead)
    left = sorted(p.name for p in target.parent.iterdir())
    assert len(left) == 2 and all(n.startswith(".last.ckpt.") and n.endswith(".tmp") for n in left)
    live_tmp = [n for n in left if n.startswith(f".last.ckpt.{live.pid}.")]
    write_text(target, "saved")
    assert target.read_text() == "saved"
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(["last.ckpt", *live_tmp])  # the live writer's stays
    kill(live)


def test_a_killed_imports_folder_is_swept_by_the_next_import(tmp_path):
    raw = tmp_path / "data" / "raw"
    kill(writer("dir", raw / "ds"))
    assert [p.name.split(".")[1] for p in raw.iterdir()] == ["ds"] and next(raw.iterdir()).name.endswith(".tmp")
    import_dataset(make_dataset(tmp_path / "ds", n=2), raw, track=False, max_nonbinary=MAX_NONBINARY)
    assert sorted(p.name for p in raw.iterdir()) == ["ds"]


def test_a_kill_between_the_two_renames_loses_nothing(tmp_path):
    raw = tmp_path / "raw"
    import_dataset(make_dataset(tmp_path / "ds", n=2), raw, track=False, max_nonbinary=MAX_NONBINARY)
    os.replace(raw / "ds", raw / ".ds.old")  # the state between moving the old version aside and putting the new one
    with pytest.raises(RuntimeError), atomic_dir(raw / "ds"):
        raise RuntimeError("killed again")
    assert sorted(p.name for p in raw.iterdir()) == ["ds"] and len(list((raw / "ds" / "images").iterdir())) == 2


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_and_folders_get_the_normal_permissions(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_text(tmp_path / "report.json", "{}")
        with atomic_path(tmp_path / "model.pt") as tmp:
            tmp.write_bytes(b"weights")
        with atomic_dir(tmp_path / "ds") as tmp:
            (tmp / "a.png").write_bytes(b"x")
    finally:
        os.umask(previous)
    for name in ("report.json", "model.pt", "ds/a.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "ds").stat().st_mode & 0o777 == 0o777 & ~umask


# --------------------------------------------------------------------------- never replace what kdas did not make


def synth(project: Path, out: str):
    """`kdas data synth --out OUT` in-process, 3 frames of 32 px."""
    import yaml
    from click.testing import CliRunner

    from kdas.cli import main

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["synth"].update(n_images=3, size=32)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return CliRunner().invoke(main, ["data", "synth", "--out", out])


@pytest.mark.parametrize("out", ["data/raw", "mine"])
def test_synth_never_replaces_a_folder_kdas_did_not_make(workdir, out):
    import_dataset(make_dataset(workdir / "ds", n=1), workdir / "data" / "raw", track=False, max_nonbinary=MAX_NONBINARY)
    (workdir / "mine").mkdir()
    (workdir / "mine" / "thesis.tex").write_text("years of work")
    before = {p: p.read_bytes() for p in [*(workdir / "data").rglob("*"), *(workdir / "mine").rglob("*")] if p.is_file()}
    result = synth(workdir, out)
    assert result.exit_code == 1
    assert result.output.strip() == (f"error: {out}: exists and has no .kdas-made file (kdas marks the folders it writes, and "
                                     "replaces only those): choose another output, or move it away yourself")
    after = {p: p.read_bytes() for p in [*(workdir / "data").rglob("*"), *(workdir / "mine").rglob("*")] if p.is_file()}
    assert after == before


def test_synth_replaces_its_own_output_and_fills_an_empty_folder(workdir):
    (workdir / "empty").mkdir()
    for out in ("empty", "data/raw/synth", "data/raw/synth"):
        result = synth(workdir, out)
        assert result.exit_code == 0, result.output
        assert len(list((workdir / out / "images").iterdir())) == 3 and (workdir / out / ".kdas-made").is_file()
    assert sorted(p.name for p in (workdir / "data" / "raw").iterdir()) == ["synth"]


# --------------------------------------------------------------------------- a lock per output folder


HOLDER = textwrap.dedent("""\
    import sys, time
    from kdas.io import folder_lock
    with folder_lock(sys.argv[1], "a test holder"):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_a_folder_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusyError) as busy, folder_lock(tmp_path / "out", "a second writer"):
            pass
        assert str(busy.value) == (f"{tmp_path / 'out'}: pid {holder.pid} (a test holder) is writing into it; wait for it to end "
                                   "or stop it, or write elsewhere (--out)")
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup ran: the OS releases the lock
        holder.wait(30)
    with folder_lock(tmp_path / "out", "the next writer"):
        assert (tmp_path / "out" / ".kdas.lock").read_text() == f"pid {os.getpid()} (the next writer)\n"
