"""Every reader of a file a user can touch, fuzzed with Hypothesis: whatever the bytes, whatever JSON value a field
holds, whatever the file is (a directory, a named pipe, a link, nothing), each reader returns a correct result or
raises one ``MgrqError`` whose message names the file (or its folder); never another exception. An export whose
manifest had one field changed and its digest recomputed (a careful forger) is refused or scores exactly as the
original.

``make test`` runs the ``ci`` profile (a few dozen examples per reader, tests/conftest.py); ``make fuzz`` runs the
``fuzz`` profile (thousands) and prints Hypothesis's statistics, the number of examples each reader was given.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mgrq_runner.analysis.runs import RUNS_CSV_COLUMNS, read_runs_csv
from mgrq_runner.data import CLASSES_FILE, _read_idx, folder_classes
from mgrq_runner.deploy.safetensors_export import export_quantized, load_quantized, manifest_digest, read_manifest
from mgrq_runner.errors import MgrqError
from mgrq_runner.files import read_calibration_list
from mgrq_runner.models import create_proxy_model
from mgrq_runner.quant.api import QuantConfig, quantize_
from mgrq_runner.quant.calibrate import InitConfig, calibrate
from mgrq_runner.recon.curves import LossCurves
from mgrq_runner.recon.state import MANIFEST, ReconState
from mgrq_runner.results import read_results
from mgrq_runner.rundir import EXPORT_MANIFEST, RECON_CURVES, RECON_STATE, RESULTS, TRACKING_RUN
from mgrq_runner.tracking import read_record

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
KINDS = ("directory", "named pipe", "link", "dangling link", "missing")


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A fresh directory per example (pytest's tmp_path is shared by every example of a test)."""
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


def place(path: Path, content: bytes | str) -> None:
    """Writes ``content`` (bytes) at ``path``, or makes ``path`` the file kind it names (``KINDS``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "directory":
        path.mkdir()
    elif content == "named pipe":
        os.mkfifo(path)
    elif content == "link":
        (path.parent / "target").write_text('{"status": "done"}\n')
        path.symlink_to(path.parent / "target")
    elif content == "dangling link":
        path.symlink_to(path.parent / "nowhere")


def answers(read: Callable[[], Any], path: Path) -> Any:
    """Calls ``read``: a result, or None after one MgrqError naming ``path`` or its folder (anything else fails)."""
    try:
        return read()
    except MgrqError as err:
        message = str(err)
        assert str(path) in message or str(path.parent) in message, message
        assert "\n" not in message.strip(), message
        return None


def contents(document: Any = None) -> st.SearchStrategy:
    """Any bytes, any JSON value, the file kinds, and (given a good ``document``) that document with one field
    replaced by any JSON value."""
    options = [st.binary(max_size=400), JSON.map(lambda v: json.dumps(v).encode()), st.sampled_from(KINDS)]
    if isinstance(document, dict):
        options.append(
            st.builds(lambda k, v: json.dumps({**document, k: v}).encode(), st.sampled_from(sorted(document)), JSON)
        )
    return st.one_of(options)


# ---------------------------------------------------------------------------------------------- run-dir records

GOOD_RESULTS = {"status": "done", "top1": 90.3, "config": {"method": {"name": "mgrq"}}, "reconstruction": []}


@given(contents(GOOD_RESULTS))
def test_results_json(content: bytes | str) -> None:
    with scratch() as run_dir:
        place(run_dir / RESULTS, content)
        record = answers(lambda: read_results(run_dir), run_dir / RESULTS)
        assert record is None or isinstance(record, dict)
        assert content != "link" or record is None  # a run's own record is never read through a link


GOOD_STATE = {"format_version": 1, "fingerprint": {"a": 1}, "units": [], "data": None}


@given(contents(GOOD_STATE))
def test_recon_state_manifest(content: bytes | str) -> None:
    with scratch() as run_dir:
        place(run_dir / RECON_STATE / MANIFEST, content)
        state = ReconState(run_dir / RECON_STATE, {"a": 1})
        answers(state.resume, run_dir / RECON_STATE / MANIFEST)
        assert all(isinstance(unit["name"], str) for unit in state.units)


@given(contents({"store": "sqlite:///x.db", "experiment": "e", "run_id": "abc"}))
def test_tracking_record(content: bytes | str) -> None:
    with scratch() as run_dir:
        place(run_dir / TRACKING_RUN, content)
        record = read_record(run_dir)  # no record is no error: the run starts a new tracker run
        assert record is None or record.get("run_id")


@given(contents({"embed": {"step": [0], "block": [0.5]}}))
def test_loss_curves_of_an_interrupted_run(content: bytes | str) -> None:
    with scratch() as run_dir:
        place(run_dir / RECON_CURVES, content)
        curves = LossCurves(run_dir / RECON_CURVES)
        curves.restore(["embed"])  # unreadable curves are dropped, never an error
        assert all(isinstance(series, dict) for series in curves.curves.values())


# ---------------------------------------------------------------------------------------------- the user's files


@given(contents())
def test_calibration_list(content: bytes | str) -> None:
    with scratch() as folder:
        place(folder / "calib.list", content)
        entries = answers(lambda: read_calibration_list(folder / "calib.list"), folder / "calib.list")
        assert entries is None or (entries and all(e == e.strip() and e for e in entries))


@given(contents())
def test_classes_txt(content: bytes | str) -> None:
    with scratch() as root:
        place(root / CLASSES_FILE, content)
        (root / "train" / "a").mkdir(parents=True)
        names = answers(lambda: folder_classes(root), root / CLASSES_FILE)
        assert names is None or (names and len(set(names)) == len(names))


IDX = st.builds(  # an IDX header (zero, type, dims) and any payload, gzip-compressed as Fashion-MNIST ships it
    lambda dtype, dims, payload: gzip.compress(
        bytes([0, 0, dtype, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload
    ),
    st.sampled_from([8, 9, 13]),
    st.lists(st.integers(0, 40), max_size=3),
    st.binary(max_size=200),
)


@given(st.one_of(contents(), IDX, st.binary(max_size=200).map(gzip.compress)))
def test_fashion_mnist_idx_file(content: bytes | str) -> None:
    with scratch() as root:
        place(root / "t10k-labels-idx1-ubyte.gz", content)
        array = answers(lambda: _read_idx(root / "t10k-labels-idx1-ubyte.gz"), root / "t10k-labels-idx1-ubyte.gz")
        assert array is None or array.dtype == torch.uint8


RUNS_ROW = dict.fromkeys(RUNS_CSV_COLUMNS, "") | {"model": "proxy_vit", "method": "mgrq", "setting": "W4A4"}


def csv_text(row: dict[str, str]) -> bytes:
    def field(value: str) -> str:
        return '"' + value.replace('"', '""') + '"'

    header = ",".join(RUNS_CSV_COLUMNS)
    return (header + "\n" + ",".join(field(row[c]) for c in RUNS_CSV_COLUMNS) + "\n").encode()


RUNS_CSV = st.one_of(
    contents(),
    st.builds(
        lambda key, value: csv_text({**RUNS_ROW, key: value}), st.sampled_from(RUNS_CSV_COLUMNS), st.text(max_size=20)
    ),
)


@given(RUNS_CSV)
def test_runs_csv(content: bytes | str) -> None:
    with scratch() as folder:
        place(folder / "runs.csv", content)
        rows = answers(lambda: read_runs_csv(folder / "runs.csv"), folder / "runs.csv")
        assert rows is None or isinstance(rows, list)


# ---------------------------------------------------------------------------------------------- exports


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A small export, images and its logits on them."""
    torch.manual_seed(0)
    images = torch.randn(4, 1, 28, 28)
    model = quantize_(create_proxy_model(pretrained=False), QuantConfig())
    calibrate(model, [images], 1, InitConfig(percentiles=(1.0,)), torch.device("cpu"))
    run_dir = tmp_path_factory.mktemp("export")
    info = {"model": {"name": "proxy_vit"}, "method": "test", "w_bits": 4, "a_bits": 4, "num_calib": 4}
    export_quantized(model, run_dir, {**info, "quant_config": vars(QuantConfig())})
    with torch.no_grad():
        return run_dir, images, load_quantized(run_dir)(images)


@given(content=contents())
def test_export_manifest_bytes(export: tuple[Path, torch.Tensor, torch.Tensor], content: bytes | str) -> None:
    good, _, _ = export
    with scratch() as folder:
        run_dir = folder / "export"
        run_dir.mkdir()
        for path in good.iterdir():
            if path.name != EXPORT_MANIFEST:
                (run_dir / path.name).write_bytes(path.read_bytes())
        place(run_dir / EXPORT_MANIFEST, content)
        manifest = answers(lambda: read_manifest(run_dir), run_dir / EXPORT_MANIFEST)
        assert manifest is None  # none of these is the export's own manifest


@st.composite
def forged(draw: st.DrawFn, manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with one field (at any depth of its mappings) replaced by any JSON value, digest recomputed."""
    changed = copy.deepcopy(manifest)
    node = changed
    while True:
        key = draw(st.sampled_from(sorted(k for k in node if k != "digest")))
        if isinstance(node[key], dict) and node[key] and draw(st.booleans()):
            node = node[key]
            continue
        node[key] = draw(JSON)
        break
    changed["digest"] = manifest_digest(changed)
    return changed


@given(data=st.data())
def test_a_forged_manifest_is_refused_or_scores_the_same(
    export: tuple[Path, torch.Tensor, torch.Tensor], data: st.DataObject
) -> None:
    good, images, logits = export
    manifest = json.loads((good / EXPORT_MANIFEST).read_text())
    changed = data.draw(forged(manifest))
    with scratch() as folder:
        run_dir = folder / "export"
        run_dir.mkdir()
        for path in good.iterdir():
            (run_dir / path.name).write_bytes(path.read_bytes())
        (run_dir / EXPORT_MANIFEST).write_text(json.dumps(changed))
        model = answers(lambda: load_quantized(run_dir), run_dir / EXPORT_MANIFEST)
        if model is not None:
            with torch.no_grad():
                assert torch.equal(model(images), logits)  # the change did not touch what is scored
