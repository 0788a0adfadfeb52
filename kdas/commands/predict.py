"""`kdas predict`: segment image files with a model file, an MLflow model or an ONNX export."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from kdas.cli import params_of
from kdas.maps import THRESHOLD

GREEN_HALF = np.array([0, 127, 0], np.uint8)


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_ref",
              help="Model file, MLflow URI, or an ONNX export (.onnx, runs on onnxruntime). Default: the student's champion, "
                   "models:/<register.student_name>@champion.")
@click.option("--out", default=Path("predictions"), show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--threshold", default=THRESHOLD, show_default=True, type=click.FloatRange(0, 1), help="Mask threshold on the probability.")
@click.option("--device", default="auto", show_default=True)
@click.pass_context
def predict(ctx: click.Context, images: tuple[Path, ...], model_ref: str | None, out: Path, threshold: float, device: str) -> None:
    """Segment images: writes <stem>_mask.png (0/255) and <stem>_overlay.jpg to --out.

    A .onnx --model (from `kdas export`) runs on onnxruntime, without PyTorch.
    """
    from PIL import Image

    from kdas.io import read_rgb

    if model_ref is None:  # the project's champion student: needs the project's params.yaml
        from kdas.tracking.promotion import CHAMPION

        if not Path(ctx.find_root().obj["params_path"]).exists():
            raise click.UsageError("no --model given and no params.yaml here: pass --model FILE_OR_URI, or run in a kdas project")
        model_ref = f"models:/{params_of(ctx).register.student_name}@{CHAMPION}"

    if is_onnx_file(model_ref):  # onnxruntime: no torch on this path
        from kdas.serving.onnx_runtime import OnnxSegmenter

        seg = OnnxSegmenter.load(model_ref, device)
    else:
        from kdas.serving.inference import Segmenter
        from kdas.tracking.references import resolve_model_file
        from kdas.tracking.registry import version_summary

        model_file = resolve_model_file(model_ref)
        seg = Segmenter.load(model_file, device)
        info = seg.info
        click.echo(version_summary(model_ref) or
                   f"model {model_file}: trained on {info.get('train_data', 'unknown data')} (MLflow run {info.get('mlflow_run_id', '?')})")
    # in a project, the sides params.yaml allows (a 9000 px square PNG of 258 KB took 8 GB); elsewhere, the pixel bound alone
    max_side = params_of(ctx).validation.max_size if Path(ctx.find_root().obj["params_path"]).exists() else None
    out.mkdir(parents=True, exist_ok=True)
    for path in images:
        image = read_rgb(path, max_side)
        mask = seg.predict([image])[0] >= threshold
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"{path.stem}_mask.png")
        Image.fromarray(overlay(image, mask)).save(out / f"{path.stem}_overlay.jpg", quality=90)
        click.echo(f"{path}: polyp covers {mask.mean():.1%} -> {out / (path.stem + '_mask.png')}")


def overlay(image: np.ndarray, mask: np.ndarray, rows: int = 1024) -> np.ndarray:
    """`image` half-blended with green where `mask` is, in uint8 and by blocks of rows (the
    whole image in floats took gigabytes for a 9000 px square)."""
    out = image.copy()
    for top in range(0, len(out), rows):
        block, inside = out[top : top + rows], mask[top : top + rows]
        block[inside] = block[inside] // 2 + GREEN_HALF
    return out


def is_onnx_file(ref: str) -> bool:
    """A local .onnx path (not an MLflow URI), run on onnxruntime."""
    return str(ref).lower().endswith(".onnx") and ":/" not in str(ref)
