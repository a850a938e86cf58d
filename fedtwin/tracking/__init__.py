"""MLflow, used as MLflow users expect: one experiment per study, one run per federated training.

- :mod:`fedtwin.tracking.run_tracker`: what the coordinator logs each round (params, metrics, artifacts).
- :mod:`fedtwin.tracking.registry`: the final twin in the MLflow Model Registry as a pyfunc.

Heavy imports (mlflow) happen inside the modules' functions, so importing this package is cheap.
"""
