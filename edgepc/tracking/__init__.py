"""MLflow tracking, the only package of edgepc that imports mlflow, split by concern:

- :mod:`~edgepc.tracking.store`: where runs are kept, the experiment, provenance;
- :mod:`~edgepc.tracking.tracker`: the writes of a pipeline (:class:`Tracker`, or
  :class:`NoTracking`), one parent run per invocation and one nested run per stage;
- :mod:`~edgepc.tracking.ops` and :mod:`~edgepc.tracking.spool`: each write as a replayable
  operation, spooled while the store is down, replayed by ``python -m edgepc.tracking.sync``;
- :mod:`~edgepc.tracking.registry`: bundles as registered model versions;
- :mod:`~edgepc.tracking.queries`: reading runs back.
"""

from edgepc.tracking.ops import OPS
from edgepc.tracking.queries import Runs
from edgepc.tracking.store import (
    EXPERIMENT,
    artifact_root,
    flatten,
    git_commit,
    open_store,
    store_folder,
    tracking_uri,
)
from edgepc.tracking.tracker import NoTracking, Tracker, Tracking, TrackingError

__all__ = ["EXPERIMENT", "OPS", "NoTracking", "Runs", "Tracker", "Tracking", "TrackingError",
           "artifact_root", "flatten", "git_commit", "open_store", "store_folder",
           "tracking_uri"]  # fmt: skip
