"""Model creation: timm ViT/DeiT/Swin with pinned weight tags, local checkpoints, and the shipped proxies."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import DictConfig
from timm.layers import Attention
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from mgrq_runner.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from mgrq_runner.errors import ModelError

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
    name: str = PROXY_NAME, pretrained: bool = True, checkpoint: str | None = None, **overrides: Any
) -> nn.Module:
    """One of the project's proxies (``PROXIES``): a small timm model for Fashion-MNIST.

    Args:
        name: ``proxy_vit`` or ``proxy_swin``.
        pretrained: load the weights shipped in the package (trained by ``scripts/train_proxy.py``).
        checkpoint: a local weight file to load instead.
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
        "num_classes": 10,
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
        model.load_state_dict(load_state_dict(weights))
    return model


def proxy_card(name: str = PROXY_NAME) -> dict:
    """The training record shipped beside a proxy's weights (command, seed, accuracy)."""
    card = PROXIES[name].card
    return json.loads(card.read_text()) if card.exists() else {}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Loads weights safely from ``.safetensors`` or a ``.pth``/``.pt``/``.bin`` file of tensors only.

    ``torch.load`` runs with ``weights_only=True``, so a file that needs arbitrary unpickling is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist. Fix: point model.checkpoint at a weight file.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ModelError(
                f"{path} is not a readable safetensors file ({str(err).splitlines()[0]}). Fix: point "
                "model.checkpoint at a complete .safetensors file (or a .pth state_dict)."
            ) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for unsafe or broken files
        raise ModelError(
            f"could not load {path} safely ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "Fix: convert it to .safetensors or a plain state_dict of tensors."
        ) from err
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
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


def _check_architecture(name: str) -> None:
    """Refuses a timm architecture the quantizer does not know, before any weights are loaded."""
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        hint = f"e.g. {', '.join(close)}" if close else "see timm.list_models()"
        raise ModelError(f"unknown timm model {name!r}. Fix: pick a timm arch.tag, {hint}.")
    try:
        with torch.device("meta"):  # the structure only: no memory, no weights
            skeleton = timm.create_model(arch, pretrained=False)
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


def create_model(model_cfg: DictConfig) -> torch.nn.Module:
    """Builds the full-precision model named by ``model_cfg`` (in eval mode, on the CPU).

    ``model_cfg.name`` is a proxy (``PROXIES``) or a timm ``arch.tag`` of a supported structure
    (``unsupported_part``). With ``pretrained`` the weights come from ``checkpoint`` if set, else from timm's hub
    (network or local Hugging Face cache).
    """
    name = str(model_cfg.name)
    if name in PROXIES:
        return create_proxy_model(name, bool(model_cfg.pretrained), model_cfg.get("checkpoint")).eval()
    _check_architecture(name)
    if "." not in name and model_cfg.pretrained and not model_cfg.get("checkpoint"):
        log.warning(
            "model %s has no weight tag: timm resolves it to its current default weights, which may "
            "not be the ones the papers used (see method.md section 7)",
            name,
        )
    checkpoint = model_cfg.get("checkpoint")
    load_hub = bool(model_cfg.pretrained) and not checkpoint
    try:
        model = timm.create_model(name, pretrained=load_hub)
    except Exception as err:  # hub and network failures come in many types
        raise ModelError(
            f"could not load pretrained weights for {name} ({type(err).__name__}). Fix: download them where "
            f"there is a network (timm.create_model('{name}', pretrained=True) fills the Hugging Face cache, "
            f"then copy ~/.cache/huggingface), or pass model.checkpoint=/path/to/weights.safetensors, or "
            f"model.pretrained=false for random weights."
        ) from err
    if checkpoint:  # a local file wins over model.pretrained
        state = load_state_dict(checkpoint)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ModelError(
                f"checkpoint {checkpoint} does not fit {name}: {str(err).splitlines()[0]}. "
                "Fix: use the checkpoint of that exact architecture."
            ) from err
    _refuse_unsupported(name, model)
    return model.eval()
