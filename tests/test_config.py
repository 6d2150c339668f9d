"""Every preset composes (compose API), the data set follows the model, and bad settings are rejected."""

import itertools

import pytest

from mgrq_runner.errors import ConfigError
from mgrq_runner.settings import MethodSettings, parse_settings


def method_of(cfg) -> MethodSettings:
    """The method's parsed settings (every setting of the job checked on the way)."""
    method = parse_settings(cfg).method
    assert method is not None
    return method


MODELS = ["deit_t", "deit_s", "deit_b", "vit_s", "vit_b", "swin_t", "swin_s", "swin_b", "proxy_vit", "proxy_swin"]
QUANTS = ["w3a3", "w4a4", "w6a6", "w8a8"]
METHODS = ["fp", "minmax", "repq", "brecq", "qdrop", "mgrq"]


@pytest.mark.parametrize(("model", "quant", "method"), list(itertools.product(MODELS, QUANTS, METHODS)))
def test_every_preset_composes(compose_cfg, model: str, quant: str, method: str) -> None:
    cfg = compose_cfg(f"model={model}", f"quant={quant}", f"method={method}")
    assert cfg.quant.w_bits == cfg.quant.a_bits == int(quant[1])
    proxy = model.startswith("proxy_")
    assert cfg.data.name == ("fashion_mnist" if proxy else "imagenet")
    assert cfg.model.name == model if proxy else "." in cfg.model.name, "ImageNet presets pin a weight tag"
    parsed = method_of(cfg)
    assert (parsed.quant is None) == (method == "fp")
    recon, losses = parsed.recon, parsed.losses
    if method in ("brecq", "qdrop", "mgrq"):
        default_job = (model, quant) == ("proxy_vit", "w4a4")  # its own budget (conf/model/proxy_vit.yaml)
        assert recon.iters == (600 if default_job else 1000 if proxy else 20_000)
        assert recon.quant_prob == (1.0 if method == "brecq" else 0.5)
        assert (losses.global_weight, losses.local_weight) == ((1.0, 1.0) if method == "mgrq" else (0.0, 0.0))
    else:
        assert recon is None


def test_any_bits_by_override_and_imagenet_root_from_env(compose_cfg, monkeypatch) -> None:
    monkeypatch.setenv("IMAGENET_ROOT", "/data/imagenet")
    cfg = compose_cfg("model=deit_s", "quant.w_bits=3", "quant.a_bits=4")
    quant = method_of(cfg).quant
    assert quant is not None and (quant.w_bits, quant.a_bits) == (3, 4)
    assert cfg.data.root == "/data/imagenet"
    assert compose_cfg("model=deit_s", "data.root=/elsewhere").data.root == "/elsewhere"


@pytest.mark.parametrize("override", ["quant.w_bits=1", "quant.a_bits=9", "quant.input_bits=0"])
def test_bits_out_of_range(compose_cfg, override: str) -> None:
    with pytest.raises(ConfigError, match=r"outside 2\.\.8"):
        method_of(compose_cfg(override))


def test_bad_init_settings(compose_cfg) -> None:
    with pytest.raises(ConfigError, match="search"):
        method_of(compose_cfg("method.init.search=kl"))
    with pytest.raises(ConfigError, match="softmax"):
        method_of(compose_cfg("method.init.softmax_quantizer=linear"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.recon.quant_prob=1.5", "quant_prob"),
        ("method.recon.iters=0", "iters"),
        ("method.loss.global_distance=cosine", "global_distance"),
        ("method.loss.local_distance=l1", "local_distance"),
        ("method.loss.fusion=sum", "fusion"),
        ("method.loss.local_layers=[qkv,norm1]", "local_layers"),
        ("method.loss.global_weight=-1", "weights"),
        ("method.loss.local_target_dtype=float16", "local_target_dtype"),
    ],
)
def test_bad_reconstruction_settings(compose_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        method_of(compose_cfg("method=mgrq", override))


def test_loss_weight_sweep_expands(compose_cfg) -> None:
    cfg = compose_cfg("method=mgrq", "method.loss.global_weight=10", "method.loss.local_weight=0.1")
    losses = method_of(cfg).losses
    assert losses is not None and (losses.global_weight, losses.local_weight) == (10.0, 0.1)


# The 2025-26 framework's presets: (rotation, mlp_relu, rounding, global distance, (λG, λL), QDrop p, softmax)
FRAMEWORK = {
    "glfq": ("hadamard", True, "ste", "mse_feature", (0.5, 0.0), 0.5, "uniform"),
    "glfq_no_rotation": ("none", True, "ste", "mse_feature", (0.5, 0.0), 0.5, "uniform"),
    "glfq_no_mlp_relu": ("hadamard", False, "ste", "mse_feature", (0.5, 0.0), 0.5, "uniform"),
    "glfq_adaround": ("hadamard", True, "adaround", "mse_feature", (0.5, 0.0), 0.5, "uniform"),
    "mgrq_glfq": ("hadamard", True, "ste", "kl", (1.0, 1.0), 0.5, "uniform"),
    "mgrq_brecq": ("none", False, "adaround", "kl", (1.0, 1.0), 1.0, "log_sqrt2"),
}
TIMM = "model=timm model.name=deit_tiny_distilled_patch16_224 model.pretrained=false"


@pytest.mark.parametrize(
    ("model", "method"), list(itertools.product([f"model={m}" for m in MODELS] + [TIMM], FRAMEWORK))
)
def test_every_framework_preset_composes(compose_cfg, model: str, method: str) -> None:
    parsed = method_of(compose_cfg(*model.split(), "quant=w3a3", f"method={method}"))
    rotation, mlp_relu, rounding, distance, weights, quant_prob, softmax = FRAMEWORK[method]
    assert parsed.name == method and parsed.init is not None and parsed.quant is not None
    assert (parsed.init.rotation, parsed.mlp_relu is not None, parsed.quant.softmax_quantizer) == (
        rotation,
        mlp_relu,
        softmax,
    )
    assert parsed.init.reparam == (rotation == "none" and method == "mgrq_brecq")
    recon, losses = parsed.recon, parsed.losses
    assert recon is not None and losses is not None
    assert (recon.rounding, recon.quant_prob, losses.global_distance) == (rounding, quant_prob, distance)
    assert (losses.global_weight, losses.local_weight) == weights
    proxy = model.startswith("model=proxy_")
    if rounding == "ste":  # the model preset's STE budget; GLF-Q's 3000 iterations where it sets none
        assert recon.iters == (1000 if proxy else 3000) and recon.weight_scale_lr > 0
    else:
        assert recon.iters == (1000 if proxy else 20_000)
    assert recon.weight_schedule == ("cosine" if rounding == "ste" else "constant")  # STE's lr decays to 0


# The leaders' losses on QDrop's base: (block distance, ReLU MLPs, (λG, global distance, temperature), fusion)
LEADERS = {
    "fimaq": ("dplr_fim", False, (0.0, "kl", 4.0), "block_mean"),
    "aphq": ("aph", True, (0.0, "kl", 4.0), "block_mean"),
    "pdquant": ("mse", False, (0.625, "kl", 4.0), "raw"),
}


@pytest.mark.parametrize(("model", "method"), list(itertools.product([f"model={m}" for m in MODELS], LEADERS)))
def test_every_leader_preset_composes_on_qdrops_base(compose_cfg, model: str, method: str) -> None:
    parsed, qdrop = (method_of(compose_cfg(model, "quant=w3a3", f"method={m}")) for m in (method, "qdrop"))
    distance, mlp_relu, global_term, fusion = LEADERS[method]
    losses, recon = parsed.losses, parsed.recon
    assert parsed.name == method and losses is not None and recon == qdrop.recon  # AdaRound, QDrop 0.5, budget
    assert parsed.quant == qdrop.quant and parsed.init is not None and qdrop.init is not None
    assert (parsed.init.reparam, parsed.init.rotation) == (qdrop.init.reparam, qdrop.init.rotation)
    assert (losses.block_distance, parsed.mlp_relu is not None, losses.fusion) == (distance, mlp_relu, fusion)
    assert (losses.global_weight, losses.global_distance, losses.temperature) == global_term
    assert (losses.local_weight, losses.statistic_temperature, losses.fisher_rank) == (0.0, 20.0, 5)


def test_rotation_with_the_repq_reparameterisation_is_refused(compose_cfg) -> None:
    with pytest.raises(ConfigError, match="method.init.reparam=false"):
        method_of(compose_cfg("method=glfq", "method.init.reparam=true"))
    with pytest.raises(ConfigError, match="rotation"):
        method_of(compose_cfg("method=glfq", "method.init.rotation=random"))
    with pytest.raises(ConfigError, match="mlp_relu_iters"):
        method_of(compose_cfg("method=glfq", "method.init.mlp_relu_iters=0"))
