"""gazemonai: gaze-supervised medical image segmentation (GazeSup, MICCAI 2024) for MONAI."""

__version__ = "0.1.0"
