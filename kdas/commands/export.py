"""`kdas export`: a model as ONNX (fp32 or static int8) for onnxruntime."""

from __future__ import annotations

from pathlib import Path

import click

from kdas.cli import MANIFEST


@click.command("export")
@click.option("--model", "model_ref", default="models/student/best.pt", show_default=True,
              help="Model file or MLflow URI (models:/kdas-student@champion).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The .onnx file to write.")
@click.option("--int8", "int8", is_flag=True, help="Static int8 quantisation, calibrated on train-split images.")
@click.option("--manifest", default=MANIFEST, show_default=True, type=click.Path(path_type=Path),
              help="Where --int8 draws calibration images from (the train split only).")
@click.option("--calibration-images", default=32, show_default=True, type=click.IntRange(1), help="How many (--int8).")
@click.option("--seed", default=0, show_default=True, help="Which calibration images (--int8).")
def export_cmd(model_ref: str, out: Path, int8: bool, manifest: Path, calibration_images: int, seed: int) -> None:
    """Export a model to ONNX (dynamic batch, its training size, metadata) for onnxruntime.

    The graph takes RGB in [0, 1] (normalisation inside) and returns logits (P1 + P2) and
    map (sigmoid). `kdas predict IMG --model OUT.onnx` runs it without PyTorch.
    """
    import tempfile

    from kdas.data.manifest import read_manifest
    from kdas.serving import export, onnx_runtime
    from kdas.tracking.references import is_model_uri, resolve_model_file

    if out.suffix.lower() != ".onnx":
        raise ValueError(f"{out}: the output must be a .onnx file")
    images = None
    if int8:  # the calibration set first: a missing manifest fails before the export's seconds
        images = export.calibration_images(read_manifest(manifest), calibration_images, seed)
    model_file = resolve_model_file(model_ref)
    source = model_ref if is_model_uri(model_ref) else str(model_file)
    if not int8:
        export.export_onnx(model_file, out, source=source)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export.export_onnx(model_file, Path(tmp) / "fp32.onnx", source=source)
            export.quantize_int8(fp32, out, images)
    meta = onnx_runtime.read_metadata(out)
    click.echo(f"{model_ref} -> {out} ({meta['precision']}, {meta['arch']} on {meta['backbone']}, {meta['image_size']} px, "
               f"{out.stat().st_size / 1e6:.1f} MB); run it with `kdas predict IMAGE --model {out}`")
