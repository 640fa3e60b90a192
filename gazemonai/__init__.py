"""gazemonai: gaze-supervised medical image segmentation (GazeSup, MICCAI 2024) for MONAI.

The sub-packages follow the data flow; each imports only those before it in this list:

* :mod:`gazemonai.errors`, :mod:`gazemonai.metrics` — the project's error types; Dice and IoU.
* :mod:`gazemonai.prep` — files in, arrays and data set folders out (image io, MR slices, synthetic data).
* :mod:`gazemonai.gaze` — fixations -> heatmap -> refined map -> pseudo-masks (functions, MONAI transforms).
* :mod:`gazemonai.train` — networks, losses, engine pieces and handlers the bundles' configs wire together.
* :mod:`gazemonai.serve` — a trained bundle staged as one folder and registered in MLflow.
* :mod:`gazemonai.cli`, :mod:`gazemonai.demo` — the ``gazemonai`` command and the demo.
"""

__version__ = "0.4.1"
