"""A registered bundle's MLflow "model from code": MLflow runs this file to build the model.

``registry`` logs this file as ``python_model`` instead of a pickled object, so loading a
registered version unpickles nothing: the model is :class:`~gazemonai.serve.registry.BundlePyfuncModel`
from the ``gazemonai`` code logged with it, and its weights are read with ``weights_only=True``.
Not for importing.
"""

import mlflow

from gazemonai.serve.registry import BundlePyfuncModel

mlflow.models.set_model(BundlePyfuncModel())
