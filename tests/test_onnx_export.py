"""ONNX export (``export=onnx``) and its evaluation under onnxruntime (``eval.runtime=onnxruntime``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from mgrq_runner.deploy import onnx_export
from mgrq_runner.deploy.onnx_export import (
    OnnxRuntimeModel,
    config_without_vnni,
    cpu_int8_kernels,
    deploy_model,
    export_onnx,
    int16_overflowing_weights,
    integer_kernels,
    session_config,
)
from mgrq_runner.deploy.safetensors_export import manifest_digest
from mgrq_runner.errors import ConfigError, ModelError
from mgrq_runner.files import file_sha256
from mgrq_runner.models import create_proxy_model
from mgrq_runner.quant.api import QuantConfig, quant_layers, quantize_
from mgrq_runner.quant.calibrate import InitConfig, calibrate
from mgrq_runner.quant.quantizers import UniformQuantizer
from mgrq_runner.quant.rounding import AdaRound
from mgrq_runner.run import run
from mgrq_runner.rundir import EXPORT_MANIFEST
from mgrq_runner.settings import parse_settings
from tests import emulated_cpu
from tests.conftest import compose_config, needs_fashion_mnist
from tests.recon.test_families import FAMILIES

# onnxruntime's float ops (LayerNorm, GELU, Softmax, the integer kernels' rescaling) differ from torch's in the
# last bits, which now and then moves a value across a rounding boundary: one activation code off by one. Most
# images' logits still agree to EXACT (a share of the largest logit), every image's to FLIPPED, every top-1.
# How many images see a flip depends on onnxruntime's version and the CPU's kernels: with onnxruntime 1.32 on an
# AVX-512 VNNI CPU, 8 of these 12 images are exact at W8A8 (77 % of 96 fresh ones; 98 % at W4A4: coarser
# grids), so EXACT_SHARE asks for half: a wrong scale, zero point or layout puts every image far off.
EXACT, FLIPPED, EXACT_SHARE = 1e-4, 0.02, 0.5
BITS = {"w8a8": (8, 8), "w4a4": (4, 4), "w8a8_vnni": (8, 8)}  # _vnni: export=onnx_vnni's int8 8-bit weights


def _quantized(family: str, w_bits: int, a_bits: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if family == "proxy_vit":
        fp_model, images = create_proxy_model(pretrained=False), torch.randn(12, 1, 28, 28)
    else:
        fp_model, images = FAMILIES[family](), torch.randn(12, 3, 32, 32)
    model = quantize_(copy.deepcopy(fp_model.eval()), QuantConfig(w_bits=w_bits, a_bits=a_bits))
    calibrate(model, [images[:6], images[6:]], 2, InitConfig(percentiles=(0.999, 1.0)), torch.device("cpu"))
    return model.eval(), images


def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


CASES = [
    ("proxy_vit", "w8a8"),
    ("proxy_vit", "w4a4"),
    ("proxy_vit", "w8a8_vnni"),
    ("swin", "w8a8"),
    ("swin", "w4a4"),
    ("deit_distilled", "w4a4"),
]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{b}" for f, b in CASES])
def exported(request, tmp_path_factory) -> dict:
    family, bits = request.param
    w_bits, a_bits = BITS[bits]
    model, images = _quantized(family, w_bits, a_bits)
    out = tmp_path_factory.mktemp(f"{family}_{bits}")
    int8_weights = bits.endswith("_vnni")
    info = export_onnx(model, out, images[:2], int8_weights)
    return {"model": model, "images": images, "dir": out, "info": info, "bits": (w_bits, a_bits), "int8": int8_weights}


def _assert_same_function(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape
    error = (got - expected).abs().amax(dim=1) / expected.abs().max()
    assert (error <= EXACT).float().mean() >= EXACT_SHARE, error
    assert error.max() <= FLIPPED, error
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_onnxruntime_logits_match_the_simulation(exported) -> None:
    """Exported at batch 2, run at batch 12: dynamic batch size, the simulation's logits and top-1."""
    expected = _logits(exported["model"], exported["images"])
    _assert_same_function(OnnxRuntimeModel(exported["dir"] / "model.onnx")(exported["images"]), expected)


needs_qemu = pytest.mark.skipif(
    not emulated_cpu.AVAILABLE, reason="needs an x86_64 machine with qemu-user (apt-get install qemu-user)"
)


def _integer_matmul(path: Path, codes: np.ndarray, zero_point: np.ndarray) -> Path:
    """``x @ (codes - zero_point)`` as the exporter writes it (uint8 Q/DQ input, weight DequantizeLinear, MatMul),
    unit scales: fed integer-valued images 0..255, its output is the integer product itself."""
    inputs = [
        numpy_helper.from_array(codes, "codes"),
        numpy_helper.from_array(zero_point, "zero_point"),
        numpy_helper.from_array(np.float32(1.0), "one"),
        numpy_helper.from_array(np.uint8(0), "zero"),
    ]
    nodes = [
        onnx.helper.make_node("QuantizeLinear", ["x", "one", "zero"], ["x_codes"]),
        onnx.helper.make_node("DequantizeLinear", ["x_codes", "one", "zero"], ["x_real"]),
        onnx.helper.make_node("DequantizeLinear", ["codes", "one", "zero_point"], ["weight"]),
        onnx.helper.make_node("MatMul", ["x_real", "weight"], ["y"]),
    ]
    float_tensor = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        nodes,
        "integer_matmul",
        [onnx.helper.make_tensor_value_info("x", float_tensor, [None, codes.shape[0]])],
        [onnx.helper.make_tensor_value_info("y", float_tensor, [None, codes.shape[1]])],
        inputs,
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)]), str(path))
    return path


@needs_qemu
def test_the_emulated_cpu_sums_u8_s8_pairs_in_int16(tmp_path) -> None:
    """The harness: under qemu, onnxruntime's kernel computes what ``avx2_u8s8_products`` emulates (int16 pair
    sums, clipped) and not the exact product, so the AVX2 kernel really runs; the same weights in uint8 are exact."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 64)).astype(np.uint8)
    signed = rng.integers(-128, 128, size=(64, 16)).astype(np.int8)
    exact = images.astype(np.int64) @ signed.astype(np.int64)
    saturating = emulated_cpu.avx2_u8s8_products(images, signed)
    assert not np.array_equal(saturating, exact)  # full-range int8 weights do overflow int16 pairs

    s8 = _integer_matmul(tmp_path / "s8.onnx", signed, np.int8(0))
    u8 = _integer_matmul(tmp_path / "u8.onnx", (signed.astype(np.int16) + 128).astype(np.uint8), np.uint8(128))
    on_avx2 = {
        name: emulated_cpu.run_on_avx2(path, images.astype(np.float32), tmp_path / name)
        for name, path in (("s8", s8), ("u8", u8))
    }
    assert np.array_equal(on_avx2["s8"], saturating)
    assert np.array_equal(on_avx2["u8"], exact)


@needs_qemu
def test_onnxruntime_logits_match_the_simulation_on_avx2_without_vnni(exported, tmp_path) -> None:
    """The same parity on an emulated AVX2 CPU without VNNI, whose u8 x s8 kernel sums products in int16, in a
    session with the file's ``session_config_without_vnni`` (none but for export=onnx_vnni, which needs it: shown
    too)."""
    expected = _logits(exported["model"], exported["images"])
    path, images = exported["dir"] / "model.onnx", exported["images"].numpy()
    config = exported["info"]["session_config_without_vnni"]  # the emulated CPU has none
    got = emulated_cpu.run_on_avx2(path, images, tmp_path / "configured", config)
    _assert_same_function(torch.from_numpy(got), expected)
    if exported["int8"]:  # a plain session does not compute the simulation's function with int8 8-bit weights
        plain = torch.from_numpy(emulated_cpu.run_on_avx2(path, images, tmp_path / "plain"))
        error = (plain - expected).abs().amax(dim=1) / expected.abs().max()
        assert (error <= EXACT).float().mean() < EXACT_SHARE and error.max() > FLIPPED


def test_deploy_model_computes_the_simulation_in_torch(exported) -> None:
    deploy = deploy_model(exported["model"], exported["int8"])
    expected = _logits(exported["model"], exported["images"])
    torch.testing.assert_close(_logits(deploy, exported["images"]), expected, rtol=1e-5, atol=1e-5)


def test_codes_are_the_b_bit_grid_in_8_bit_containers(exported) -> None:
    w_bits, a_bits = exported["bits"]
    graph = onnx.load(str(exported["dir"] / "model.onnx")).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    quantize_nodes = [node for node in graph.node if node.op_type == "QuantizeLinear"]
    weight_codes = [
        initializers[node.input[0]]
        for node in graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers
    ]
    assert len(weight_codes) == sum(1 for _ in quant_layers(exported["model"]))
    for codes in weight_codes:
        if w_bits == 8 and not exported["int8"]:  # uint8: onnxruntime's u8 x u8 kernels, exact without VNNI too
            assert str(codes.dtype) == "uint8"
            assert codes.max() > 2**7 - 1  # the test's W8 grid reaches the codes that overflowed as int8
        else:  # int8, within the b-bit grid shifted by 2**(b-1)
            assert str(codes.dtype) == "int8"
            assert codes.min() >= -(2 ** (w_bits - 1)) and codes.max() <= 2 ** (w_bits - 1) - 1
            # no pair of uint8 x int8 products leaves int16 in the AVX2 kernel, even at full-scale activations
            assert 2 * 255 * int(np.abs(codes.astype(np.int16)).max()) <= 2**15 - 1 or exported["int8"]
    image = graph.input[0].name
    assert sum(node.input[0] == image for node in quantize_nodes) == 1  # the patch embedding's 8-bit input
    for node in quantize_nodes:
        bits = 8 if node.input[0] == image else a_bits
        zero_point = initializers[node.input[2]]
        assert str(zero_point.dtype) == "uint8" and int(zero_point) <= 2**bits - 1
        clipped = node.input[0] in producers and producers[node.input[0]].op_type == "Clip"
        assert clipped == (bits < 8), node.name
    assert exported["info"]["opset"] == 21
    assert all(t.HasField("raw_data") for t in graph.initializer)  # int8 codes take a byte each in the file
    assert not any(node.metadata_props for node in graph.node)  # no stack traces or source paths


def test_int8_8_bit_weights_are_found_and_configured(exported, monkeypatch) -> None:
    """Only export=onnx_vnni's 8-bit int8 weights (and exports made before uint8 containers) can overflow int16
    pair sums, every quantized layer's; the session config they need is applied only on a CPU without VNNI."""
    path = exported["dir"] / "model.onnx"
    layers = sum(1 for _ in quant_layers(exported["model"]))
    assert len(int16_overflowing_weights(path)) == (layers if exported["int8"] else 0)
    needs = {"session.x64quantprecision": "1"} if exported["int8"] else {}
    assert exported["info"]["session_config_without_vnni"] == config_without_vnni(path) == needs
    for isa, pairs_in_int16, applied in (("AVX2 without VNNI", True, needs), ("AVX-512 VNNI", False, {})):
        cpu = {"isa": isa, "u8s8_pairs_in_int16": pairs_in_int16}
        monkeypatch.setattr(onnx_export, "cpu_int8_kernels", lambda cpu=cpu: cpu)
        assert session_config(path) == applied  # with VNNI the entry would cost the int8 speed: not set


@pytest.mark.parametrize(
    ("flags", "isa", "pairs_in_int16"),
    [
        ("fpu sse4_2 avx avx2 fma bmi2", "AVX2 without VNNI", True),  # AMD Zen 2/3, Intel Haswell..Coffee Lake
        ("avx2 fma avx512f avx512dq avx512bw avx512vl", "AVX-512 without VNNI", True),  # Intel Skylake-SP
        ("avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni", "AVX-512 VNNI", False),  # Cascade Lake, Zen 4
        ("avx2 fma avx_vnni", "AVX-VNNI", False),  # Intel Alder Lake
        ("avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni amx_tile amx_int8", "AMX-INT8", False),
        ("fpu sse4_1 sse4_2", "x86 without AVX2", None),
    ],
)
def test_cpu_int8_kernels_from_the_cpu_flags(tmp_path, monkeypatch, flags, isa, pairs_in_int16) -> None:
    monkeypatch.setattr(onnx_export.platform, "machine", lambda: "x86_64")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_int8_kernels(cpuinfo) == {"isa": isa, "u8s8_pairs_in_int16": pairs_in_int16}
    assert cpu_int8_kernels(tmp_path / "missing") == {"isa": "x86 (flags unknown)", "u8s8_pairs_in_int16": None}
    monkeypatch.setattr(onnx_export.platform, "machine", lambda: "aarch64")
    assert cpu_int8_kernels(cpuinfo) == {"isa": "aarch64", "u8s8_pairs_in_int16": False}
    monkeypatch.setattr(onnx_export.platform, "machine", lambda: "riscv64")
    assert cpu_int8_kernels(cpuinfo) == {"isa": "riscv64", "u8s8_pairs_in_int16": None}


def test_integer_kernels_run(exported) -> None:
    """onnxruntime fuses every quantized Linear and q @ k^T into an integer kernel; only the head's Gemm, the
    patch-embedding Conv and attn @ v (log-sqrt(2) operand, float) keep DequantizeLinear inputs."""
    kernels = integer_kernels(exported["dir"] / "model.onnx")
    model = exported["model"]
    linears = sum(1 for name, _ in quant_layers(model) if "patch_embed" not in name and "head" not in name)
    attention = sum(1 for name, _ in model.named_modules() if name.endswith("matmul_qk"))
    assert kernels.get("MatMulIntegerToFloat", 0) == linears + attention


def test_unhardened_adaround_is_refused(tmp_path) -> None:
    model, images = _quantized("proxy_vit", 4, 4)
    name, layer = list(quant_layers(model))[2]
    layer.unfreeze()
    layer.rounding = AdaRound(layer.weight.detach(), layer.weight_quantizer)
    with pytest.raises(ModelError, match=f"{name} cannot be exported to ONNX: .*not hardened"):
        export_onnx(model, tmp_path, images[:2])
    assert not (tmp_path / "model.onnx").exists()


def test_an_unknown_quantizer_is_refused_not_run_in_float(tmp_path) -> None:
    class OtherQuantizer(UniformQuantizer):
        pass

    model, images = _quantized("proxy_vit", 4, 4)
    attn = model.get_submodule("blocks.1.attn")
    other = OtherQuantizer(4)
    other.load_state_dict(attn.matmul_qk.quantizer_b.state_dict())
    other.enabled = True
    attn.matmul_qk.quantizer_b = other
    with pytest.raises(ModelError, match="blocks.1.attn.matmul_qk cannot be exported to ONNX: OtherQuantizer"):
        export_onnx(model, tmp_path, images[:2])


@needs_fashion_mnist
def test_export_onnx_run_and_onnxruntime_eval(tmp_path) -> None:
    """A run with export=onnx, then mode=eval under onnxruntime: the simulation's top-1 and FP agreement."""
    run_dir = tmp_path / "run"
    results, _ = run(compose_config(run_dir, "debug=smoke", "method=repq", "export=onnx"))
    assert results["export"]["onnx"]["opset"] == 21
    manifest = json.loads((run_dir / EXPORT_MANIFEST).read_text())
    assert manifest["onnx"]["sha256"] == results["export"]["onnx"]["sha256"]
    evaluated, _ = run(
        compose_config(
            tmp_path / "eval", "debug=smoke", "mode=eval", f"checkpoint={run_dir}", "eval.runtime=onnxruntime"
        )
    )
    assert evaluated["status"] == "done" and evaluated["num_eval"] == results["num_eval"]
    assert evaluated["agreement_with_simulation"] >= 0.995
    assert abs(evaluated["top1"] - results["top1"]) <= 0.5  # 200 images: one image is 0.5 points
    assert evaluated["fp_top1"] == results["fp_top1"] and evaluated["fp_agreement"] is not None
    assert set(evaluated["throughput"]) == {"fp", "simulation", "onnxruntime"}
    assert evaluated["onnx"]["kernels"]["MatMulIntegerToFloat"] > 0
    assert evaluated["onnx"]["cpu"] == cpu_int8_kernels()

    graph = onnx.load(str(run_dir / "model.onnx"))  # a replaced graph, its checksum and the digest made to fit
    quantize_nodes = [node for node in graph.graph.node if node.op_type == "QuantizeLinear"]
    graph.graph.node.remove(quantize_nodes[0])
    onnx.save(graph, str(run_dir / "model.onnx"))
    manifest["onnx"]["sha256"] = file_sha256(run_dir / "model.onnx")
    manifest["digest"] = manifest_digest(manifest)
    (run_dir / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=rf"has {len(quantize_nodes) - 1} QuantizeLinear nodes where its export had"):
        run(compose_config(tmp_path / "eval2", "mode=eval", f"checkpoint={run_dir}", "eval.runtime=onnxruntime"))


@needs_fashion_mnist
def test_onnxruntime_eval_needs_an_onnx_export(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run(compose_config(run_dir, "debug=smoke", "method=repq", "export=true"))
    with pytest.raises(ModelError, match="holds no ONNX export. Fix: re-run that job with export=onnx"):
        run(compose_config(tmp_path / "eval", "mode=eval", f"checkpoint={run_dir}", "eval.runtime=onnxruntime"))
    (run_dir / "model.onnx").write_bytes(b"")
    manifest = json.loads((run_dir / EXPORT_MANIFEST).read_text())
    manifest["onnx"] = {"file": "model.onnx", "sha256": "0" * 64}
    manifest["digest"] = manifest_digest(manifest)
    (run_dir / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="does not match the checksum"):
        run(compose_config(tmp_path / "eval2", "mode=eval", f"checkpoint={run_dir}", "eval.runtime=onnxruntime"))


def test_export_onnx_vnni_is_the_int8_weight_export(tmp_path: Path) -> None:
    vnni = parse_settings(compose_config(tmp_path / "a", "export=onnx_vnni"))
    assert vnni.export and vnni.export_onnx and vnni.onnx_int8_weights
    portable = parse_settings(compose_config(tmp_path / "b", "export=onnx"))
    assert portable.export_onnx and not portable.onnx_int8_weights


def test_bad_onnx_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="export='bogus' is unknown. Fix: export=true"):
        run(compose_config(tmp_path / "a", "export=bogus"))
    with pytest.raises(ConfigError, match="eval.runtime=onnxruntime evaluates an exported model. Fix: mode=eval"):
        run(compose_config(tmp_path / "b", "eval.runtime=onnxruntime"))
    with pytest.raises(ConfigError, match="eval.runtime='tensorrt' is unknown"):
        run(compose_config(tmp_path / "c", "eval.runtime=tensorrt"))
