"""kdas: knowledge distillation via attention supervision for polyp segmentation."""

__version__ = "0.1.0"
