"""Experiment tracking (``logger=``): what MLflow and TensorBoard hold after a run, read back with their own readers
(MlflowClient, the REST API of a real ``mlflow server``, TensorBoard's EventAccumulator); sweeps, resume and
``mode=eval``; a store that cannot be used stops the run before any work; the default imports neither library."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mgrq_runner.errors import ConfigError
from mgrq_runner.recon.curves import LossCurves, StepCallback
from mgrq_runner.run import run
from mgrq_runner.rundir import RECON_CURVES, TENSORBOARD_DIR, TRACKING_RUN
from mgrq_runner.settings import LoggerSettings, parse_settings
from mgrq_runner.tracking import check_writable_store, curve_points, final_metrics, flat_params, key_name, shown
from tests.conftest import compose_config, needs_fashion_mnist

needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="pip install -e '.[tracking]'")
needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="pip install -e '.[tracking]'"
)

# 12 iterations: curves at steps 0, 10 and 11 (every 10th and the last)
TINY = ("debug=smoke", "method.recon.iters=12", "data.num_eval=50", "threads=1")
STEPS = [0, 10, 11]
SCORES = ("top1", "top5", "fp_top1", "fp_top5", "fp_agreement", "num_calib", "num_eval")


def MlflowClient(tracking_uri: str) -> Any:  # noqa: N802 (imported when a test needs it)
    from mlflow.tracking import MlflowClient as client

    return client(tracking_uri=tracking_uri)


def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def tracked_run_id(run_dir: Path) -> str:
    return json.loads((run_dir / TRACKING_RUN).read_text())["run_id"]


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def mgrq_run(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mgrq_runner.cli", *args, "progress=false"]  # flags (-m) first
    return subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=cwd, env={**os.environ, **(env or {})}
    )


def stop_at(unit_name: str) -> StepCallback:
    def stopping(unit: str, step: int, terms: dict[str, float], total: int) -> None:
        if unit == unit_name:
            raise KeyboardInterrupt

    return stopping


def assert_logged(client: Any, run_id: str, results: dict[str, Any], run_dir: Path) -> None:
    """The MLflow run holds results.json's scores, every unit's final terms and its curves step by step."""
    metrics = client.get_run(run_id).data.metrics
    for key in SCORES:
        assert metrics[key] == results[key], key
    for row in results.get("reconstruction", []):
        for key in ("block", "block_soft", "block_hard", "undecided", "rounding"):
            assert metrics[f"recon/{row['unit']}/{key}"] == row[key], (row["unit"], key)
    curves = json.loads((run_dir / RECON_CURVES).read_text()) if results.get("reconstruction") else {}
    for unit, curve in curves.items():
        assert curve["step"] == STEPS and curve["rounding"][0] is None  # no regulariser in its warm-up
        for term in set(curve) - {"step"}:
            history = sorted(client.get_metric_history(run_id, f"curve/{unit}/{term}"), key=lambda m: m.step)
            expected = [(step, value) for step, value in zip(STEPS, curve[term], strict=True) if value is not None]
            assert [(m.step, m.value) for m in history] == expected, (unit, term)


# ---------------------------------------------------------------------------------------------- settings, pure parts


def test_logger_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert parse_settings(compose_config(tmp_path / "a")).logger == LoggerSettings()  # the default: none
    default = parse_settings(compose_config(tmp_path / "a", "logger=mlflow")).logger
    assert (
        default.tracking_uri == f"sqlite:///{tmp_path}/outputs/mlflow.db" and default.experiment_name == "mgrq-runner"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert parse_settings(compose_config(tmp_path / "a", "logger=mlflow")).logger.tracking_uri == "http://tracker:5000"
    given = parse_settings(compose_config(tmp_path / "a", "logger=mlflow", "logger.tracking_uri=sqlite:///x.db"))
    assert (given.logger.tracking_uri, given.logger.uri_source) == ("sqlite:///x.db", "logger.tracking_uri")
    swept = LoggerSettings.parse({"name": "mlflow"}, str(tmp_path / "experiments" / "table_w4a4"))
    assert swept.experiment_name == "experiments/table_w4a4"
    assert LoggerSettings.parse({"name": "mlflow", "experiment": "mine"}, str(tmp_path / "s")).experiment_name == "mine"
    with pytest.raises(ConfigError, match=r"^logger.name='wandb' is unknown. Fix: one of none, mlflow, tensorboard"):
        LoggerSettings.parse({"name": "wandb"}, None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(ConfigError, match=r"logger=mlflow needs mlflow.*Fix: pip install -e '\.\[tracking\]'"):
        LoggerSettings.parse({"name": "mlflow"}, None)


def test_keys_values_and_curves_as_logged(tmp_path: Path) -> None:
    config = {"a": {"b": [1, 2], "c": None, "d": True}, "long": "x" * 7000, "odd key!": 1.5, "empty": {}}
    params = flat_params(config)
    assert params == {
        "a.b": "[1, 2]",
        "a.c": "null",
        "a.d": "true",
        "long": "x" * 5997 + "...",
        "odd key_": "1.5",
        "empty": "{}",
    }
    assert key_name("curve//x") == "curve__x" and len(key_name("k" * 300)) == 250
    curves = LossCurves(tmp_path / RECON_CURVES)
    curves("u", 0, {"block": 1.0}, 3)
    curves("u", 1, {"block": 0.5, "rounding": 9.0}, 3)
    curves("u", 2, {"rounding": 8.0}, 3)
    assert curves.curves == {"u": {"step": [0, 1, 2], "block": [1.0, 0.5, None], "rounding": [None, 9.0, 8.0]}}
    assert list(curve_points(curves.curves)) == [
        ("curve/u/block", 1.0, 0),
        ("curve/u/block", 0.5, 1),
        ("curve/u/rounding", 9.0, 1),
        ("curve/u/rounding", 8.0, 2),
    ]
    older = {"u": {"step": [0, 10, 11], "block": [3.0, 2.0, 1.0], "rounding": [9.0, 8.0]}}  # unaligned lists
    assert [(k, s) for k, _, s in curve_points(older) if k.endswith("rounding")] == [
        ("curve/u/rounding", 10),
        ("curve/u/rounding", 11),
    ]
    metrics = final_metrics({"top1": 50.0, "fp_top1": None, "reconstruction": [{"unit": "blocks.0", "block": "nan"}]})
    assert metrics["top1"] == 50.0 and "fp_top1" not in metrics and str(metrics["recon/blocks.0/block"]) == "nan"


def test_the_default_logger_imports_neither_library(tmp_path: Path) -> None:
    code = (
        "import sys; from tests.conftest import compose_config; from mgrq_runner.run import run; "
        f"run(compose_config({str(tmp_path / 'run')!r}, 'method=minmax', 'debug=smoke', 'data.num_eval=20')); "
        "print(sorted(sys.modules))"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    modules = set(eval(done.stdout.strip().splitlines()[-1]))  # noqa: S307 (our own subprocess's output)
    assert "mgrq_runner.tracking" in modules
    assert not {m for m in modules if m.split(".")[0] in ("mlflow", "tensorboard") or "tensorboard" in m}


# ---------------------------------------------------------------------------------------------- MLflow


@needs_fashion_mnist
@needs_mlflow
def test_mlflow_run_logs_config_scores_curves_and_files(tmp_path: Path) -> None:
    uri = sqlite_uri(tmp_path)
    results, _ = run(compose_config(tmp_path / "run", *TINY, "logger=mlflow", f"logger.tracking_uri={uri}"))
    plain, _ = run(compose_config(tmp_path / "plain", *TINY))  # logger=none: the same numbers
    assert [results[k] for k in SCORES] == [plain[k] for k in SCORES]
    strip = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert strip(results["reconstruction"]) == strip(plain["reconstruction"])

    client = MlflowClient(tracking_uri=uri)
    run_id = tracked_run_id(tmp_path / "run")
    tracked = client.get_run(run_id)
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == "run"
    experiment = client.get_experiment(tracked.info.experiment_id)
    assert experiment.name == "mgrq-runner" and experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    params = tracked.data.params
    expected = leaves(results["config"])
    assert set(params) == set(expected)
    assert params["method.recon.iters"] == "12" and params["seed"] == "0" and params["logger.name"] == "mlflow"
    assert params["method.loss.local_layers"] == json.dumps(expected["method.loss.local_layers"])
    assert tracked.data.tags["mgrq.method"] == "mgrq" and tracked.data.tags["mgrq.status"] == "done"
    assert_logged(client, run_id, results, tmp_path / "run")

    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"results.json", "calibration_images.txt", "recon_curves.json"} <= names
    downloaded = client.download_artifacts(run_id, "results.json", str(tmp_path / "downloaded"))
    assert Path(downloaded).read_text() == (tmp_path / "run" / "results.json").read_text()
    assert (tmp_path / "store" / "mlartifacts").is_dir(), "artifacts beside the SQLite store"


@needs_fashion_mnist
@needs_mlflow
def test_a_sweep_is_one_experiment_with_a_run_per_job(tmp_path: Path) -> None:
    uri, sweep = sqlite_uri(tmp_path), tmp_path / "sweeps" / "grid"
    done = mgrq_run(
        tmp_path, "-m", *TINY, "logger=mlflow", "seed=0,1", f"hydra.sweep.dir={sweep}", env={"MLFLOW_TRACKING_URI": uri}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sweeps/grid")
    assert experiment is not None
    runs = sorted(client.search_runs([experiment.experiment_id]), key=lambda r: r.data.params["seed"])
    assert [r.data.params["seed"] for r in runs] == ["0", "1"]
    assert [r.info.run_name for r in runs] == ["0_proxy_vit_mgrq_w4a4", "1_proxy_vit_mgrq_w4a4"]
    for tracked in runs:
        run_dir = sweep / tracked.info.run_name
        assert tracked.info.status == "FINISHED" and tracked_run_id(run_dir) == tracked.info.run_id
        assert tracked.data.tags["mgrq.sweep_dir"] == str(sweep)
        assert_logged(client, tracked.info.run_id, json.loads((run_dir / "results.json").read_text()), run_dir)
        assert {a.path for a in client.list_artifacts(tracked.info.run_id, "hydra")} == {
            "hydra/config.yaml",
            "hydra/overrides.yaml",
        }
    assert len(client.search_experiments()) == 2, "the sweep's experiment and MLflow's own Default, nothing else"


@needs_fashion_mnist
@needs_mlflow
def test_runs_reach_an_mlflow_server_over_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real ``mlflow server``: the run logs through its REST API (artifacts through its proxy), and what it
    logged is read back through the same API."""
    port = closed_port()
    server = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        sqlite_uri(tmp_path),
        "--artifacts-destination",
        str(tmp_path / "served"),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runners to clean up
    log_file = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(server, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health in 180 s"
            time.sleep(0.2)

        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        results, _ = run(compose_config(tmp_path / "run", *TINY, "logger=mlflow"))

        def api(path: str, body: dict | None = None) -> dict:
            data = json.dumps(body).encode() if body is not None else None
            request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=data)
            request.add_header("Content-Type", "application/json")
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.loads(answer.read())

        experiment = api("experiments/get-by-name?experiment_name=mgrq-runner")["experiment"]
        found = api("runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        assert len(found) == 1 and found[0]["info"]["run_id"] == tracked_run_id(tmp_path / "run")
        assert found[0]["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in found[0]["data"]["metrics"]}
        assert all(metrics[key] == results[key] for key in SCORES)
        unit = results["reconstruction"][1]
        assert metrics[f"recon/{unit['unit']}/block_hard"] == unit["block_hard"]
        query = urllib.parse.urlencode({"run_id": found[0]["info"]["run_id"], "metric_key": "curve/blocks.0/block"})
        history = api(f"metrics/get-history?{query}")["metrics"]
        assert sorted(m["step"] for m in history) == STEPS
        listed = api(f"artifacts/list?run_id={found[0]['info']['run_id']}")["files"]
        assert "results.json" in {f["path"] for f in listed}
        stored = list((tmp_path / "served").rglob("results.json"))
        assert len(stored) == 1 and stored[0].read_text() == (tmp_path / "run" / "results.json").read_text()
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the workers it started (its own session)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log_file.close()


@needs_fashion_mnist
@needs_mlflow
def test_an_unreachable_tracker_stops_the_run_before_any_work(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    done = mgrq_run(
        tmp_path, *TINY, "logger=mlflow", f"hydra.run.dir={tmp_path / 'run'}", env={"MLFLOW_TRACKING_URI": uri}
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert f"the tracking server {uri} (MLFLOW_TRACKING_URI) cannot be reached" in output
    assert "logger=none" in output and time.monotonic() - start < 120
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and uri in results["error"] and results["error"].startswith("ConfigError")
    assert results["times"] == {} and "top1" not in results, "nothing was computed"
    assert not (tmp_path / "run" / "calibration_images.txt").exists() and not (tmp_path / "run" / RECON_CURVES).exists()


@needs_fashion_mnist
@needs_mlflow
def test_an_unwritable_store_stops_the_run_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    uri = f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}"
    with pytest.raises(
        ConfigError, match=rf"^logger=mlflow: the tracking store {uri} \(logger.tracking_uri\) cannot be used"
    ):
        run(compose_config(tmp_path / "run", *TINY, "logger=mlflow", f"logger.tracking_uri={uri}"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and results["times"] == {}


@needs_fashion_mnist
@needs_mlflow
def test_resume_continues_the_same_mlflow_run(tmp_path: Path) -> None:
    uri, run_dir = sqlite_uri(tmp_path), tmp_path / "run"
    overrides = (*TINY, "logger=mlflow", f"logger.tracking_uri={uri}")
    with pytest.raises(KeyboardInterrupt):
        run(compose_config(run_dir, *overrides), stop_at("blocks.1"))
    client = MlflowClient(tracking_uri=uri)
    run_id = tracked_run_id(run_dir)
    interrupted = client.get_run(run_id)
    assert interrupted.info.status == "KILLED" and interrupted.data.tags["mgrq.status"] == "interrupted"

    record = (run_dir / TRACKING_RUN).read_text()
    (run_dir / TRACKING_RUN).write_text(record.replace(run_id, "0" * 32))
    with pytest.raises(ConfigError, match=rf"^resume: MLflow run 0{{32}} of {run_dir} is not in {uri} .* Fix: remove"):
        run(compose_config(run_dir, *overrides, "resume=true"))
    (run_dir / TRACKING_RUN).write_text(record)

    results, _ = run(compose_config(run_dir, *overrides, "resume=true"))
    assert results["status"] == "done" and results["resumed_units"] == ["embed", "blocks.0"]
    assert tracked_run_id(run_dir) == run_id
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["mgrq.status"] == "done"
    assert len(client.search_runs([resumed.info.experiment_id])) == 1
    assert_logged(client, run_id, results, run_dir)  # every unit's curve once: the restored units' too


@needs_fashion_mnist
@needs_mlflow
def test_eval_of_an_export_is_nested_under_the_exporting_run(tmp_path: Path) -> None:
    uri = sqlite_uri(tmp_path)
    exported, _ = run(
        compose_config(tmp_path / "export", *TINY, "export=true", "logger=mlflow", f"logger.tracking_uri={uri}")
    )
    record_before = (tmp_path / "export" / TRACKING_RUN).read_text()
    evaluated, _ = run(
        compose_config(
            tmp_path / "eval",
            "debug=smoke",
            "data.num_eval=50",
            "mode=eval",
            f"checkpoint={tmp_path / 'export'}",
            "logger=mlflow",
            f"logger.tracking_uri={uri}",
        )
    )
    assert evaluated["top1"] == exported["top1"]
    client = MlflowClient(tracking_uri=uri)
    parent_id, child_id = tracked_run_id(tmp_path / "export"), tracked_run_id(tmp_path / "eval")
    parent, child = client.get_run(parent_id), client.get_run(child_id)
    assert child_id != parent_id and child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.info.experiment_id == parent.info.experiment_id and child.info.status == "FINISHED"
    assert child.data.tags["mgrq.mode"] == "eval" and child.data.tags["mgrq.checkpoint"] == str(tmp_path / "export")
    assert child.data.metrics["top1"] == evaluated["top1"] and "recon/blocks.0/block" not in child.data.metrics
    assert parent.data.metrics["top1"] == exported["top1"] and parent.info.status == "FINISHED"
    assert (tmp_path / "export" / TRACKING_RUN).read_text() == record_before, "mode=eval never writes its checkpoint"


# ---------------------------------------------------------------------------------------------- TensorBoard


@needs_fashion_mnist
@needs_tensorboard
def test_tensorboard_event_files_hold_scores_and_curves(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results, _ = run(compose_config(tmp_path / "run", *TINY, "logger=tensorboard"))
    events = EventAccumulator(str(tmp_path / "run" / TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for key in SCORES:
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(0, pytest.approx(results[key], rel=1e-6))], key
    for row in results["reconstruction"]:
        (final,) = events.Scalars(f"recon/{row['unit']}/block_hard")
        assert final.value == pytest.approx(row["block_hard"], rel=1e-6)
    curves = json.loads((tmp_path / "run" / RECON_CURVES).read_text())
    assert {f"curve/{unit}/{term}" for unit, curve in curves.items() for term in curve if term != "step"} <= tags
    for unit, curve in curves.items():
        points = events.Scalars(f"curve/{unit}/block")
        assert [e.step for e in points] == STEPS
        assert [e.value for e in points] == pytest.approx(curve["block"], rel=1e-6)
    assert {"config/text_summary", "status/text_summary"} <= set(events.Tags()["tensors"])


@needs_mlflow
def test_tracking_uris_are_checked_before_use(tmp_path: Path) -> None:
    """A malformed URI and an http URI without a host are one ConfigError at parse time (before, the malformed one
    was a traceback from the code that shows a URI); a SQLite store MLflow could not write is one line at once
    (SQLite found a read-only folder out after about 105 s of MLflow's retries). Writing is tried, not asked of the
    permission bits (as root every folder passes os.access): /proc takes no new file, for root either."""
    for uri, words in (
        ("http://[::1", "is malformed"),
        ("http://host:port", "is malformed"),
        ("http://", "names no host"),
    ):
        with pytest.raises(ConfigError, match=rf"^logger.tracking_uri: the tracking URI {words}"):
            LoggerSettings.parse({"name": "mlflow", "tracking_uri": uri}, None)
    assert shown("http://user:secret@[::1") == "http://user:***@[::1"
    with pytest.raises(ConfigError, match=r"cannot be used \(the folder /proc cannot be written \("):
        check_writable_store(Path("/proc/mgrq/mlflow.db"), "sqlite")
    store = tmp_path / "store" / "mlflow.db"
    store.mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"mlflow.db is not a file\)"):
        check_writable_store(store, "sqlite")
    store.rmdir()
    check_writable_store(store, "sqlite")  # a writable folder, no store yet: nothing said
    store.write_text("")
    check_writable_store(store, "sqlite")  # a writable store: nothing said, nothing written
    assert store.read_text() == ""
