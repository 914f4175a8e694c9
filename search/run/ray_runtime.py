"""Starting or attaching Ray quietly, with scoped environment settings.

A local Ray binds loopback only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray pick 127.0.0.1
as the node address, so gcs_server, raylet, workers and agents listen there;
``_node_ip_address="127.0.0.1"`` alone is rewritten to the machine's outward address) and keeps
token auth on. The environment settings are scoped to Ray's start and Tune's run
(:func:`scoped_env`): a notebook or test process that also uses Ray keeps its own defaults.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from search.errors import UserError
from search.run import ray_compat


def cluster_address(address: str | None) -> str | None:
    """--address, else $RAY_ADDRESS, else None (start a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


# Environment defaults for a quiet search (a user's own settings win). Set only while Ray
# starts (START_ENV: the raylet and workers inherit it) and while Tune runs (TUNE_ENV), then
# removed again: a notebook or test process that also uses Ray directly keeps its own defaults.
START_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",  # the workers' torch/ray deprecations
}
TUNE_ENV = {
    # The new output engine prints a configuration box and paths even at verbose=0.
    "RAY_AIR_NEW_OUTPUT": "0",
    # The Recorder writes what matters; Ray's per-result CSV/JSON/TBX files cost time per report.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # Failed trials are reported by the Recorder (one line), not with a full traceback each.
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",
    # num_to_keep forces frequent experiment snapshots (wanted: a resume loses little).
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
QUIET_ENV = {**START_ENV, **TUNE_ENV}  # what a submitted job's driver gets
# Local clusters only: bind loopback. (Token auth stays on, Ray's default; its "enabled by
# default" warning is silenced below. Setting RAY_AUTH_MODE here would not do: Ray caches the
# mode when first imported, and a driver and its gcs_server that disagree cannot talk.)
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
_NOISY_LOGGERS = (
    # Warns that result.json files are missing: the auto loggers are off on purpose.
    "ray.tune.analysis.experiment_analysis",
    "ray.tune.impl.tuner_internal",
    "ray._private.authentication.authentication_token_setup",
)


@contextlib.contextmanager
def scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Set the variables not already set, for the duration of the block only."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def quiet_logging() -> None:
    """Lower or filter Ray's and Optuna's chatter (process-wide, idempotent)."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, kind in (("ray.tune.tune", ray_compat.DropIncomplete),
                       ("ray.tune.execution.tune_controller", ray_compat.DropStaleCheckpoint),
                       ("ray.tune.execution.experiment_state", ray_compat.DropSyncRace)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray_compat.raylet_errors_to_stderr()


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Start a local Ray (loopback only) or attach to ``address``; True if this call did.

    An already initialised Ray (a test fixture, a notebook) is used as is.
    """
    address = cluster_address(address)
    quiet_logging()
    import ray

    if ray.is_initialized():
        return False
    if address is not None:
        with scoped_env(START_ENV):
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise UserError(f"--address {address}: cannot attach to the Ray cluster ({e})") from None
        return True
    with scoped_env({**START_ENV, **LOCAL_ENV}), ray_compat.ray_cluster_flag(
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] != "0"):
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False, configure_logging=True)
    return True


