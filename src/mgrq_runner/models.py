"""Model creation: timm ViT/DeiT/Swin with pinned weight tags, local checkpoints, and the shipped proxies."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from timm.layers import Attention
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from mgrq_runner.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from mgrq_runner.errors import ModelError
from mgrq_runner.files import file_kind, read_json

if TYPE_CHECKING:
    from mgrq_runner.settings import ModelSettings

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Proxy:
    """A small timm model trained on Fashion-MNIST by ``scripts/train_proxy.py`` and shipped in the package."""

    name: str
    architecture: type[nn.Module]
    arch: dict[str, Any]

    @property
    def weights(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}_fmnist.safetensors"

    @property
    def card(self) -> Path:
        return self.weights.with_suffix(".json")


PROXIES = {
    # A ViT for 28x28 grey images: 7x7 patches of 4x4 pixels plus a class token.
    "proxy_vit": Proxy(
        "proxy_vit",
        VisionTransformer,
        dict(
            img_size=28,
            patch_size=4,
            in_chans=1,
            num_classes=10,
            embed_dim=96,
            depth=4,
            num_heads=3,
            mlp_ratio=4.0,
            qkv_bias=True,
            class_token=True,
            global_pool="token",
        ),
    ),
    # A Swin for the same images: 14x14 patches of 2x2 pixels in 7x7 windows (4 windows, the second block
    # shifted), one patch merging to 7x7 (a single window, so no shift there), global average pooling.
    "proxy_swin": Proxy(
        "proxy_swin",
        SwinTransformer,
        dict(
            img_size=28,
            patch_size=2,
            in_chans=1,
            num_classes=10,
            embed_dim=48,
            depths=(2, 2),
            num_heads=(3, 6),
            window_size=7,
            mlp_ratio=4.0,
        ),
    ),
}
PROXY_NAME = "proxy_vit"  # the default job's model
# What the quantizer (explicit attention), the RepQ reparameterisation (norm -> qkv, norm -> fc1) and the
# reconstruction units know, by exact type: a subclass may compute something else.
SUPPORTED_BLOCKS = {VisionTransformer: (Block, Attention), SwinTransformer: (SwinTransformerBlock, WindowAttention)}


def create_proxy_model(
    name: str = PROXY_NAME,
    pretrained: bool = True,
    checkpoint: str | None = None,
    checkpoint_ema: bool = False,
    **overrides: Any,
) -> nn.Module:
    """One of the project's proxies (``PROXIES``): a small timm model for Fashion-MNIST.

    Args:
        name: ``proxy_vit`` or ``proxy_swin``.
        pretrained: load the weights shipped in the package (trained by ``scripts/train_proxy.py``).
        checkpoint: a local weight file to load instead.
        checkpoint_ema: take the checkpoint's EMA weights (``load_state_dict``).
        **overrides: constructor arguments on top of the proxy's architecture (training uses ``drop_path_rate``).
    """
    proxy = PROXIES[name]
    model = proxy.architecture(**{**proxy.arch, **overrides})
    model.pretrained_cfg = {
        "input_size": (1, 28, 28),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": FASHION_MNIST_MEAN,
        "std": FASHION_MNIST_STD,
        "num_classes": model.num_classes,
        "architecture": name,
    }
    weights = Path(checkpoint) if checkpoint else (proxy.weights if pretrained else None)
    if weights is not None:
        if not weights.exists():
            fix = (
                f"train it with `python scripts/train_proxy.py --model {name}`"
                if weights == proxy.weights
                else "check model.checkpoint"
            )
            raise ModelError(f"proxy weights {weights} not found. Fix: {fix}, or set model.pretrained=false.")
        state = load_state_dict(weights, checkpoint_ema and checkpoint is not None)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise head_misfit(state, model, name, weights) or ModelError(
                f"weights {weights} do not fit {name} with {overrides or 'its own settings'}: {first_reason(err)}. "
                "Fix: model.checkpoint=<weights trained with those settings>, or model.pretrained=false."
            ) from err
    return model


def first_reason(error: BaseException) -> str:
    """The first line of a ``load_state_dict`` error that says what does not fit (torch's first line only names
    the model class)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return lines[1]
    return lines[0] if lines else type(error).__name__


def head_misfit(state: dict[str, torch.Tensor], model: nn.Module, name: str, source: Path | str) -> ModelError | None:
    """The error for weights whose classifier has another number of classes than ``model``, naming both."""
    head, classes = state.get("head.weight"), getattr(model, "num_classes", None)
    if isinstance(head, torch.Tensor) and head.dim() == 2 and head.shape[0] != classes:
        return ModelError(
            f"checkpoint {source} has a head of {head.shape[0]} classes, the model {name} {classes}. Fix: "
            f"model.num_classes={head.shape[0]}."
        )
    return None


def proxy_card(name: str = PROXY_NAME) -> dict:
    """The training record shipped beside a proxy's weights (command, seed, accuracy)."""
    card = PROXIES[name].card
    return read_json(card, "proxy card", "reinstall mgrq-runner", error=ModelError) if card.exists() else {}


def load_state_dict(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """Loads weights safely from ``.safetensors`` or a ``.pth``/``.pt``/``.bin``/``.pth.tar`` file.

    ``torch.load`` runs with ``weights_only=True``, so a file that needs arbitrary unpickling is refused; the one
    exception allowed is ``argparse.Namespace``, which timm's training script stores beside the weights. A
    training checkpoint's ``state_dict`` (or ``model``) is taken, its ``state_dict_ema`` with ``ema``; a
    ``module.`` prefix (a DistributedDataParallel model saved as it was) is dropped.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".bin", ".tar"))
        hint = f" (it holds {', '.join(inside[:3])})" if inside else ""
        raise ModelError(
            f"checkpoint {path} is a directory{hint}. Fix: point model.checkpoint at the weight file inside it."
        )
    kind = file_kind(path)
    if kind != "a file":
        state = "does not exist" if kind == "missing" else f"is {kind}, not a weight file"
        raise ModelError(f"checkpoint {path} {state}. Fix: point model.checkpoint at a weight file.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if ema:
            raise ModelError(
                f"model.checkpoint_ema=true but {path} is a safetensors file: it holds one set of weights. "
                "Fix: model.checkpoint_ema=false, or point model.checkpoint at the training checkpoint (.pth.tar)."
            )
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ModelError(
                f"{path} is not a readable safetensors file ({str(err).splitlines()[0]}). Fix: point "
                "model.checkpoint at a complete .safetensors file (or a .pth state_dict)."
            ) from err
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for unsafe or broken files
        raise ModelError(
            f"could not load {path} safely ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "Fix: convert it to .safetensors or a plain state_dict of tensors."
        ) from err
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds a {type(state).__name__}, not a state_dict. Fix: save model.state_dict().")
    if ema:
        if not isinstance(state.get("state_dict_ema"), dict):
            raise ModelError(
                f"model.checkpoint_ema=true but {path} has no state_dict_ema (keys: {sorted(state)[:8]}). "
                "Fix: model.checkpoint_ema=false, or the checkpoint of a run trained with --model-ema."
            )
        state = state["state_dict_ema"]
    else:
        state = next((state[key] for key in ("state_dict", "model") if isinstance(state.get(key), dict)), state)
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def unsupported_part(model: nn.Module) -> str | None:
    """What in ``model`` the runner cannot quantize (a description naming the module), or None.

    Supported: a timm ``VisionTransformer`` (ViT, DeiT, DeiT-III with LayerScale, distilled DeiT) whose blocks are
    ``Block`` with ``Attention``, and a ``SwinTransformer`` whose blocks are ``SwinTransformerBlock`` with
    ``WindowAttention``.
    """
    family = next((cls for cls in SUPPORTED_BLOCKS if isinstance(model, cls)), None)
    if family is None:
        return f"architecture {type(model).__name__}"
    block_type, attention_type = SUPPORTED_BLOCKS[family]
    for name, module in model.named_modules():
        if "Block" in type(module).__name__ and type(module) is not block_type:
            return f"block type {type(module).__name__} at {name}"
        if "Attention" in type(module).__name__ and type(module) is not attention_type:
            return f"attention type {type(module).__name__} at {name}"
    return None


def _check_architecture(name: str, kwargs: dict[str, Any]) -> None:
    """Refuses a timm architecture the quantizer does not know, before any weights are loaded. A hub name
    (``hf-hub:org/repo``) names its architecture in its own config: it is checked once built."""
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        hint = f"e.g. {', '.join(close)}" if close else "see timm.list_models()"
        raise ModelError(f"unknown timm model {name!r}. Fix: pick a timm arch.tag, {hint}.")
    try:
        with torch.device("meta"):  # the structure only: no memory, no weights
            skeleton = timm.create_model(arch, pretrained=False, **kwargs)
    except Exception:  # an architecture that cannot be built on the meta device is checked after loading
        return
    _refuse_unsupported(name, skeleton)


def _refuse_unsupported(name: str, model: nn.Module) -> None:
    problem = unsupported_part(model)
    if problem is not None:
        raise ModelError(
            f"model {name!r} is not supported: {problem}. Fix: use a timm ViT, DeiT (DeiT-III included) or Swin "
            "built from timm's Block/Attention or SwinTransformerBlock/WindowAttention (e.g. model=deit_s)."
        )


def create_model(model: ModelSettings) -> torch.nn.Module:
    """Builds the full-precision model ``model`` names (in eval mode, on the CPU).

    ``model.name`` is a proxy (``PROXIES``) or a timm ``arch.tag`` of a supported structure (``unsupported_part``).
    With ``pretrained`` the weights come from ``checkpoint`` if set, else from timm's hub (network or local Hugging
    Face cache). ``num_classes``, ``img_size`` and ``kwargs`` (when set) go to the constructor: a fine-tuned
    checkpoint's head and resolution, or a fresh head on hub weights.
    """
    name = model.name
    kwargs = constructor_kwargs(model)
    if name in PROXIES:
        return create_proxy_model(name, model.pretrained, model.checkpoint, model.checkpoint_ema, **kwargs).eval()
    _check_architecture(name, kwargs)
    if "." not in name and ":" not in name and model.pretrained and not model.checkpoint:
        log.warning(
            "model %s has no weight tag: timm resolves it to its current default weights, which may "
            "not be the ones the papers used (see docs/method.md section 7)",
            name,
        )
    checkpoint = model.checkpoint
    load_hub = model.pretrained and not checkpoint
    try:
        network = timm.create_model(name, pretrained=load_hub, **kwargs)
    except TypeError as err:
        raise ModelError(
            f"{name} does not take the constructor arguments {kwargs}: {err}. Fix: check model.kwargs, "
            "model.num_classes and model.img_size."
        ) from err
    except Exception as err:  # hub and network failures come in many types
        if name.startswith("local-dir:"):  # a folder on this machine: no network involved
            raise ModelError(
                f"could not load {name} ({type(err).__name__}: {first_reason(err)}). Fix: the folder must hold "
                "timm's config.json and model.safetensors (or a pytorch_model.bin of plain tensors: pickled objects "
                "are refused), or pass model.checkpoint=/path/to/weights.safetensors."
            ) from err
        raise ModelError(
            f"could not load pretrained weights for {name} ({type(err).__name__}). Fix: download them where "
            f"there is a network (timm.create_model('{name}', pretrained=True) fills the Hugging Face cache, "
            f"then copy ~/.cache/huggingface), or pass model.checkpoint=/path/to/weights.safetensors, or "
            f"model.pretrained=false for random weights."
        ) from err
    if checkpoint:  # a local file wins over model.pretrained
        load_checkpoint(network, name, checkpoint, model.checkpoint_ema)
    _refuse_unsupported(name, network)
    if checkpoint:
        network.pretrained_cfg = {**network.pretrained_cfg, **checkpoint_preprocessing(Path(checkpoint))}
    if "img_size" in kwargs:  # timm keeps the registry's input size in pretrained_cfg: preprocessing reads it
        size = int(kwargs["img_size"])
        channels = network.pretrained_cfg["input_size"][0]
        network.pretrained_cfg = {**network.pretrained_cfg, "input_size": (channels, size, size)}
    return network.eval()


def load_checkpoint(model: nn.Module, name: str, checkpoint: str, ema: bool) -> None:
    """Loads a local checkpoint into ``model``. Weights made for another input size (position embeddings, Swin's
    relative position tables) go through timm's own filter for the architecture, which resizes them."""
    state = load_state_dict(checkpoint, ema)
    try:
        model.load_state_dict(state)
        return
    except RuntimeError as err:
        error = err
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None and "size mismatch" in str(error):
        try:
            model.load_state_dict(filter_fn(state, model))
            log.info("checkpoint %s resized to %s by timm's checkpoint_filter_fn", checkpoint, name)
            return
        except (RuntimeError, KeyError, ValueError) as err:
            error = err
    raise head_misfit(state, model, name, checkpoint) or ModelError(
        f"checkpoint {checkpoint} does not fit {name}: {first_reason(error)}. Fix: use the checkpoint of "
        "that exact architecture, with model.num_classes (and model.img_size, model.kwargs) as it was trained."
    ) from error


# The input size is not among them: the model's own (its architecture's, or model.img_size) decides it.
PREPROCESSING_KEYS = ("interpolation", "crop_pct", "crop_mode", "mean", "std")


def checkpoint_preprocessing(checkpoint: Path) -> dict[str, Any]:
    """The preprocessing a checkpoint was trained with, from a timm ``config.json`` beside it (the layout of a
    Hugging Face hub folder and of ``timm.models.push_to_hf_hub``): its ``pretrained_cfg`` keys, or none."""
    config = checkpoint.parent / "config.json"
    if not config.is_file():
        return {}
    pretrained_cfg = read_json(config, "timm config", "repair or remove it", error=ModelError).get("pretrained_cfg", {})
    if not isinstance(pretrained_cfg, dict):
        raise ModelError(f"{config} beside the checkpoint is not a timm config (its pretrained_cfg is not a mapping).")
    found = {key: pretrained_cfg[key] for key in PREPROCESSING_KEYS if key in pretrained_cfg}
    found = {key: tuple(value) if isinstance(value, list) else value for key, value in found.items()}  # as timm
    if found:
        log.info("preprocessing from %s: %s", config, found)
    return found


def constructor_kwargs(model: ModelSettings) -> dict[str, Any]:
    """``model.kwargs`` with ``model.num_classes`` and ``model.img_size`` (when set) on top: what the model's
    constructor is given besides the architecture's defaults."""
    kwargs = dict(model.kwargs or {})
    for key in ("num_classes", "img_size"):
        if getattr(model, key) is not None:
            kwargs[key] = int(getattr(model, key))
    return kwargs
