"""Everything kdas tells MLflow, split by concern; the only package that imports mlflow.

- ``store``: where runs and the registry live (``MLFLOW_TRACKING_URI``, else
  ``sqlite:///<project>/mlflow/mlflow.db`` with artifacts in ``mlflow/artifacts``).
- ``runs``: the flow's parent run, one run per stage, and ``model_run``: a model's one
  record (its training run, resumed by evaluate and register). Params are logged flat.
  ``TrainingLog``: a training's per-epoch logging, which outlives a store that goes away.
- ``served``: the pyfunc served model (``SegmenterModel``, "models from code" around a kdas
  model file) and its per-request budget.
- ``references``: a path or ``models:/`` / ``runs:/`` URI to a local kdas model file.
- ``registry``: one version per model file, ``challenger`` / ``champion`` aliases,
  promotion on like-for-like evidence, rollback.

What needs no MLflow lives outside: the promotion decision (kdas.promotion), the image
codec (kdas.codec), provenance (kdas.provenance).
"""

from kdas.tracking.references import is_model_uri, model_cache_dir, resolve_model_file
from kdas.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    RegisteredVersion,
    RegistryError,
    champion_metrics,
    promote,
    register_model,
    rollback,
    version_summary,
)
from kdas.tracking.runs import (
    PARENT_RUN_ENV,
    TrainingLog,
    bound_http_waits,
    log_artifacts,
    log_data_lineage,
    log_dict,
    log_metrics,
    log_params,
    model_run,
    pipeline_run,
    stage_run,
)
from kdas.tracking.served import RUNTIME_DEFAULTS, SegmenterModel, log_segmenter
from kdas.tracking.store import EXPERIMENT_ENV, ensure_experiment, tracking_uri

__all__ = [
    "CHALLENGER", "CHAMPION", "EXPERIMENT_ENV", "PARENT_RUN_ENV", "RUNTIME_DEFAULTS", "RegisteredVersion", "RegistryError",
    "SegmenterModel", "TrainingLog", "bound_http_waits", "champion_metrics", "ensure_experiment", "is_model_uri", "log_artifacts",
    "log_data_lineage", "log_dict", "log_metrics", "log_params", "log_segmenter", "model_cache_dir", "model_run",
    "pipeline_run", "promote", "register_model", "resolve_model_file", "rollback", "stage_run", "tracking_uri",
    "version_summary",
]  # fmt: skip
