"""Bad values, invented keys, failing sweep jobs and termination signals: one line, a status, nothing lost."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mgrq_runner.analysis.runs import KILLED, load_run
from mgrq_runner.errors import ConfigError
from mgrq_runner.files import write_text_atomic
from mgrq_runner.run import run
from mgrq_runner.rundir import locked
from mgrq_runner.settings import check_overrides
from tests.conftest import compose_config, needs_fashion_mnist

SMOKE = ("debug=smoke", "data.num_eval=100")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=abc", "seed='abc' is not allowed. Fix: seed=<an integer >= 0>"),
        ("calib.num_images=0", "calib.num_images=0 is not allowed"),
        ("calib.num_images=-5", "calib.num_images=-5 is not allowed"),
        ("calib.num_images=abc", "calib.num_images='abc' is not allowed"),
        ("threads=0", "threads=0 is not allowed"),
        ("device=banana", "device='banana' is unknown. Fix: device=auto, cpu"),
        ("eval.world_size=two", "eval.world_size='two' is not allowed. Fix: eval.world_size=<an integer from 1"),
        ("eval.world_size=0", "eval.world_size=0 is not allowed"),
        ("eval.world_size=4096", "eval.world_size=4096 is not allowed"),
        ("method.recon.iters=abc", "method.recon.iters='abc' is not an integer"),
        ("method.loss.temperature=hot", "method.loss.temperature='hot' is not a number"),
        ("data.workers=-1", "data.workers=-1 is not allowed"),
        ("mode=bogus", "mode='bogus' is unknown"),
    ],
)
def test_bad_values_are_refused_before_any_work(tmp_path: Path, override: str, message: str) -> None:
    cfg = compose_config(tmp_path / "run", "method=mgrq", override)
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace("+", r"\+")):
        run(cfg)
    assert not (tmp_path / "run" / "results.json").exists(), "nothing ran"


def test_invented_keys_are_refused_with_the_close_one(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "+quant.wbits=3")
    with pytest.raises(ConfigError, match=r"\+quant.wbits=3: quant.wbits is not a setting .* Fix: quant.w_bits=3"):
        check_overrides(["+quant.wbits=3"], cfg)
    with pytest.raises(ConfigError, match="dry_runn is not a setting"):
        check_overrides(["++dry_runn=true"], compose_config(tmp_path, "++dry_runn=true"))
    check_overrides(["quant.w_bits=3", "+hydra.job.env_set.X=1"], cfg)  # plain overrides and hydra's own pass


def test_concurrent_atomic_writes_never_leave_a_broken_file(tmp_path: Path) -> None:
    """Writers in several processes, a reader in this one: every read parses (unique temporary names). The writers
    write until told to stop, and the reader stops them only once it has read every writer's output at least once:
    the reads overlap the writes however fast or slow the machine is."""
    path, stop = tmp_path / "results.json", tmp_path / "stop"
    write_text_atomic(path, json.dumps({"writer": -1}))
    code = (
        "import json, sys\nfrom pathlib import Path\nfrom mgrq_runner.files import write_text_atomic\n"
        "path, stop, me = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])\n"
        "while not stop.exists():\n    write_text_atomic(path, json.dumps({'writer': me, 'pad': 'x' * 50000}))\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", code, str(path), str(stop), str(k)]) for k in range(3)]
    seen, reads = set(), 0
    try:
        while not {0, 1, 2} <= seen or reads < 200:
            seen.add(json.loads(path.read_text())["writer"])  # a torn file would not parse
            reads += 1
            assert all(w.poll() is None for w in writers), "a writer died"
    finally:
        stop.touch()
    assert all(w.wait(timeout=60) == 0 for w in writers)
    assert not list(tmp_path.glob("*.tmp")), "no temporary file is left behind"


def mgrq_run(
    *args: str, multirun: bool = False, default_signal: int | None = None, stderr: Any = subprocess.PIPE
) -> subprocess.Popen:
    """``mgrq-run`` in a child process; ``default_signal``: that signal's disposition reset to the default in the
    child, whatever the test's launcher gave it (``nohup`` or a background job starts with SIGINT ignored)."""
    flags = ["--multirun"] if multirun else []
    reset = None if default_signal is None else functools.partial(signal.signal, default_signal, signal.SIG_DFL)
    return subprocess.Popen(
        [sys.executable, "-m", "mgrq_runner.cli", *flags, "progress=false", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        preexec_fn=reset,  # noqa: PLW1509 (a signal reset only, nothing that could deadlock)
    )


@needs_fashion_mnist
def test_a_sweep_with_a_failed_job_exits_nonzero_and_records_it(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    job = mgrq_run("method=minmax", "quant.w_bits=4,99", *SMOKE, f"hydra.sweep.dir={sweep}", multirun=True)
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 1, stderr[-3000:]
    results = {json.loads(p.read_text())["status"]: json.loads(p.read_text()) for p in sweep.rglob("results.json")}
    assert set(results) == {"done", "failed"}
    failed = results["failed"]
    assert "quant.w_bits=99 is outside 2..8" in failed["error"] and "quant.w_bits=99" in failed["overrides"]
    assert failed["method"] == "minmax" and failed["w_bits"] == 99
    assert "1 job(s) of the sweep did not finish" in stdout + stderr


@needs_fashion_mnist
def test_a_rerun_sweep_counts_the_jobs_it_refused(tmp_path: Path) -> None:
    """Rerun into the same sweep dir, jobs refused (resume with another config) keep their earlier done records:
    the sweep still exits 1 and names them, by what each job did in this sweep."""
    sweep = tmp_path / "sweep"
    first = mgrq_run("method=minmax", "seed=0,1", *SMOKE, f"hydra.sweep.dir={sweep}", multirun=True)
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    rerun = ("method=minmax", "seed=0,1", "quant.input_bits=6", "resume=true", *SMOKE, f"hydra.sweep.dir={sweep}")
    again = mgrq_run(*rerun, multirun=True)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 1, stderr[-3000:]
    assert "2 job(s) of the sweep did not finish" in stdout + stderr and "(failed)" in stdout + stderr
    assert [json.loads(p.read_text())["status"] for p in sorted(sweep.rglob("results.json"))] == ["done", "done"]


@needs_fashion_mnist
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_run_resumably(tmp_path: Path, signum: signal.Signals) -> None:
    """SIGTERM (a scheduler's) or SIGINT once a unit is finished: exit 128+signal, one line, results.json says
    interrupted and lists the finished units, the curves so far are saved; resume=true finishes the run."""
    run_dir = tmp_path / "run"
    args = ("method=mgrq", "method.recon.iters=60", *SMOKE, f"hydra.run.dir={run_dir}")
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as stderr_file:
        job = mgrq_run(*args, default_signal=signum, stderr=stderr_file)
    results_path = run_dir / "results.json"
    assert job.stdout is not None
    finished_units = 0
    for line in job.stdout:  # the engine logs a unit after saving it: signal once two are saved
        finished_units += "[mgrq_runner.recon.engine][INFO] - unit " in line
        if finished_units == 2:
            break
    assert finished_units == 2, "the run ended before two units were finished"
    os.kill(job.pid, signum)
    job.communicate(timeout=120)
    stderr = errors.read_text()
    assert job.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr and f"interrupted by {signum.name}" in stderr
    partial = json.loads(results_path.read_text())
    assert partial["status"] == "interrupted" and len(partial["resumable"]["finished_units"]) >= 2
    curves = json.loads((run_dir / "recon_curves.json").read_text())
    assert set(partial["resumable"]["finished_units"]) <= set(curves)

    resumed = mgrq_run(*args, "resume=true")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    done = json.loads(results_path.read_text())
    assert done["status"] == "done" and done["resumed_units"] == partial["resumable"]["finished_units"]
    units = [row["unit"] for row in done["reconstruction"]]
    assert list(json.loads((run_dir / "recon_curves.json").read_text())) == units, "restored units keep curves"


@needs_fashion_mnist
def test_a_killed_run_reads_as_interrupted_and_resumes(tmp_path: Path) -> None:
    """SIGKILL leaves a run no chance to record how it ended: results.json still says running. The collector asks
    the run dir's lock, finds no owner and reads the run as interrupted (killed); resume=true finishes it."""
    run_dir = tmp_path / "run"
    args = ("method=mgrq", "method.recon.iters=60", *SMOKE, f"hydra.run.dir={run_dir}")
    job = mgrq_run(*args, stderr=subprocess.DEVNULL)
    assert job.stdout is not None
    for line in job.stdout:  # a unit saved: there is something to resume
        if "[mgrq_runner.recon.engine][INFO] - unit " in line:
            break
    else:
        pytest.fail("the run ended before a unit was finished")
    job.send_signal(signal.SIGSTOP)  # held still: it can neither finish nor write while the collector asks
    assert load_run(run_dir).status == "running", "a live run (its lock held) is not called killed"
    job.kill()
    job.communicate(timeout=120)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "running"
    killed = load_run(run_dir)
    assert (killed.status, killed.error) == ("interrupted", KILLED)

    resumed = mgrq_run(*args, "resume=true")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    done = json.loads((run_dir / "results.json").read_text())
    assert done["status"] == "done" and done["resumed_units"]
    assert load_run(run_dir).status == "done"


def test_a_run_dir_in_use_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with locked(run_dir):
        with pytest.raises(ConfigError, match=rf"run dir {run_dir} is in use by pid {os.getpid()}, started "):
            run(compose_config(run_dir, "method=fp"))
    assert not (run_dir / "results.json").exists()


@needs_fashion_mnist
def test_a_refused_resume_leaves_the_run_as_it_was(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = mgrq_run("method=minmax", *SMOKE, "quant=w3a3", f"hydra.run.dir={run_dir}")
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    before = {p.name: p.read_text() for p in [run_dir / "results.json", *(run_dir / ".hydra").glob("*.yaml")]}
    refused = mgrq_run("method=minmax", *SMOKE, "quant=w2a4", "resume=true", f"hydra.run.dir={run_dir}")
    _, stderr = refused.communicate(timeout=300)
    message = " ".join(stderr.split())  # the console wraps long lines
    assert refused.returncode == 2 and "different config (quant.a_bits: 3 -> 4, quant.w_bits: 3 -> 2)" in message
    after = {p.name: p.read_text() for p in [run_dir / "results.json", *(run_dir / ".hydra").glob("*.yaml")]}
    assert after == before


def test_an_unwritable_run_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    job = mgrq_run("method=fp", f"hydra.run.dir={blocker / 'run'}")
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 2 and "Traceback" not in stdout + stderr
    text = " ".join(stderr.split())  # the console wraps long lines
    assert "cannot be written (Not a directory)" in text and "Fix: hydra.run.dir=" in text


def test_two_sweeps_in_one_sweep_dir_count_their_own_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sweeps share a sweep dir (each in its own process, so each with its own MGRQ_SWEEP_ID): job 0 fails in
    the first and is done in the second. Each sweep's end counts its own records: the first exits 1, the second
    does not (before, job 0's records were one file and the later one hid the failure)."""
    from types import SimpleNamespace

    from hydra.types import RunMode

    from mgrq_runner.cli import SWEEP_ID, SweepFailures, SweepJob

    monkeypatch.delenv(SWEEP_ID, raising=False)  # restored to unset after the test
    hydra_cfg = SimpleNamespace(
        mode=RunMode.MULTIRUN, sweep=SimpleNamespace(dir=str(tmp_path)), job=SimpleNamespace(num=0)
    )
    config = SimpleNamespace(hydra=hydra_cfg)
    SweepFailures().on_multirun_start(config)
    first_id = os.environ[SWEEP_ID]
    SweepFailures().on_multirun_start(config)
    assert os.environ[SWEEP_ID] != first_id, "every sweep gets its own id"
    monkeypatch.setenv(SWEEP_ID, "first")
    SweepJob(hydra_cfg, str(tmp_path / "0")).record("failed", "refused")
    monkeypatch.setenv(SWEEP_ID, "second")
    SweepJob(hydra_cfg, str(tmp_path / "0")).record("done")
    SweepFailures().on_multirun_end(config)  # the second sweep: its one job is done
    monkeypatch.setenv(SWEEP_ID, "first")
    with pytest.raises(SystemExit) as ended:
        SweepFailures().on_multirun_end(config)
    assert ended.value.code == 1


@pytest.mark.parametrize("planted", [".hydra/config.yaml", "cli.log", ".hydra"])
def test_links_where_hydra_writes_are_refused(tmp_path: Path, planted: str) -> None:
    """Hydra writes .hydra/*.yaml and the job's log through whatever is in the run dir: a link planted there is
    one line and exit status 2, before Hydra writes anything, and its target is untouched."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    target = tmp_path / "target"
    target.write_text("keep me\n")
    if planted == ".hydra":
        (run_dir / ".hydra").rmdir()
    (run_dir / planted).symlink_to(target)
    job = mgrq_run("method=fp", f"hydra.run.dir={run_dir}")
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 2 and "Traceback" not in stdout + stderr
    expected = f"{run_dir / planted} is a symbolic link, which Hydra would write through"
    assert "".join(expected.split()) in "".join(stderr.split())  # the console wraps long lines, paths too
    assert target.read_text() == "keep me\n"


@pytest.mark.parametrize("planted", ["multirun.yaml", "0_job/.hydra/hydra.yaml", "0_job/cli.log"])
def test_links_where_hydra_writes_in_a_sweep_are_refused(tmp_path: Path, planted: str) -> None:
    """A sweep dir is checked as a run dir is: its multirun.yaml and, in every job dir already there, the files
    Hydra writes; a link among them is one line and exit status 2 before any job runs, its target untouched."""
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "0_job" / ".hydra").mkdir(parents=True)
    target = tmp_path / "target"
    target.write_text("keep me\n")
    (sweep_dir / planted).symlink_to(target)
    job = mgrq_run("method=fp", "seed=0,1", f"hydra.sweep.dir={sweep_dir}", multirun=True)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 2 and "Traceback" not in stdout + stderr
    expected = f"{sweep_dir / planted} is a symbolic link, which Hydra would write through"
    assert "".join(expected.split()) in "".join(stderr.split())
    assert target.read_text() == "keep me\n" and not (sweep_dir / "0_proxy_vit_fp_w4a4").exists()


def test_a_folder_where_the_run_writes_its_record_is_one_line(tmp_path: Path) -> None:
    """results.json is a folder in the run dir (resume=true, so the run reads it first): one line naming it and
    exit status 2, not a traceback from the reader or from the atomic replace."""
    run_dir = tmp_path / "run"
    (run_dir / "results.json").mkdir(parents=True)
    job = mgrq_run("method=fp", "resume=true", f"hydra.run.dir={run_dir}")
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 2 and "Traceback" not in stdout + stderr
    expected = f"{run_dir / 'results.json'} cannot be written: it is a directory"
    assert "".join(expected.split()) in "".join(stderr.split())
