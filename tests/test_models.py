"""Model creation: presets, unknown names, offline weights, safe checkpoint loading."""

import argparse
import json
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from mgrq_runner.errors import ModelError
from mgrq_runner.models import create_model, load_state_dict
from mgrq_runner.settings import ModelSettings


def model_cfg(name: str, pretrained: bool = False, checkpoint: str | None = None) -> ModelSettings:
    return ModelSettings.parse({"name": name, "pretrained": pretrained, "checkpoint": checkpoint})


def test_unknown_and_unsupported_names() -> None:
    with pytest.raises(ModelError, match="unknown timm model 'deit_huge_patch99_224"):
        create_model(model_cfg("deit_huge_patch99_224.fb_in1k"))
    with pytest.raises(ModelError, match="not supported: architecture ResNet"):
        create_model(model_cfg("resnet50.a1_in1k"))
    with pytest.raises(ModelError, match="not supported: architecture SwinTransformerV2"):
        create_model(model_cfg("swinv2_tiny_window8_256.ms_in1k"))


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("vit_small_patch16_384.augreg_in21k_ft_in1k", None),
        ("vit_base_patch16_siglip_gap_224.webli", None),
        ("vit_medium_patch16_reg4_gap_256.sbb_in12k_ft_in1k", None),
        ("vit_base_patch16_clip_quickgelu_224.openai", None),
        ("vit_so150m_patch16_reg4_map_256.sbb_e250_in12k", "AttentionPoolLatent at attn_pool"),
    ],
)
def test_families_by_structure_not_name(name: str, module: str | None) -> None:
    """Any timm VisionTransformer made of Block/Attention is accepted, whatever its name; a foreign module is
    named in the refusal."""
    if module is None:
        assert isinstance(create_model(model_cfg(name)), timm.models.vision_transformer.VisionTransformer)
    else:
        with pytest.raises(ModelError, match=module):
            create_model(model_cfg(name))


def test_deit3_with_layerscale_is_accepted() -> None:
    model = create_model(model_cfg("deit3_small_patch16_224.fb_in1k"))
    assert type(model.blocks[0].ls1).__name__ == "LayerScale"


def test_pretrained_without_network_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # The offline switch is read when huggingface_hub is imported, so set the module constant itself.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ModelError, match="model.checkpoint=.*model.pretrained=false"):
        create_model(model_cfg("deit_tiny_patch16_224.fb_in1k", pretrained=True))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_checkpoint(tmp_path: Path, suffix: str) -> None:
    source = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"model": source.state_dict()}, path)
    model = create_model(model_cfg("deit_tiny_patch16_224.fb_in1k", pretrained=True, checkpoint=str(path)))
    assert torch.equal(model.pos_embed, source.pos_embed)
    unflagged = create_model(model_cfg("deit_tiny_patch16_224.fb_in1k", pretrained=False, checkpoint=str(path)))
    assert torch.equal(unflagged.pos_embed, source.pos_embed), "a checkpoint loads whatever model.pretrained says"
    with pytest.raises(ModelError, match="does not fit"):
        create_model(model_cfg("deit_small_patch16_224.fb_in1k", pretrained=True, checkpoint=str(path)))


class Payload:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"weight": Payload()}))
    with pytest.raises(ModelError, match="could not load .* safely"):
        load_state_dict(path)
    with pytest.raises(ModelError, match="does not exist"):
        load_state_dict(tmp_path / "missing.pth")


def test_a_broken_safetensors_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelError, match="is not a readable safetensors file .* Fix: point model.checkpoint"):
        load_state_dict(path)
    sparse = tmp_path / "huge.safetensors"
    with sparse.open("wb") as f:  # a header length of 2**40 bytes: a truncated or foreign file
        f.write((1 << 40).to_bytes(8, "little"))
        f.truncate(1 << 20)
    with pytest.raises(ModelError, match="is not a readable safetensors file"):
        load_state_dict(sparse)


def test_a_timm_training_checkpoint_loads_its_weights_or_its_ema(tmp_path: Path) -> None:
    """timm's train.py saves ``state_dict``, ``state_dict_ema`` and its ``args`` (an argparse.Namespace)."""
    weights = {"weight": torch.ones(2)}
    ema = {"weight": torch.full((2,), 3.0)}
    path = tmp_path / "last.pth.tar"
    torch.save({"epoch": 3, "state_dict": weights, "state_dict_ema": ema, "args": argparse.Namespace(lr=0.1)}, path)
    assert torch.equal(load_state_dict(path)["weight"], weights["weight"])
    assert torch.equal(load_state_dict(path, ema=True)["weight"], ema["weight"])
    torch.save({"module.weight": torch.ones(2)}, tmp_path / "ddp.pth")  # a DistributedDataParallel model's own
    assert list(load_state_dict(tmp_path / "ddp.pth")) == ["weight"]
    torch.save(weights, tmp_path / "plain.pth")
    with pytest.raises(ModelError, match="has no state_dict_ema"):
        load_state_dict(tmp_path / "plain.pth", ema=True)


def test_a_checkpoint_for_another_head_or_not_a_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(create_model(ModelSettings.parse({"name": "proxy_vit", "pretrained": False})).state_dict(), str(path))
    for name in ("proxy_vit", "deit_tiny_patch16_224.fb_in1k"):  # the proxies' loader and timm's
        settings = {"name": name, "pretrained": False, "checkpoint": str(path), "num_classes": 5}
        if name != "proxy_vit":
            settings["kwargs"] = {"img_size": 28, "in_chans": 1, "patch_size": 4, "embed_dim": 96, "depth": 4}
        with pytest.raises(ModelError, match=r"has a head of 10 classes, the model .* 5\. Fix: model.num_classes=10"):
            create_model(ModelSettings.parse(settings))
    with pytest.raises(ModelError, match="checkpoint /dev/zero is a device, not a weight file"):
        load_state_dict("/dev/zero")
    with pytest.raises(ModelError, match=r"is a directory \(it holds w.safetensors\)"):
        load_state_dict(tmp_path)


def test_a_local_dir_model_with_a_pickle_is_refused_without_blaming_the_network(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    args = {"img_size": 32, "patch_size": 8, "depth": 1}
    (folder / "config.json").write_text(
        json.dumps(
            {"architecture": "deit_tiny_patch16_224", "num_classes": 10, "model_args": args, "pretrained_cfg": {}}
        )
    )
    torch.save({"weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError) as refused:
        create_model(model_cfg(f"local-dir:{folder}", pretrained=True))
    message = str(refused.value)
    assert f"could not load local-dir:{folder}" in message and "pickled objects are refused" in message
    assert "network" not in message
