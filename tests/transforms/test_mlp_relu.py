"""GELU -> ReLU MLP reconstruction: structure, what training buys, determinism, and what is refused."""

import copy

import pytest
import torch
from timm.layers import GluMlp, SwiGLU, SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mgrq_runner.errors import ConfigError, ModelError
from mgrq_runner.models import create_proxy_model
from mgrq_runner.settings import MlpReluConfig
from mgrq_runner.transforms.mlp_relu import mlp_modules, relu_mlps_, swap_gelu_for_relu_


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_images(count: int, seed: int) -> torch.Tensor:
    """Fashion-MNIST-shaped inputs (already normalised: zero mean, unit variance)."""
    return torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def forward_order(model: nn.Module, images: torch.Tensor) -> list[nn.Module]:
    """The MLP modules in the order the model's forward calls them."""
    called: list[nn.Module] = []
    hooks = [mlp.register_forward_hook(lambda m, *_: called.append(m)) for _, mlp in mlp_modules(model)]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return called


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).square().sum() / reference.square().sum())


@pytest.mark.parametrize("name", ["proxy_vit", "proxy_swin"])
def test_every_mlp_becomes_relu_in_forward_order(name: str) -> None:
    torch.manual_seed(0)
    model = create_proxy_model(name).eval()
    model.patch_embed.requires_grad_(False)  # a mix of flags, to see each one restored
    flags = {key: p.requires_grad for key, p in model.named_parameters()}
    steps: list[tuple[str, int]] = []

    records = relu_mlps_(
        model,
        random_images(16, 0),
        MlpReluConfig(iters=20, batch_size=8),
        seed=0,
        on_step=lambda mlp, step, loss, total: steps.append((mlp, step)),
    )

    mlps = mlp_modules(model)
    assert len(mlps) == 4
    assert all(type(mlp.act) is nn.ReLU for _, mlp in mlps)
    assert forward_order(model, random_images(2, 1)) == [mlp for _, mlp in mlps]
    assert [r["mlp"] for r in records] == [n for n, _ in mlps]
    assert set(records[0]) == {"mlp", "loss_swap", "loss_final", "target_energy", "seconds"}
    assert steps == [(n, s) for n, _ in mlps for s in (10, 20)]
    assert {key: p.requires_grad for key, p in model.named_parameters()} == flags
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["proxy_vit", "proxy_swin"])
def test_training_lowers_every_mlps_loss(name: str) -> None:
    model = create_proxy_model(name).eval()
    records = relu_mlps_(model, random_images(64, 0), MlpReluConfig(iters=100), seed=0)
    for record in records:
        assert record["loss_final"] < 0.5 * record["loss_swap"], record  # about 30x lower on the proxies
        assert record["target_energy"] > 0


def test_losses_are_measured_on_the_inputs_the_transformed_model_feeds() -> None:
    """Each MLP is trained on what the model, with the earlier MLPs already re-trained, feeds it: recomputing
    loss_final with the finished model's own forward and the original GELU MLPs gives the reported number."""
    model, images = create_proxy_model("proxy_swin").eval(), random_images(16, 0)
    original = copy.deepcopy(model)
    records = relu_mlps_(model, images, MlpReluConfig(iters=20, batch_size=8), seed=0)

    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        mlp.register_forward_hook(lambda _m, args, _out, name=name: inputs.update({name: args[0]}))  # returns None
        for name, mlp in mlp_modules(model)
    ]
    with torch.no_grad():
        model(images)
        for hook in hooks:
            hook.remove()
        for record, (name, mlp), (_, gelu_mlp) in zip(records, mlp_modules(model), mlp_modules(original), strict=True):
            loss = float((mlp(inputs[name]) - gelu_mlp(inputs[name])).square().mean())
            assert loss == pytest.approx(record["loss_final"], rel=1e-3), name


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    model, images, config = create_proxy_model().eval(), random_images(32, 0), MlpReluConfig(iters=20, batch_size=8)
    runs = [copy.deepcopy(model) for _ in range(3)]
    for run, seed in zip(runs, (5, 5, 6), strict=True):
        relu_mlps_(run, images, config, seed=seed)
    first, again, other = (run.state_dict() for run in runs)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_reconstructed_logits_are_closer_than_a_plain_swap() -> None:
    gelu = create_proxy_model().eval()
    swapped, reconstructed = copy.deepcopy(gelu), copy.deepcopy(gelu)
    assert swap_gelu_for_relu_(swapped) == 4
    relu_mlps_(reconstructed, random_images(64, 0), MlpReluConfig(iters=100), seed=0)

    heldout = random_images(64, 1)
    with torch.no_grad():
        reference = gelu(heldout)
        error_swapped = relative_error(swapped(heldout), reference)
        error_reconstructed = relative_error(reconstructed(heldout), reference)
    assert error_reconstructed < error_swapped, (error_reconstructed, error_swapped)


def test_swap_changes_only_the_activations() -> None:
    model = create_proxy_model("proxy_swin").eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    assert swap_gelu_for_relu_(model) == 4
    assert swap_gelu_for_relu_(model) == 0  # already ReLU: nothing more to swap
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert all(type(mlp.act) is nn.ReLU for _, mlp in mlp_modules(model))
    with pytest.raises(ModelError, match="already has a ReLU"):
        relu_mlps_(model, random_images(4, 0), MlpReluConfig(iters=1), seed=0)


@pytest.mark.parametrize("mlp_layer", [GluMlp, SwiGLUPacked, SwiGLU])
def test_gated_mlps_are_refused(mlp_layer) -> None:
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3, num_classes=10, mlp_layer=mlp_layer,
        act_layer=nn.SiLU,
    ).eval()  # fmt: skip
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ModelError, match=r"blocks\.0\.mlp .*Fix: method\.init\.mlp_relu=false"):
        relu_mlps_(model, images, MlpReluConfig(iters=1), seed=0)
    with pytest.raises(ModelError, match="Fix: method.init.mlp_relu=false"):
        swap_gelu_for_relu_(model)


def test_mlp_with_another_activation_is_refused() -> None:
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3, act_layer=nn.SiLU)
    with pytest.raises(ModelError, match="timm Mlp with SiLU"):
        mlp_modules(model)


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(iters=0), "mlp_relu_iters=0"),
        (dict(lr=0.0), "mlp_relu_lr=0.0"),
        (dict(lr=float("nan")), "mlp_relu_lr=nan"),
        (dict(batch_size=0), "mlp_relu_batch_size=0"),
    ],
)
def test_bad_config_values_are_refused(fields: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"method\.init\.{field} must be .*; Fix: method\.init\."):
        MlpReluConfig(**fields)
