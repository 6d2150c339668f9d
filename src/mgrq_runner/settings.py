"""The settings boundary: the composed Hydra config parsed and checked once, into frozen dataclasses.

``parse_settings(cfg)`` is the only reader of the composed ``DictConfig``: it resolves it once into a plain dict
(the record results.json keeps), checks every value, and returns the job's settings, a ``RunSettings``
(``mode=run``) or an ``EvalSettings`` (``mode=eval``), that every stage takes instead of the config. Each
problem is a ``ConfigError`` naming the key, the value and the fix. The method's own objects (``QuantConfig``,
``InitConfig``, ``ReconConfig``, ``LossConfig``, ``MlpReluConfig``) check their fields themselves; this module
builds them and checks what belongs to the run, the model, the data, calibration and evaluation. It loads neither
torch nor timm: the collector and the CLI's checks stay light.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Self

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from mgrq_runner.errors import ConfigError
from mgrq_runner.files import read_calibration_list
from mgrq_runner.presets import PROXY_NAMES
from mgrq_runner.quant.config import InitConfig, QuantConfig
from mgrq_runner.recon.config import LossConfig, ReconConfig
from mgrq_runner.resume import list_sha256, resume_target
from mgrq_runner.rundir import MLFLOW_STORE
from mgrq_runner.transforms.config import MlpReluConfig

DEVICE_PATTERN = re.compile(r"^(auto|cpu|claim|cuda(:\d+)?)$")
EVAL_BACKENDS = ("auto", "gloo", "nccl")
EVAL_RUNTIMES = ("torch", "onnxruntime")
EVAL_SPLITS = ("val", "heldout")
DATA_SETS = ("fashion_mnist", "imagenet", "folder", "in_memory")  # in_memory: the Python API's images
DEPLOY_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
DEPLOY_HINT = "pip install -e '.[deploy]' (onnx, onnxruntime, onnxscript)"
LOGGERS = ("none", "mlflow", "tensorboard")
TRACKING_HINT = "pip install -e '.[tracking]' (mlflow, tensorboard)"
DEFAULT_EXPERIMENT = "mgrq-runner"  # logger=mlflow: the experiment of a single run unless logger.experiment names one


# ---------------------------------------------------------------------------------------------- the objects


@dataclass(frozen=True)
class ModelSettings:
    """Which FP model to build (``models.create_model``).

    Attributes:
        name: a proxy name or a timm ``arch.tag`` (``hf-hub:``/``local-dir:`` names too).
        preset: the model preset (``deit_s``, ``proxy_vit``, ``timm``); tables are keyed by it.
        pretrained: load weights (the hub's, or ``checkpoint``); false: random weights.
        checkpoint: a local weight file, loaded instead of the hub.
        checkpoint_ema: load the checkpoint's ``state_dict_ema``.
        num_classes, img_size: constructor arguments when set (a fine-tuned head, another resolution).
        kwargs: any other constructor arguments.
        record: the resolved ``model`` node as composed: an export's manifest keeps it and ``mode=eval`` rebuilds
            the FP model from it.
    """

    name: str
    preset: str | None
    pretrained: bool
    checkpoint: str | None
    checkpoint_ema: bool
    num_classes: int | None
    img_size: int | None
    kwargs: Mapping[str, Any] | None
    record: Mapping[str, Any]

    @classmethod
    def parse(cls, node: Mapping[str, Any] | DictConfig) -> ModelSettings:
        """From a ``model`` node (the composed config's, or an export manifest's)."""
        model = _plain(node, "model")
        kwargs = model.get("kwargs")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ConfigError(f"model.kwargs={kwargs!r} is not a mapping. Fix: model.kwargs={{name:value,...}}.")
        _check_bool(model, "model", "checkpoint_ema", default=False)
        return cls(
            name=str(model.get("name")),
            preset=model.get("preset"),
            pretrained=bool(model.get("pretrained", False)),
            checkpoint=None if model.get("checkpoint") in (None, "") else str(model["checkpoint"]),
            checkpoint_ema=bool(model.get("checkpoint_ema", False)),
            num_classes=_int(model, "model", "num_classes", 1, optional=True),
            img_size=_int(model, "model", "img_size", 1, optional=True),
            kwargs=dict(kwargs) if kwargs is not None else None,
            record=model,
        )


@dataclass(frozen=True)
class DataSettings:
    """The data set and how it is read (``data.build_data``); preprocessing overrides are None for "the model's
    own" (timm's pretrained config)."""

    name: str
    root: str | None = None
    download_dir: str | None = None
    batch_size: int = 64
    workers: int = 0
    eval_split: str = "val"  # val: the evaluation split; heldout: train images outside the calibration set (tuning)
    heldout_size: int = 1000
    num_eval: int | None = None  # a seeded subset of the evaluation split of this size (None: all of it)
    calib_transform: str = "eval"  # eval | train (augmentation drawn once per calibration image)
    img_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, node: Mapping[str, Any] | DictConfig) -> DataSettings:
        """From a ``data`` node; a key it lacks keeps the default above (the presets set every key)."""
        given = _plain(node, "data")
        data = {f.name: f.default for f in fields(cls) if f.default is not MISSING} | given
        name = data.get("name")
        if name not in DATA_SETS:
            raise ConfigError(f"unknown data set {name!r}. Fix: data=imagenet, data=folder or data=fashion_mnist.")
        _check_choice(data, "data", "eval_split", EVAL_SPLITS, default="val")
        _check_choice(data, "data", "calib_transform", ("eval", "train"), default="eval")
        crop_pct = data.get("crop_pct")
        if crop_pct is not None and (not isinstance(crop_pct, int | float) or isinstance(crop_pct, bool)):
            raise ConfigError(f"data.crop_pct={crop_pct!r} is not a number. Fix: data.crop_pct=<e.g. 0.875> or null.")
        return cls(
            name=name,
            root=None if data.get("root") is None else str(data["root"]),
            download_dir=None if data.get("download_dir") is None else str(data["download_dir"]),
            batch_size=_int(data, "data", "batch_size", 1),
            workers=_int(data, "data", "workers", 0),
            eval_split=data.get("eval_split", "val"),
            heldout_size=_int(data, "data", "heldout_size", 1),
            num_eval=_int(data, "data", "num_eval", 1, optional=True),
            calib_transform=data.get("calib_transform", "eval"),
            img_size=_int(data, "data", "img_size", 1, optional=True),
            crop_pct=crop_pct,
            interpolation=data.get("interpolation"),
            mean=_floats(data, "mean"),
            std=_floats(data, "std"),
        )


@dataclass(frozen=True)
class CalibSettings:
    """The calibration set: how many images, in which batches, and an explicit list when given."""

    num_images: int  # the list's length, else calib.num_images, else the method's own (method.calib_images)
    batch_size: int
    entries: tuple[str, ...] | None  # calib.list: the images by name, in order (None: a seeded draw)
    list_sha256: str | None  # the list's contents (what resume compares), or None


@dataclass(frozen=True)
class EvalOptions:
    """The ``eval`` node: how the models are scored."""

    world_size: int  # > 1: evaluation on that many spawned torch.distributed processes
    backend: str  # auto | gloo | nccl
    runtime: str  # torch | onnxruntime (mode=eval of an export=onnx run)


@dataclass(frozen=True)
class LoggerSettings:
    """Experiment tracking (``logger=``; ``tracking.py``): where a run's config, scores and curves also go.

    Attributes:
        name: none | mlflow | tensorboard.
        tracking_uri: mlflow: ``logger.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the SQLite store
            ``outputs/mlflow.db`` under the working directory (as an absolute URI).
        uri_source: which of the three it is, for messages.
        experiment: ``logger.experiment`` as given (None: ``experiment_name`` decides).
        sweep_dir: a sweep's job: the sweep's directory (its default experiment and a tag); None for a single run.
    """

    name: str = "none"
    tracking_uri: str | None = None
    uri_source: str | None = None
    experiment: str | None = None
    sweep_dir: Path | None = None

    @property
    def experiment_name(self) -> str:
        """The MLflow experiment: ``logger.experiment``, else a sweep's ``<parent>/<name>`` (one experiment per
        sweep), else ``mgrq-runner``."""
        if self.experiment is not None:
            return self.experiment
        if self.sweep_dir is not None:
            return f"{self.sweep_dir.parent.name}/{self.sweep_dir.name}"
        return DEFAULT_EXPERIMENT

    @classmethod
    def parse(cls, node: Mapping[str, Any] | None, sweep_dir: str | None) -> LoggerSettings:
        """From the ``logger`` node (None: no tracking) and, in a sweep, its directory."""
        logger = _plain(node if node is not None else {"name": "none"}, "logger")
        name = _check_choice(logger, "logger", "name", LOGGERS)
        for key in ("tracking_uri", "experiment"):
            value = logger.get(key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(
                    f"logger.{key}={value!r} is not allowed. Fix: logger.{key}=<a non-empty text> or null."
                )
        if name == "none":
            return cls()
        package = "mlflow" if name == "mlflow" else "tensorboard"
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"logger={name} needs {package}, which is not installed. Fix: {TRACKING_HINT}, or logger=none."
            )
        sweep = Path(sweep_dir).absolute() if sweep_dir is not None else None
        if name == "tensorboard":
            return cls(name=name, sweep_dir=sweep)
        uri, source = logger.get("tracking_uri"), "logger.tracking_uri"
        if uri is None and os.environ.get("MLFLOW_TRACKING_URI"):
            uri, source = os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
        if uri is None:  # sqlite:// and an absolute path: sqlite:////<path>
            uri, source = f"sqlite:///{(Path.cwd() / MLFLOW_STORE).absolute()}", "the default store"
        _check_tracking_uri(str(uri), source)
        return cls(name, uri, source, logger.get("experiment"), sweep)


def _check_tracking_uri(uri: str, source: str) -> None:
    """A tracking URI that can be parsed, and an http(s) one with a host: one line before any work, not MLflow's
    traceback (or minutes of its retries) later."""
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(uri)
        parts.port  # noqa: B018 - parsing the port is what finds a bad one
    except ValueError as err:
        raise ConfigError(
            f"{source}: the tracking URI is malformed ({err}). Fix: e.g. logger.tracking_uri=http://host:5000 or "
            "sqlite:////abs/path/mlflow.db, or logger=none."
        ) from None
    if parts.scheme in ("http", "https") and not parts.hostname:
        raise ConfigError(f"{source}: the tracking URI names no host. Fix: logger.tracking_uri=http://<host>:<port>.")


@dataclass(frozen=True)
class MethodSettings:
    """The method: its quantizers, their initialisation, and reconstruction (None where the method has none)."""

    name: str
    quant: QuantConfig | None  # None: no quantization (the FP method)
    init: InitConfig | None
    recon: ReconConfig | None  # None: no reconstruction (fp, minmax, repq)
    losses: LossConfig | None
    mlp_relu: MlpReluConfig | None = None  # method.init.mlp_relu=true: the FP MLPs' ReLU reconstruction budget

    @property
    def reconstructs(self) -> bool:
        return self.recon is not None and self.losses is not None


@dataclass(frozen=True, kw_only=True)
class JobSettings:
    """What every job has, whatever its mode: ``RunSettings`` (``mode=run``) and ``EvalSettings`` (``mode=eval``)
    add their own."""

    mode: ClassVar[str]
    seed: int
    device: str  # auto | cpu | cuda | cuda:N | claim
    threads: int | None  # torch CPU threads (None: the cores shared among concurrent_jobs)
    concurrent_jobs: int  # jobs the Hydra launcher runs at once
    progress: bool
    run_dir: Path  # where results go (a resumed run's own directory when resume= names one)
    model: ModelSettings
    data: DataSettings
    eval: EvalOptions
    config: Mapping[str, Any]  # the resolved config as results.json records it (plus calib.list_sha256)
    logger: LoggerSettings = LoggerSettings()  # experiment tracking (logger=)
    resume: bool = False  # continue the run in ``run_dir`` (mode=run only)
    sign_key_env: str | None = None  # the environment variable holding the export signing key (deploy.signing)

    def signing_key(self) -> bytes | None:
        """The key in ``sign_key_env`` (None when unset): signs an export, or is required of the one evaluated."""
        from mgrq_runner.deploy.signing import signing_key

        return signing_key(self.sign_key_env) if self.sign_key_env is not None else None

    def in_run_dir(self, run_dir: Path) -> Self:
        """The same settings writing into ``run_dir`` (a resumed run's), its record saying so."""
        return replace(self, run_dir=run_dir, config={**self.config, "output_dir": str(run_dir)})


@dataclass(frozen=True, kw_only=True)
class RunSettings(JobSettings):
    """``mode=run``: quantize, calibrate, reconstruct, export and score a model."""

    mode: ClassVar[str] = "run"
    method: MethodSettings
    calib: CalibSettings
    export: bool  # write the integer codes (quantized_model.*)
    export_onnx: bool  # and model.onnx
    onnx_int8_weights: bool  # export=onnx_vnni: model.onnx keeps 8-bit weights in int8 (fast with VNNI)
    dry_run: bool


@dataclass(frozen=True, kw_only=True)
class EvalSettings(JobSettings):
    """``mode=eval``: score the export in ``checkpoint`` (its manifest decides the method and calibration)."""

    mode: ClassVar[str] = "eval"
    checkpoint: Path


# ---------------------------------------------------------------------------------------------- parsing


def parse_settings(cfg: DictConfig) -> RunSettings | EvalSettings:
    """Checks the composed config and returns the job's settings; raises ``ConfigError`` naming the fix."""
    config = resolved(cfg)
    device = config.get("device")
    if not isinstance(device, str) or not DEVICE_PATTERN.match(device):
        raise ConfigError(f"device={device!r} is unknown. Fix: device=auto, cpu, cuda, cuda:<index> or claim.")
    mode = _check_choice(config, "", "mode", ("run", "eval"))
    export = config.get("export")
    if export not in (True, False, "onnx", "onnx_vnni"):
        raise ConfigError(
            f"export={export!r} is unknown. Fix: export=true (integer codes, safetensors), export=onnx (that and "
            "model.onnx), export=onnx_vnni (int8 8-bit weights, for VNNI CPUs) or export=false."
        )
    evaluation = _eval_options(config, mode, device)
    if export in ("onnx", "onnx_vnni") or evaluation.runtime == "onnxruntime":
        require_deploy()
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    common = {
        "seed": _int(config, "", "seed", 0),
        "device": device,
        "threads": _int(config, "", "threads", 1, optional=True),
        "concurrent_jobs": launcher_jobs(hydra_cfg),
        "progress": _check_bool(config, "", "progress"),
        "run_dir": Path(str(config["output_dir"])),
        "model": ModelSettings.parse(config["model"]),
        "data": DataSettings.parse(config["data"]),
        "eval": evaluation,
        "logger": LoggerSettings.parse(config.get("logger"), sweep_dir(hydra_cfg)),
        "sign_key_env": _sign_key_env(config),
    }
    if mode == "eval":
        return _eval_job(config, common)
    return _run_job(config, common, export)


def _sign_key_env(config: dict[str, Any]) -> str | None:
    """``sign_key_env``: the variable's name, its key checked now (set, not empty), before any work."""
    name = config.get("sign_key_env")
    if name is None:
        return None
    from mgrq_runner.deploy.signing import signing_key

    signing_key(str(name))
    return str(name)


def _run_job(config: dict[str, Any], common: dict[str, Any], export: bool | str) -> RunSettings:
    """``mode=run``'s settings: the method, the calibration set, the export, a resumed run's directory."""
    dry_run = _check_bool(config, "", "dry_run")
    _check_model_preset(common["model"], common["data"])
    method = _method_settings(config)
    calib_num = _int(config["calib"], "calib", "num_images", 1, optional=True)
    calib = _calib_settings(config, calib_num, _int(config["calib"], "calib", "batch_size", 1))
    if calib.list_sha256 is not None:  # the list's contents, for the record and for resume's check
        config["calib"]["list_sha256"] = calib.list_sha256
    if dry_run and not method.reconstructs:
        raise ConfigError(
            f"dry_run=true projects a reconstruction, but method {method.name} does not reconstruct. "
            "Fix: method=brecq, qdrop or mgrq, or drop dry_run."
        )
    run_dir, resuming = resume_target(config.get("resume", False), str(config["output_dir"]))
    settings = RunSettings(
        **common,
        config=config,
        resume=resuming,
        method=method,
        calib=calib,
        export=export in (True, "onnx", "onnx_vnni"),
        export_onnx=export in ("onnx", "onnx_vnni"),
        onnx_int8_weights=export == "onnx_vnni",
        dry_run=dry_run,
    )
    return settings.in_run_dir(run_dir) if run_dir != settings.run_dir else settings


def _eval_job(config: dict[str, Any], common: dict[str, Any]) -> EvalSettings:
    """``mode=eval``'s settings: the export to score, and a run dir of its own."""
    _check_bool(config, "", "dry_run")  # checked in both modes, though only a run uses them
    _int(config["calib"], "calib", "num_images", 1, optional=True)
    _int(config["calib"], "calib", "batch_size", 1)
    checkpoint = _checkpoint(config)
    if common["run_dir"].resolve() == checkpoint:
        raise ConfigError(
            f"mode=eval would write into its checkpoint's own run dir {checkpoint}, replacing the record of the "
            "run it evaluates. Fix: drop hydra.run.dir (a new run dir), or give another one."
        )
    return EvalSettings(**common, config=config, checkpoint=checkpoint)


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as a plain dict, every interpolation resolved; a required value left unset or an environment
    variable that is not set is one ``ConfigError``."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        key = err.full_key or "a required value"
        raise ConfigError(f"{key} is required but not set. Fix: add {key}=<value> to the command.") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "a value"
        message = str(err).splitlines()[0]
        raise ConfigError(f"{key} cannot be resolved ({message}). Fix: set it on the command line.") from None
    assert isinstance(config, dict)
    return config


def launcher_jobs(hydra_cfg: DictConfig | None) -> int:
    """How many jobs the Hydra launcher runs at once: joblib's ``n_jobs`` (-1: one per core); else 1."""
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return 1
    n_jobs = hydra_cfg.launcher.get("n_jobs")
    if not isinstance(n_jobs, int) or n_jobs == 0:
        return 1
    from mgrq_runner.devices import CPU_CORES  # torch's own count (devices loads torch)

    return n_jobs if n_jobs > 0 else max(1, CPU_CORES + 1 + n_jobs)


def sweep_dir(hydra_cfg: DictConfig | None) -> str | None:
    """A sweep's job: the sweep's directory; None for a single run."""
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return str(hydra_cfg.sweep.dir)


def require_deploy() -> None:
    """Raises ConfigError naming the install command when the deploy extra is missing."""
    for package in DEPLOY_PACKAGES:
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"ONNX export and evaluation need {package}. Fix: {DEPLOY_HINT}.")


def check_overrides(overrides: list[str], cfg: DictConfig) -> None:
    """Refuses ``+key=value`` / ``++key=value`` outside ``hydra.``: every key of the runner is in its presets, so
    an added key is a misspelling that would be silently ignored."""
    for override in overrides:
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").split("=", 1)[0]
        if key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        known = [k for k in node.keys() if k != leaf] if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(leaf, known, n=1)
        value = override.split("=", 1)[1] if "=" in override else "..."
        fix = f"{parent + '.' if parent else ''}{close[0]}={value} (no +)" if close else "drop it (see --cfg job)"
        raise ConfigError(f"{override}: {key} is not a setting of mgrq-run. Fix: {fix}.")


def _eval_options(config: dict[str, Any], mode: str, device: str) -> EvalOptions:
    node = config["eval"]
    world_size = _int(node, "eval", "world_size", 1, max_world_size(device))
    backend = _check_choice(node, "eval", "backend", EVAL_BACKENDS)
    runtime = _check_choice(node, "eval", "runtime", EVAL_RUNTIMES)
    if runtime == "onnxruntime" and mode != "eval":
        raise ConfigError(
            "eval.runtime=onnxruntime evaluates an exported model. Fix: mode=eval checkpoint=<run dir of a run made "
            "with export=onnx> eval.runtime=onnxruntime."
        )
    if runtime == "onnxruntime" and world_size > 1:
        raise ConfigError("eval.runtime=onnxruntime runs in one process. Fix: eval.world_size=1.")
    return EvalOptions(world_size, backend, runtime)


def _method_settings(config: dict[str, Any]) -> MethodSettings:
    """The method's objects, each checking its own fields (bits, ranges, loss names)."""
    method = config["method"]
    quant = init = recon = losses = mlp_relu = None
    if method.get("quantize"):
        init_node = method["init"]
        quant = QuantConfig(
            w_bits=config["quant"]["w_bits"],
            a_bits=config["quant"]["a_bits"],
            input_bits=config["quant"]["input_bits"],
            softmax_quantizer=init_node["softmax_quantizer"],
        )
        init = InitConfig(
            search=init_node["search"],
            percentiles=tuple(init_node["percentiles"]),
            reparam=init_node["reparam"],
            observer_samples=init_node["observer_samples"],
            rotation=init_node.get("rotation", "none"),
            mlp_relu=init_node.get("mlp_relu", False),
        )
        if init.mlp_relu:
            mlp_relu = MlpReluConfig(
                iters=init_node["mlp_relu_iters"],
                lr=init_node["mlp_relu_lr"],
                batch_size=init_node["mlp_relu_batch_size"],
            )
    if method.get("recon") is not None:
        recon = ReconConfig(**method["recon"])
        losses = LossConfig(**{**method["loss"], "local_layers": tuple(method["loss"]["local_layers"])})
    return MethodSettings(str(method["name"]), quant, init, recon, losses, mlp_relu)


def _checkpoint(config: dict[str, Any]) -> Path:
    """``mode=eval``'s export to score."""
    if config.get("checkpoint") is None:
        raise ConfigError("mode=eval needs a checkpoint. Fix: add checkpoint=<run dir of a run made with export=true>.")
    return Path(str(config["checkpoint"])).expanduser().resolve()


def _calib_settings(config: dict[str, Any], num_images: int | None, batch_size: int) -> CalibSettings:
    """The calibration set: a ``calib.list``'s images (read and checked here), else a seeded draw."""
    listed = config["calib"].get("list")
    entries = read_calibration_list(listed) if listed is not None else None
    count = num_images if num_images is not None else int(config["method"]["calib_images"])
    if entries is not None:
        if num_images is not None and num_images != len(entries):
            raise ConfigError(
                f"calib.num_images={num_images} but calib.list names {len(entries)} images. "
                "Fix: drop calib.num_images (the list decides), or list that many images."
            )
        count = len(entries)
    return CalibSettings(
        num_images=count,
        batch_size=batch_size,
        entries=tuple(entries) if entries is not None else None,
        list_sha256=list_sha256(entries) if entries is not None else None,
    )


def _check_model_preset(model: ModelSettings, data: DataSettings) -> None:
    """Refuses a timm name put into a proxy preset: the proxy presets bring Fashion-MNIST, not ImageNet."""
    if model.preset in PROXY_NAMES and model.name not in PROXY_NAMES:
        raise ConfigError(
            f"model.name={model.name} replaces the {model.preset} proxy but keeps its data set ({data.name}). "
            f"Fix: mgrq-run model=timm model.name={model.name} (ImageNet data, data.root= or IMAGENET_ROOT)."
        )


def max_world_size(device: str) -> int:
    """The most evaluation processes this machine can run: its GPUs for a CUDA device, else its CPU cores."""
    if device.startswith("cuda") or device == "claim":
        import torch

        return max(1, torch.cuda.device_count())
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------- value checks


def _plain(node: Mapping[str, Any] | DictConfig, what: str) -> dict[str, Any]:
    if isinstance(node, DictConfig):
        node = resolved(node)
    if not isinstance(node, Mapping):
        raise ConfigError(f"{what} is not a mapping. Fix: {what}=<a preset> (see mgrq-run --help).")
    return dict(node)


def _key(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(
    node: Mapping[str, Any], prefix: str, key: str, low: int, high: int | None = None, optional: bool = False
) -> Any:
    """``node[key]`` (``prefix.key`` to the user) is an integer in ``[low, high]`` (or None when ``optional``)."""
    value = node.get(key)
    if value is None and optional:
        return None
    if not _is_int(value) or value < low or (high is not None and value > high):
        allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        also = " or null" if optional else ""
        name = _key(prefix, key)
        raise ConfigError(f"{name}={value!r} is not allowed. Fix: {name}=<{allowed}>{also}.")
    return value


def _check_choice(
    node: Mapping[str, Any], prefix: str, key: str, choices: tuple[str, ...], default: str | None = None
) -> str:
    value = node.get(key, default)
    if value not in choices:
        raise ConfigError(f"{_key(prefix, key)}={value!r} is unknown. Fix: one of {', '.join(choices)}.")
    return value


def _check_bool(node: Mapping[str, Any], prefix: str, key: str, default: bool | None = None) -> bool:
    value = node.get(key, default)
    if not isinstance(value, bool):
        name = _key(prefix, key)
        raise ConfigError(f"{name}={value!r} is not true or false. Fix: {name}=true or {name}=false.")
    return value


def _floats(data: Mapping[str, Any], key: str) -> tuple[float, ...] | None:
    value = data.get(key)
    if value is None:
        return None
    values = value if isinstance(value, list | tuple) else [value]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"data.{key}={value!r} is not a list of numbers. Fix: data.{key}=[0.5,0.5,0.5] or null.")
    return tuple(float(v) for v in values)
