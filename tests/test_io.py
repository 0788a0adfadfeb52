"""kdas.io: temporaries of killed writers are swept by the next writer; written files get the
process's normal permissions; kdas never replaces a folder it did not make; a lock per output
folder names its holder and dies with it; a mask's foreground is decided from what its file
holds, or the file is refused, named: never an empty label from a mask that holds something."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import MAX_NONBINARY, ROOT, make_dataset
from kdas.data.importer import import_dataset
from kdas.data.manifest import describe_pair
from kdas.io import FolderBusyError, MaskReadError, atomic_dir, atomic_path, binarise, folder_lock, nonbinary_fraction, read_mask, write_text

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


def test_synth_never_replaces_an_imported_dataset(workdir):
    """An import's folder carries kdas's marker too, but names its writer: `kdas data synth
    --out data/raw/<dataset>` replaced the real frames with synthetic ones."""
    import_dataset(make_dataset(workdir / "ds", n=2), workdir / "data" / "raw", name="mine", track=False, max_nonbinary=MAX_NONBINARY)
    before = {p: p.read_bytes() for p in (workdir / "data" / "raw" / "mine").rglob("*") if p.is_file()}
    result = synth(workdir, "data/raw/mine")
    assert result.exit_code == 1 and result.output.strip() == (
        "error: data/raw/mine: written by kdas data import, which `kdas data synth` does not replace: choose another output, or move it "
        "away yourself")
    assert {p: p.read_bytes() for p in (workdir / "data" / "raw" / "mine").rglob("*") if p.is_file()} == before


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


# --------------------------------------------------------------------------- a mask's foreground, from what its file holds

POLYP = np.zeros((24, 32), bool)
POLYP[6:14, 8:20] = True  # 96 of 768 pixels


def saved(tmp_path, name: str, pixels: np.ndarray, mode: str | None = None, palette: list[int] | None = None, **options):
    im = Image.fromarray(pixels, mode) if mode else Image.fromarray(pixels)
    if palette is not None:
        im.putpalette(palette)
    im.save(tmp_path / name, **options)
    return tmp_path / name


def coloured(colour, background=(0, 0, 0)) -> np.ndarray:
    rgb = np.empty((*POLYP.shape, 3), np.uint8)
    rgb[...] = background
    rgb[POLYP] = colour
    return rgb


def rgba_alpha_only() -> np.ndarray:
    rgba = np.zeros((*POLYP.shape, 4), np.uint8)
    rgba[..., 3] = POLYP * 255  # black everywhere; only the alpha draws the polyp
    return rgba


# file, how it is saved: each is read as POLYP exactly
AS_POLYP = {
    "blue on black": lambda: coloured((0, 0, 255)),
    "dark red on black": lambda: coloured((128, 0, 0)),
    "grey 0/2": lambda: POLYP.astype(np.uint8) * 2,
    "grey 0/20": lambda: POLYP.astype(np.uint8) * 20,
    "grey 0/100": lambda: POLYP.astype(np.uint8) * 100,
    "grey 200/255": lambda: np.where(POLYP, 255, 200).astype(np.uint8),
    "0/1": lambda: POLYP.astype(np.uint8),
    "16-bit 0/300": lambda: POLYP.astype(np.uint16) * 300,
    "16-bit 0/65535": lambda: POLYP.astype(np.uint16) * 65535,
    "alpha only": rgba_alpha_only,
}


@pytest.mark.parametrize("how", list(AS_POLYP))
def test_a_two_valued_or_coloured_mask_is_its_polyp(tmp_path, how):
    mask = read_mask(saved(tmp_path, "m.png", AS_POLYP[how]()))
    assert np.array_equal(binarise(mask), POLYP) and set(np.unique(mask)) == {0, 255} and nonbinary_fraction(mask) == 0


VOC = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759  # index 0 black, 1 dark red, 2 dark green


def test_a_colour_palette_mask_is_a_label_map_black_or_index_0_background(tmp_path):
    labels = POLYP.astype(np.uint8)
    labels[6:8, 8:20] = 2  # a second label: foreground too
    assert np.array_equal(binarise(read_mask(saved(tmp_path, "voc.png", labels, "P", VOC))), POLYP)
    no_black = [0, 255, 0, 255, 0, 0] + [0] * 762  # index 0 green, 1 red: no black entry, so index 0 is background
    assert np.array_equal(binarise(read_mask(saved(tmp_path, "green.png", POLYP.astype(np.uint8), "P", no_black))), POLYP)
    with pytest.raises(MaskReadError, match=r"^\S*odd.png: palette mask with indices 1=\(255, 0, 0\), 2=\(0, 255, 0\), none black "
                                            r"and no index 0: cannot tell its background .*save it with background black or index 0$"):
        read_mask(saved(tmp_path, "odd.png", POLYP.astype(np.uint8) + 1, "P", [0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759))


def test_a_grey_palette_is_read_as_its_levels_so_a_soft_one_stays_soft(tmp_path):
    ramp = np.tile(np.arange(32, dtype=np.uint8), (24, 1))
    grey = [min(i * 8, 255) for i in range(256) for _ in range(3)]
    mask = read_mask(saved(tmp_path, "ramp.png", ramp, "P", grey))
    assert np.array_equal(mask, np.minimum(ramp.astype(int) * 8, 255)) and nonbinary_fraction(mask) > MAX_NONBINARY


@pytest.mark.parametrize("how,pixels,found", [
    ("jpeg 0/20", POLYP.astype(np.uint8) * 20, r"mask values 0\S* .*, none near 255 \(above 222\), no pixel above 127"),
    ("three dark labels", POLYP.astype(np.uint8) + np.eye(24, 32, dtype=np.uint8), r"mask values 0, 1, 2, none near 255"),
    ("16-bit faint ramp", np.tile(np.linspace(0, 1000, 32).astype(np.uint16), (24, 1)), r"mask values 0\.\.1000 \(32 values\), 0\.\.4 of 255"),
    ("one dark value", np.full((24, 32), 20, np.uint8), r"one value \(20\) in every pixel: cannot tell"),
])
def test_a_mask_whose_foreground_cannot_be_told_is_refused_in_one_line_naming_it(tmp_path, how, pixels, found):
    path = saved(tmp_path, "m.jpg" if how.startswith("jpeg") else "m.png", pixels, **({"quality": 90} if how.startswith("jpeg") else {}))
    with pytest.raises(MaskReadError, match=rf"^{tmp_path}/m\.(jpg|png): {found}") as err:
        read_mask(path)
    assert "\n" not in str(err.value) and "kdas reads" in str(err.value) and "save it" in str(err.value).replace("save the mask", "save it")


def test_a_jpeg_mask_keeps_its_levels_and_todays_threshold(tmp_path):
    mask = read_mask(saved(tmp_path, "m.jpg", POLYP.astype(np.uint8) * 255, quality=75))
    assert len(np.unique(mask)) > 2 and mask.max() >= 223  # JPEG noise kept, for nonbinary_fraction to judge
    assert np.array_equal(binarise(mask), np.asarray(Image.open(tmp_path / "m.jpg")) > 127)
    assert not read_mask(saved(tmp_path, "empty.png", np.zeros((24, 32), np.uint8))).any()  # empty is empty: no error
    assert binarise(read_mask(saved(tmp_path, "full.png", np.full((24, 32), 255, np.uint8)))).all()


def test_the_manifest_reads_masks_alike_so_validate_sees_the_polyp_or_the_refusal(tmp_path):
    """A mask put in data/raw by hand, not imported: `kdas validate` gets its polyp (not an
    `empty_mask` warning) or a `decodable` error naming it."""
    image = saved(tmp_path, "img.png", np.zeros((*POLYP.shape, 3), np.uint8))
    row = describe_pair(str(image), str(saved(tmp_path, "blue.png", coloured((0, 0, 255)))))
    assert row["error"] == "" and row["foreground_fraction"] == pytest.approx(POLYP.mean())
    row = describe_pair(str(image), str(saved(tmp_path, "dark.jpg", POLYP.astype(np.uint8) * 20, quality=90)))
    assert "dark.jpg: mask values" in row["error"] and "foreground is dark" in row["error"]
