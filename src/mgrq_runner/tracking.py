"""Experiment tracking (``logger=``): each run's config, scores, loss curves and files, also in MLflow or TensorBoard.

``tracked(settings)`` wraps a job's pipeline, inside ``results.failure_recorded``; the job calls ``Tracker.finish`` once
the pipeline is done and results.json says so. The tracker is opened and checked first: a store that cannot be
reached or written is one ``ConfigError`` naming it and the fix, before any calibration or reconstruction. The
run's flattened config is logged as parameters at the start; everything else is logged at the end from the files
the run wrote (``results.json``, ``recon_curves.json``), so logging never touches a computed value. A job that fails
or is interrupted marks its tracked run FAILED or KILLED with the error. A tracker failing at the end is reported and
the run's results stand: they are complete in its run dir.

MLflow: one MLflow run per job, its id kept in the run dir (``TRACKING_RUN``): ``resume=`` continues that MLflow run,
and ``mode=eval`` of an export logs a nested run under the exporting run's. TensorBoard: event files in
``<run dir>/tensorboard/``. mlflow and tensorboard are imported only when chosen: ``logger=none`` (the default)
imports nothing new.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mgrq_runner.errors import ConfigError, DataError, Interrupted, MgrqError, error_message
from mgrq_runner.files import read_json, write_text_atomic
from mgrq_runner.results import read_results
from mgrq_runner.rundir import (
    CALIBRATION_LIST,
    CLASS_LIST,
    EXPORT_MANIFEST,
    MLFLOW_ARTIFACTS,
    RECON_CURVES,
    RESULTS,
    TENSORBOARD_DIR,
    TRACKING_RUN,
)
from mgrq_runner.settings import TRACKING_HINT, EvalSettings, JobSettings

log = logging.getLogger(__name__)

# results.json's top-level scores logged as metrics, and its groups of numbers (metric prefix: field)
SCORES = (
    "top1",
    "top5",
    "top1_err",
    "top5_err",
    "fp_top1",
    "fp_top5",
    "fp_agreement",
    "fp_transformed_top1",
    "fp_transformed_top5",
    "fp_transformed_agreement",
    "agreement_with_simulation",
    "num_calib",
    "num_eval",
    "param_count",
)
GROUPS = {
    "time": "times",
    "throughput": "throughput",
    "export": "export",
    "projection": "projection",
    "fp_transform": "fp_transform",
}
TAGS = ("model", "preset", "method", "w_bits", "a_bits", "dataset", "eval_split", "seed", "git_sha", "machine")
ARTIFACTS = (RESULTS, RECON_CURVES, CALIBRATION_LIST, CLASS_LIST, EXPORT_MANIFEST, "cli.log")
HYDRA_FILES = (".hydra/config.yaml", ".hydra/overrides.yaml")  # logged under hydra/
MAX_KEY = 250  # MLflow's limits: key length, parameter value length, tag value length, entities per request
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
BAD_KEY_CHARACTERS = re.compile(r"[^\w./\- :]")  # MLflow's parameter and metric names: letters, digits, _-./ :
PROBE_SECONDS = 10.0
MLFLOW_STATUS = {"failed": "FAILED", "interrupted": "KILLED"}
# A new experiment's tags: MLflow 3's UI opens it in its model-training view (runs, metrics), not the GenAI one
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


# ---------------------------------------------------------------------------------------------- the trackers


class Tracker:
    """The tracker interface, and ``logger=none``: every step does nothing."""

    def start(self) -> None:
        """Opens and checks the store (``ConfigError`` naming it when it cannot be used), logs the config."""

    def finish(self) -> None:
        """Logs the finished run from its files: scores, loss terms and curves, artifacts. Never raises an error of
        its own: the run's results are already complete in its run dir."""

    def fail(self, status: str, error: str) -> None:
        """Marks the tracked run ``status`` (failed | interrupted) with the error that ended it."""


@contextmanager
def tracked(settings: JobSettings) -> Iterator[Tracker]:
    """Opens the job's tracker (``settings.logger``) for the block; a failure or an interruption in the block is
    recorded in it and goes on. The caller calls ``finish`` after the block, once the results are written."""
    tracker = open_tracker(settings)
    tracker.start()
    try:
        yield tracker
    except (KeyboardInterrupt, Interrupted) as err:
        reason = f"signal {err.signum}" if isinstance(err, Interrupted) else "KeyboardInterrupt"
        _quietly(tracker.fail, "interrupted", f"interrupted ({reason}); resume with resume=true")
        raise
    except BaseException as err:
        _quietly(tracker.fail, "failed", f"{type(err).__name__}: {error_message(err)}")
        raise


def open_tracker(settings: JobSettings) -> Tracker:
    if settings.logger.name == "mlflow":
        return MlflowTracker(settings)
    if settings.logger.name == "tensorboard":
        return TensorBoardTracker(settings)
    return Tracker()


def _quietly(step: Any, *args: Any) -> None:
    """Runs a tracker's step whose failure must not replace the error being reported."""
    try:
        step(*args)
    except Exception as err:
        log.error("logging the run's end to the tracker failed: %s", _first_line(err))


class MlflowTracker(Tracker):
    """``logger=mlflow``: one MLflow run per job, through ``MlflowClient`` (no global active run)."""

    def __init__(self, settings: JobSettings) -> None:
        self.settings = settings
        self.uri = str(settings.logger.tracking_uri)
        self.run_id: str | None = None
        self.client: Any = None

    # -- start

    def start(self) -> None:
        probe(self.uri, str(self.settings.logger.uri_source))
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise ConfigError(
                f"logger=mlflow cannot import mlflow ({err}). Fix: {TRACKING_HINT}, or logger=none."
            ) from None
        store = sqlite_path(self.uri)
        if store is not None:
            check_writable_store(store, f"{shown(self.uri)} ({self.settings.logger.uri_source})")
        try:
            if store is not None:  # SQLite makes the file, not its folder
                store.parent.mkdir(parents=True, exist_ok=True)
            self.client = MlflowClient(tracking_uri=self.uri)
            run, reopened = self._open_run()
            self.run_id = run.info.run_id
            params = flat_params(self.settings.config)
            if reopened:  # a resumed run's parameters are logged already (and cannot change)
                params = {k: v for k, v in params.items() if k not in run.data.params}
            self._log(params=params, tags=self._start_tags())
            experiment = self.client.get_experiment(run.info.experiment_id).name
            record = {"tracking_uri": self.uri, "experiment_id": run.info.experiment_id, "experiment": experiment}
            write_text_atomic(self.settings.run_dir / TRACKING_RUN, json.dumps({**record, "run_id": self.run_id}))
        except BaseException as err:
            if self.run_id is not None:  # a run opened here does not stay RUNNING
                _quietly(self.client.set_terminated, self.run_id, "FAILED")
            if isinstance(err, MgrqError) or not isinstance(err, Exception):
                raise
            raise ConfigError(
                f"logger=mlflow: the tracking store {shown(self.uri)} ({self.settings.logger.uri_source}) cannot be "
                f"used ({_first_line(err)}). Fix: {self._fix()}."
            ) from None
        log.info("logger=mlflow: run %s of experiment %s in %s", self.run_id, experiment, shown(self.uri))

    def _fix(self) -> str:
        where = "logger.tracking_uri=<a reachable store> (or MLFLOW_TRACKING_URI)"
        if self.uri.startswith(("http://", "https://")):
            return f"start that server or set {where}, or run with logger=none"
        return f"set {where}, or run with logger=none"

    def _open_run(self) -> tuple[Any, bool]:
        """The MLflow run this job logs to, and whether it is an earlier one reopened: a resumed run's own, else a
        new run (``mode=eval``: nested under the exporting run's, when that run was tracked)."""
        settings = self.settings
        record = read_record(settings.run_dir) if settings.resume else None
        if record is not None:
            run = self._recorded_run(record, settings.run_dir, "resume")
            experiment = self.client.get_experiment(run.info.experiment_id).name
            if settings.logger.experiment is not None and settings.logger.experiment != experiment:
                raise ConfigError(
                    f"resume: {settings.run_dir} is MLflow run {run.info.run_id} of experiment {experiment}, but "
                    f"logger.experiment={settings.logger.experiment}. Fix: logger.experiment={experiment} (or drop it)."
                )
            self.client.update_run(run.info.run_id, status="RUNNING")
            return run, True
        tags = {}
        parent = None
        if isinstance(settings, EvalSettings):
            exported = read_record(settings.checkpoint)
            if exported is not None:
                parent = self._recorded_run(exported, settings.checkpoint, "mode=eval")
                tags["mlflow.parentRunId"] = parent.info.run_id
            else:
                log.info("logger=mlflow: %s was not tracked; this evaluation is a run of its own", settings.checkpoint)
        experiment_id = parent.info.experiment_id if parent is not None else self._experiment_id()
        run = self.client.create_run(experiment_id, run_name=settings.run_dir.name, tags=tags)
        return run, False

    def _recorded_run(self, record: Mapping[str, Any], run_dir: Path, purpose: str) -> Any:
        """The MLflow run a run dir's record names, checked to be a live run of the same store and experiment."""
        from mlflow.exceptions import MlflowException

        where, run_id = record.get("tracking_uri"), str(record.get("run_id"))
        if where != self.uri:
            raise ConfigError(
                f"{purpose}: {run_dir} was tracked in {shown(str(where))}, not in {shown(self.uri)}. Fix: "
                f"logger.tracking_uri={shown(str(where))} (or MLFLOW_TRACKING_URI), or logger=none."
            )
        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage != "active" or run.info.experiment_id != record.get("experiment_id"):
            fix = (
                f"remove {run_dir / TRACKING_RUN} to log the resumed run as a new MLflow run"
                if purpose == "resume"
                else f"logger=none, or copy the checkpoint without its {TRACKING_RUN} to log this evaluation on its own"
            )
            raise ConfigError(
                f"{purpose}: MLflow run {run_id} of {run_dir} is not in {shown(self.uri)} (deleted, or the store "
                f"was replaced). Fix: {fix}."
            )
        return run

    def _experiment_id(self) -> str:
        """The experiment's id, the experiment made when new (a sweep's parallel jobs may race to make it)."""
        from mlflow.exceptions import MlflowException

        name = self.settings.logger.experiment_name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(
                    name, artifact_location=artifact_location(self.uri), tags=EXPERIMENT_TAGS
                )
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(name)
        if experiment.lifecycle_stage != "active":
            raise ConfigError(
                f"logger=mlflow: experiment {name} of {shown(self.uri)} is deleted. Fix: restore it (mlflow "
                f"experiments restore --experiment-id {experiment.experiment_id}), or logger.experiment=<another name>."
            )
        return experiment.experiment_id

    def _start_tags(self) -> dict[str, str]:
        settings = self.settings
        tags = {"mgrq.run_dir": str(settings.run_dir.absolute()), "mgrq.mode": settings.mode}
        if settings.logger.sweep_dir is not None:
            tags["mgrq.sweep_dir"] = str(settings.logger.sweep_dir)
        if isinstance(settings, EvalSettings):
            tags["mgrq.checkpoint"] = str(settings.checkpoint)
        return tags

    # -- logging

    def _log(
        self,
        metrics: Iterable[tuple[str, float, int]] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Logs in requests within MLflow's limits; metrics as (key, value, step)."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        points = [Metric(key, value, now, step) for key, value, step in metrics]
        for start in range(0, len(points), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=points[start : start + MAX_METRICS_PER_BATCH])
        entries = [Param(k, v) for k, v in (params or {}).items()]
        for start in range(0, len(entries), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=entries[start : start + MAX_PARAMS_PER_BATCH])
        labels = [RunTag(key_name(k), v[:MAX_TAG_VALUE]) for k, v in (tags or {}).items()]
        for start in range(0, len(labels), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=labels[start : start + MAX_PARAMS_PER_BATCH])

    def finish(self) -> None:
        try:
            # a server gone since the start: one line now, not minutes of the client's retries
            probe(self.uri, str(self.settings.logger.uri_source))
            results = read_results(self.settings.run_dir)
            curves = run_curves(self.settings.run_dir) if results.get("reconstruction") else {}
            metrics = [(k, v, 0) for k, v in final_metrics(results).items()] + list(curve_points(curves))
            self._log(metrics=metrics, tags=result_tags(results))
            for path, folder in artifact_files(self.settings.run_dir):
                self.client.log_artifact(self.run_id, str(path), artifact_path=folder)
            self.client.set_terminated(self.run_id, "FINISHED")
        except Exception as err:
            message = _first_line(err)
            log.error(
                "logger=mlflow: logging the results to run %s of %s failed (%s); they are complete in %s",
                self.run_id,
                shown(self.uri),
                message,
                self.settings.run_dir,
            )
            _quietly(self.fail, "failed", f"logging the results failed: {message}")

    def fail(self, status: str, error: str) -> None:
        if self.run_id is None:
            return
        probe(self.uri, str(self.settings.logger.uri_source))
        self._log(tags={"mgrq.status": status, "mgrq.error": error})
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))


class TensorBoardTracker(Tracker):
    """``logger=tensorboard``: event files in ``<run dir>/tensorboard/``, written with torch's ``SummaryWriter``.
    A new run's folder starts empty; a resumed run's keeps what the interrupted one wrote."""

    def __init__(self, settings: JobSettings) -> None:
        self.settings = settings
        self.directory = settings.run_dir / TENSORBOARD_DIR

    def _writer(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.directory))

    def start(self) -> None:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as err:
            raise ConfigError(
                f"logger=tensorboard cannot import tensorboard ({err}). Fix: {TRACKING_HINT}, or logger=none."
            ) from None
        if self.directory.is_symlink():
            raise ConfigError(
                f"{self.directory} is a symbolic link: a run writes its own files, never through a link. "
                f"Fix: remove {self.directory}."
            )
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if not self.settings.resume:  # an earlier run's events in this run dir are not this run's
                for old in self.directory.glob("events.out.tfevents.*"):
                    old.unlink()
            with self._writer() as writer:
                writer.add_text("config", params_table(flat_params(self.settings.config)), 0)
        except OSError as err:
            raise ConfigError(
                f"logger=tensorboard: {self.directory} cannot be written ({err.strerror or err}). Fix: a writable "
                "hydra.run.dir, or logger=none."
            ) from None

    def finish(self) -> None:
        try:
            results = read_results(self.settings.run_dir)
            curves = run_curves(self.settings.run_dir) if results.get("reconstruction") else {}
            with self._writer() as writer:
                for key, value in final_metrics(results).items():
                    writer.add_scalar(key, value, 0)
                for key, value, step in curve_points(curves):
                    writer.add_scalar(key, value, step)
                writer.add_text("status", str(results.get("status")), 0)
        except Exception as err:
            log.error(
                "logger=tensorboard: writing %s failed (%s); the results are complete in %s",
                self.directory,
                _first_line(err),
                self.settings.run_dir,
            )

    def fail(self, status: str, error: str) -> None:
        with self._writer() as writer:
            writer.add_text("status", f"{status}: {error}", 0)


# ---------------------------------------------------------------------------------------------- what is logged


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested mapping; an empty mapping is a leaf."""
    if isinstance(tree, Mapping) and tree:
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, tree


def key_name(key: str) -> str:
    """A parameter, metric or tag key MLflow accepts: other characters become ``_``; no path that normalises to
    another name (``a//b``); at most 250 characters."""
    key = BAD_KEY_CHARACTERS.sub("_", key)
    if key and posixpath.normpath(key) != key:
        key = key.replace("/", "_")
    return key[:MAX_KEY]


def flat_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The resolved config as parameters: dotted keys, values as text (lists, mappings, booleans and null as
    JSON), a value longer than MLflow's 6000 characters cut with ``...``."""
    params = {}
    for key, value in _leaves(config):
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        params[key_name(key)] = text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."
    return params


def params_table(params: Mapping[str, str]) -> str:
    """The parameters as a Markdown table (TensorBoard's text tab)."""
    rows = [f"| {key} | {value.replace('|', '&#124;')} |" for key, value in params.items()]
    return "\n".join(["| key | value |", "|---|---|", *rows])


def _number(value: Any) -> float | None:
    """A metric value: numbers, and the non-finite losses results.json writes as text ("nan", "inf")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
        return float(value)
    return None


def final_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """results.json's numbers as metrics: the scores (``top1``, ``fp_top1``, ``fp_agreement``...), ``time/<stage>``
    and ``time/total``, ``throughput/<model>``, the export's and a projection's figures, and every reconstructed
    unit's final loss terms, convergence figures and seconds (``recon/<unit>/<term>``)."""
    metrics: dict[str, float] = {}
    for key in SCORES:
        value = _number(results.get(key))
        if value is not None:
            metrics[key] = value
    for prefix, field in GROUPS.items():
        for key, value in _leaves(results.get(field) or {}):
            number = _number(value)
            if number is not None and key:
                metrics[f"{prefix}/{key}"] = number
    times = [v for v in (results.get("times") or {}).values() if _number(v) is not None]
    if times:
        metrics["time/total"] = round(sum(times), 3)
    for row in results.get("reconstruction") or []:
        for key, value in row.items():
            number = _number(value)
            if key != "unit" and number is not None:
                metrics[f"recon/{row['unit']}/{key}"] = number
    return {key_name(k): v for k, v in metrics.items()}


def curve_points(curves: Mapping[str, Any]) -> Iterator[tuple[str, float, int]]:
    """recon_curves.json as (``curve/<unit>/<term>``, value, step): one step-wise metric per unit and term. Each
    term's list is aligned with ``step`` (null where the term was not computed); in a file from before that, a
    shorter list belongs to the last steps (the rounding regulariser starts after its warm-up)."""
    for unit, curve in curves.items():
        steps = curve.get("step", [])
        for term, values in curve.items():
            if term == "step" or not isinstance(values, list):
                continue
            for step, value in zip(steps[max(0, len(steps) - len(values)) :], values, strict=False):
                number = _number(value)
                if number is not None:
                    yield key_name(f"curve/{unit}/{term}"), number, int(step)


def result_tags(results: Mapping[str, Any]) -> dict[str, str]:
    """What ran, as tags (``mgrq.model``, ``mgrq.method``...) and the run's status."""
    tags = {f"mgrq.{key}": str(results[key]) for key in TAGS if results.get(key) is not None}
    tags["mgrq.status"] = str(results.get("status"))
    return tags


def artifact_files(run_dir: Path) -> Iterator[tuple[Path, str | None]]:
    """The run's small files (results.json, curves, calibration and class lists, export manifest, log, Hydra config,
    plots) and the artifact folder of each; a symbolic link is not followed."""
    candidates = [(run_dir / name, None) for name in ARTIFACTS]
    candidates += [(run_dir / name, "hydra") for name in HYDRA_FILES]
    candidates += [(path, "plots") for path in sorted(run_dir.glob("*.png"))]
    for path, folder in candidates:
        if path.is_file() and not path.is_symlink():
            yield path, folder


def run_curves(run_dir: Path) -> dict[str, Any]:
    """The run's loss curves (``recon_curves.json``), read as the run left them."""
    return read_json(run_dir / RECON_CURVES, "loss curves", "rerun the job (resume=true)", follow_links=False)


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """A run dir's ``TRACKING_RUN`` record (store, experiment, MLflow run id), or None when it has none."""
    try:
        record = read_json(run_dir / TRACKING_RUN, "tracking record", "none needed", follow_links=False)
    except DataError:
        return None
    return record if record.get("run_id") else None


# ---------------------------------------------------------------------------------------------- the store


def probe(uri: str, source: str, timeout: float = PROBE_SECONDS) -> None:
    """An http(s) tracking server must answer within ``timeout`` (any HTTP status: the server is there); MLflow's
    own client retries an unreachable one for minutes before it gives up."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri, timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise ConfigError(
            f"logger=mlflow: the tracking server {shown(uri)} ({source}) cannot be reached ({reason}). Fix: start "
            "that server, or set logger.tracking_uri=<a reachable store> (or MLFLOW_TRACKING_URI), or run with "
            "logger=none."
        ) from None


def check_writable_store(store: Path, named: str) -> None:
    """A SQLite store MLflow can write: the file, when it exists, and the folder SQLite writes its journal in (or
    the nearest existing one, where the folder will be made). SQLite finds a read-only one out only after MLflow's
    retries (about 105 s). Tried, not asked: permission bits say nothing for root or on a read-only mount."""
    folder = next(p for p in store.parents if p.exists())  # the root always exists
    problem = f"{store} is not a file" if store.exists() and not store.is_file() else _write_problem(store, folder)
    if problem is None:
        return
    raise ConfigError(
        f"logger=mlflow: the tracking store {named} cannot be used ({problem}). Fix: "
        "logger.tracking_uri=sqlite:////<a writable folder>/mlflow.db, or logger=none."
    )


def _write_problem(store: Path, folder: Path) -> str | None:
    """Why SQLite could not write ``store`` (when it exists) or a file in ``folder``; None when it can."""
    try:
        if store.exists():
            with store.open("ab"):  # opened for appending, nothing written
                pass
    except OSError as err:
        return f"{store} is not a writable file ({err.strerror})"
    try:
        with tempfile.NamedTemporaryFile(dir=folder):  # SQLite's journal goes beside the store
            return None
    except OSError as err:
        return f"the folder {folder} cannot be written ({err.strerror})"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///<path>`` URI (absolute with four slashes), or None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path).absolute() if path and path != ":memory:" else None


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store (``<its folder>/mlartifacts``, e.g.
    ``outputs/mlartifacts`` for the default store), else the store's own default (a server's, for http)."""
    store = sqlite_path(uri)
    return str(store.parent / MLFLOW_ARTIFACTS) if store is not None else None


def shown(uri: str) -> str:
    """The URI without a password it may hold (``user:***@host``); a URI that cannot be parsed loses anything
    between ``:`` and ``@``."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return re.sub(r"//([^/:@]*):[^/@]*@", r"//\1:***@", uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _first_line(err: BaseException) -> str:
    text = error_message(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= 300 else line[:297] + "..."
