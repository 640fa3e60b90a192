"""A trained bundle, made usable elsewhere: staged as one folder, registered in MLflow.

``staging`` (standard library only, so MONAI Label's own environment can import it) writes a
bundle's configs and a checkpoint as one servable folder; ``registry`` logs it as an
``mlflow.pyfunc`` model and registers it.

The top of the package: it may import :mod:`gazemonai.train`, nothing imports it but the CLI.
"""
