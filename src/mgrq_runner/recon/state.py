"""The state of an unfinished reconstruction, saved after every finished unit so that a run can resume.

``<run_dir>/recon_state/`` holds one safetensors file per finished unit (the unit's tensors as reconstruction left
them, and the RNG states right after it) and ``manifest.json``, written last, listing the finished units (name,
final loss terms, seconds) and the fingerprint of the config they were made with. Every file is written under a
temporary name and then moved into place, so a crash mid-save leaves the previous, valid state.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from torch import nn

from mgrq_runner.errors import ConfigError
from mgrq_runner.files import cpu_copy, read_bytes, read_json, write_atomic, write_text_atomic
from mgrq_runner.quant.api import quant_layers
from mgrq_runner.resume import check_same_config
from mgrq_runner.rundir import RECON_STATE

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
RNG_KEYS = {"rng.generator", "rng.torch"}  # saved with every unit: a resumed run draws what it would have drawn


def _is_saved_unit(entry: Any) -> bool:
    """A manifest's unit entry as ``save`` writes it: a name, a plain file name inside the state dir, its wall
    time and final loss terms."""
    if not isinstance(entry, dict):
        return False
    name, file, seconds, final = (entry.get(key) for key in ("name", "file", "seconds", "final"))
    plain_file = isinstance(file, str) and file not in ("", ".", "..") and Path(file).name == file
    number = isinstance(seconds, int | float) and not isinstance(seconds, bool)
    return isinstance(name, str) and plain_file and number and isinstance(final, dict)


def _derived_keys(module: nn.Module) -> set[str]:
    """State that reconstruction never changes or recomputes exactly: FP weights, AdaRound's ``floor`` (STE's
    tuned weight and step are saved: they are its result)."""
    keys = set()
    for name, layer in quant_layers(module):
        prefix = f"{name}." if name else ""
        keys.add(f"{prefix}weight")
        if layer.rounding is not None:
            keys |= {f"{prefix}rounding.{name}" for name in layer.rounding.derived}
    return keys


class ReconState:
    """The finished units of one run's reconstruction, saved in ``directory`` (one file per unit, a manifest).

    Args:
        directory: ``<run_dir>/recon_state``.
        fingerprint: what the reconstruction depends on (e.g. the run config's relevant keys), recorded in the
            manifest and compared on resume.
        on_save: called with the finished units' names after every save (results.json's ``resumable``).
    """

    def __init__(
        self, directory: Path, fingerprint: dict[str, Any], on_save: Callable[[list[str]], None] | None = None
    ) -> None:
        self.directory = Path(directory)
        if self.directory.is_symlink():
            raise ConfigError(
                f"{self.directory} is a symbolic link: a run writes its own files, never through a link. "
                f"Fix: remove {self.directory}."
            )
        self.fingerprint = fingerprint
        self.data: dict[str, Any] | None = None  # the calibration data's identity (data.DataBundle.identity)
        self.on_save = on_save
        self.units: list[dict[str, Any]] = []  # name, file, seconds, final; in unit order

    @classmethod
    def for_run(cls, run_dir: Path, fingerprint: dict[str, Any], resume: bool) -> ReconState:
        """A run's saved units: an interrupted run's when resuming, else none (an earlier run's are dropped)."""
        state = cls(run_dir / RECON_STATE, fingerprint)
        if resume:
            state.resume()
        else:
            state.clear()
        return state

    @property
    def restart_fix(self) -> str:
        """The fix of a damaged state: start its units again."""
        return f"delete {self.directory} (the run restarts its units)"

    @property
    def names(self) -> list[str]:
        return [unit["name"] for unit in self.units]

    def resume(self) -> None:
        """Loads the manifest (if any) after checking that it was made with the current config."""
        path = self.directory / MANIFEST
        if not path.exists() and not path.is_symlink():
            return
        fix = self.restart_fix
        manifest = read_json(path, "resume: the saved units' manifest", fix, error=ConfigError, follow_links=False)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"resume: {path} has an unknown format. Fix: delete {self.directory}.")
        fingerprint, units = manifest.get("fingerprint"), manifest.get("units")
        if not isinstance(fingerprint, dict) or not isinstance(units, list):
            raise ConfigError(
                f"resume: {path} lacks its {'fingerprint' if not isinstance(fingerprint, dict) else 'units'}: "
                f"it cannot show which config made it. Fix: delete {self.directory} (the run restarts its units)."
            )
        data = manifest.get("data")
        bad = next((i for i, unit in enumerate(units) if not _is_saved_unit(unit)), None)
        if bad is not None or not isinstance(data, dict | None):
            what = f"its unit #{bad} is not a saved unit" if bad is not None else "its data entry is not a mapping"
            raise ConfigError(f"resume: {path} is damaged ({what}). Fix: {fix}.")
        check_same_config(fingerprint, self.fingerprint, self.directory)
        self.units, self.data = units, data
        log.info("resume: %d finished units in %s: %s", len(self.units), self.directory, self.names)

    def use_data(self, identity: dict[str, Any]) -> None:
        """The data the units are built on: a resumed run's saved units must have been built on the same calibration
        images (names and contents) and classes, wherever the data now lies."""
        if self.units and self.data is not None and self.data != identity:
            what = "classes" if self.data.get("classes") != identity.get("classes") else "calibration images"
            raise ConfigError(
                f"resume: the {what} differ from those the units in {self.directory} were built on. Fix: resume with "
                "the data.root (and calib.list) of the interrupted run, or start a new run (another hydra.run.dir)."
            )
        self.data = identity

    def clear(self) -> None:
        """Forgets any saved state (a fresh run in a used directory)."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.units = []

    def save(
        self,
        index: int,
        name: str,
        module: nn.Module,
        seconds: float,
        final: dict[str, float],
        generator: torch.Generator,
    ) -> None:
        """Saves finished unit ``index``: its tensors, the RNG states now, then the manifest listing it."""
        if index != len(self.units):
            raise RuntimeError(f"unit {name} is #{index} but {len(self.units)} units are saved")
        self.directory.mkdir(parents=True, exist_ok=True)
        skip = _derived_keys(module)
        tensors = {f"state.{k}": cpu_copy(v) for k, v in module.state_dict().items() if k not in skip}
        tensors["rng.generator"] = generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if generator.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(generator.device)
        file = f"{index:03d}_{name}.safetensors"
        write_atomic(self.directory / file, lambda tmp: save_file(tensors, str(tmp), metadata={"unit": name}))
        self.units.append({"name": name, "file": file, "seconds": seconds, "final": final})
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "data": self.data,
            "units": self.units,
        }
        write_text_atomic(self.directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        if self.on_save is not None:
            self.on_save(self.names)

    def load(
        self, index: int, name: str, module: nn.Module, generator: torch.Generator
    ) -> tuple[float, dict[str, float]]:
        """Restores finished unit ``index`` into ``module`` (prepared as for optimisation) and the RNG states
        saved after it; returns its wall time and final loss terms."""
        entry = self.units[index]
        path = self.directory / entry["file"]
        if entry["name"] != name:
            raise ConfigError(f"resume: unit #{index} is {name} but {path} holds {entry['name']}. Fix: delete it.")
        fix = self.restart_fix
        raw = read_bytes(path, "resume: the saved unit", fix, error=ConfigError, follow_links=False)
        try:
            tensors = safetensors_load(raw)
        except (SafetensorError, ValueError) as err:
            raise ConfigError(f"resume: {path} cannot be read ({err}). Fix: {fix}.") from err
        if not RNG_KEYS <= tensors.keys():
            raise ConfigError(f"resume: {path} lacks the random generators' states. Fix: {fix}.")
        state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
        try:
            missing, unexpected = module.load_state_dict(state, strict=False)
            fits = set(missing) == _derived_keys(module) and not unexpected
        except RuntimeError:  # a tensor of another shape
            fits = False
        if not fits:
            raise ConfigError(f"resume: {path} does not fit unit {name}. Fix: delete {self.directory}.")
        try:
            generator.set_state(tensors["rng.generator"])
            torch.set_rng_state(tensors["rng.torch"])
        except RuntimeError as err:  # not a generator's state: a wrong dtype or size
            raise ConfigError(f"resume: {path} holds no valid generator state ({err}). Fix: {fix}.") from None
        if "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], generator.device)
        return float(entry["seconds"]), dict(entry["final"])
