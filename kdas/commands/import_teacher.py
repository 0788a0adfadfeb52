"""`kdas import-teacher`: an official Polyp-PVT checkpoint as a kdas model file."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("import-teacher")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", default=Path("models/teacher/best.pt"), show_default=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--backbone", default="pvt_v2_b2", show_default=True, help="The backbone the checkpoint was trained on.")
@click.option("--image-size", default=352, show_default=True, help="The size it was trained at.")
def import_teacher(checkpoint: Path, out: Path, backbone: str, image_size: int) -> None:
    """Turn an official Polyp-PVT checkpoint (PolypPVT.pth) into a kdas model file.

    The result is usable as `kdas train student --teacher OUT`.
    """
    from kdas.checkpoint import save_model
    from kdas.config import check_image_size
    from kdas.models.official import load_official_checkpoint

    check_image_size(image_size, "--image-size")  # before the seconds of conversion
    model = load_official_checkpoint(checkpoint, backbone=backbone)
    path = save_model(out, model, image_size=image_size, info={"role": "teacher", "source": f"official Polyp-PVT checkpoint {checkpoint.name}"})
    click.echo(f"{checkpoint} -> {path} (Polyp-PVT on {backbone}, {image_size} px); distil from it with "
               f"`kdas train student --teacher {path}`")
