"""Everything kdas tells MLflow, split by concern; the only package that imports mlflow.

- ``store``: where runs and the registry live (``MLFLOW_TRACKING_URI``, else
  ``sqlite:///<project>/mlflow/mlflow.db`` with artifacts in ``mlflow/artifacts``).
- ``runs``: the flow's parent run, one run per stage, and ``model_run``: a model's one
  record (its training run, resumed by evaluate and register). Params are logged flat.
  ``TrainingLog``: a training's per-epoch logging, which outlives a store that goes away.
- ``served``: the pyfunc served model (``SegmenterModel``, "models from code" around a kdas
  model file) and its per-request budget.
- ``references``: a path or ``models:/`` / ``runs:/`` URI to a local kdas model file.
- ``registry``: one version per model file, alias ``challenger``, its file checks and queries.
- ``promote``: ``champion`` moved to a challenger that passes the gate (on like-for-like
  evidence), and rollback.
- ``drift``: a drift verdict (kdas.monitoring) as a ``monitor`` run and version tags.

This file imports nothing: callers import the submodule they use (``from
kdas.tracking.runs import stage_run``), so a command that only logs a run does not load
the registry, the served model or the ONNX exporter, and a DVC stage depends on the
tracking code it runs, not on all of it.

What needs no MLflow is pure: the gate's rules (``rules``) and its decision (``promotion``);
outside, the image codec (kdas.serving.codec), provenance (kdas.provenance).
"""
