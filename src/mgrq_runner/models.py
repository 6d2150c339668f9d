"""Model creation: timm ViT/DeiT/Swin with pinned weight tags, local checkpoints, and the shipped proxy ViT."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import timm
import torch
from omegaconf import DictConfig
from timm.models.vision_transformer import VisionTransformer

from mgrq_runner.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from mgrq_runner.errors import ModelError

log = logging.getLogger(__name__)

PROXY_NAME = "proxy_vit"
WEIGHTS_DIR = Path(__file__).parent / "weights"
PROXY_WEIGHTS = WEIGHTS_DIR / "proxy_vit_fmnist.safetensors"
PROXY_CARD = WEIGHTS_DIR / "proxy_vit_fmnist.json"

# A small ViT for 28x28 grey images: 7x7 patches of 4x4 pixels plus a class token.
PROXY_ARCH = dict(
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
)
SUPPORTED_FAMILIES = ("vit_", "deit_", "swin_")


def create_proxy_model(pretrained: bool = True, checkpoint: str | None = None, **overrides: float) -> VisionTransformer:
    """The project's proxy: a timm ``VisionTransformer`` for Fashion-MNIST.

    Args:
        pretrained: load the weights shipped in the package (trained by ``scripts/train_proxy.py``).
        checkpoint: a local weight file to load instead.
        **overrides: constructor arguments on top of ``PROXY_ARCH`` (training uses ``drop_path_rate``).
    """
    model = VisionTransformer(**{**PROXY_ARCH, **overrides})
    model.pretrained_cfg = {
        "input_size": (1, 28, 28),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": FASHION_MNIST_MEAN,
        "std": FASHION_MNIST_STD,
        "num_classes": 10,
        "architecture": PROXY_NAME,
    }
    weights = Path(checkpoint) if checkpoint else (PROXY_WEIGHTS if pretrained else None)
    if weights is not None:
        if not weights.exists():
            fix = (
                "train it with `python scripts/train_proxy.py`"
                if weights == PROXY_WEIGHTS
                else "check model.checkpoint"
            )
            raise ModelError(f"proxy weights {weights} not found. Fix: {fix}, or set model.pretrained=false.")
        model.load_state_dict(load_state_dict(weights))
    return model


def proxy_card() -> dict:
    """The training record shipped beside the proxy weights (command, seed, accuracy)."""
    return json.loads(PROXY_CARD.read_text()) if PROXY_CARD.exists() else {}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Loads weights safely from ``.safetensors`` or a ``.pth``/``.pt``/``.bin`` file of tensors only.

    ``torch.load`` runs with ``weights_only=True``, so a file that needs arbitrary unpickling is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist. Fix: point model.checkpoint at a weight file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
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


def create_model(model_cfg: DictConfig) -> torch.nn.Module:
    """Builds the full-precision model named by ``model_cfg`` (in eval mode, on the CPU).

    ``model_cfg.name`` is ``proxy_vit`` or any timm ViT/DeiT/Swin ``arch.tag``. With ``pretrained`` the weights
    come from ``checkpoint`` if set, else from timm's hub (network or local Hugging Face cache).
    """
    name = str(model_cfg.name)
    if name == PROXY_NAME:
        return create_proxy_model(bool(model_cfg.pretrained), model_cfg.get("checkpoint")).eval()
    arch = name.split(".")[0]
    if not arch.startswith(SUPPORTED_FAMILIES):
        raise ModelError(
            f"model {name!r} is not a ViT, DeiT or Swin. Fix: use a preset (model=deit_s, vit_b, "
            f"swin_t, ...) or a timm name starting with {', '.join(SUPPORTED_FAMILIES)}."
        )
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ModelError(f"unknown timm model {name!r}. Fix: pick a timm arch.tag, e.g. {', '.join(close)}.")
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
    return model.eval()
