"""ONNX export of a quantized model for onnxruntime's integer kernels, and an onnxruntime model to evaluate it.

``export_onnx`` writes ``model.onnx``: the run's quantized model with a QuantizeLinear/DequantizeLinear pair
carrying the run's own grid on every enabled activation quantizer (Linear and patch-embedding inputs, the
``q @ k^T`` operands, the ``v`` operand), and every quantized weight stored as integer codes behind a
DequantizeLinear (per output channel). LayerNorm, Softmax, GELU and residual adds stay in float, as in the
simulation. onnxruntime fuses ``DequantizeLinear -> MatMul`` into integer kernels (``MatMulIntegerToFloat``).

Containers: activations are uint8 codes (zero point in ``0 .. 2**b - 1``). Weights below 8 bits are int8 codes
shifted by ``2**(b-1)`` (the same real values: ``(c - z) * s``), 8-bit weights uint8 codes: see
``weight_container`` for why (onnxruntime's x86 kernels without VNNI sum u8 x s8 products in int16). Below 8
activation bits a Clip to the grid's range precedes the QuantizeLinear: the codes are exactly the b-bit grid's.
The log-sqrt(2) softmax quantizer has no ONNX operator: it is exported as an explicit float elementwise subgraph
(Log, Round, Clip, Exp, Where) and ``attn @ v`` runs in float.

Needs the ``deploy`` extra (onnx, onnxruntime, onnxscript): ``pip install -e '.[deploy]'``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import platform
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mgrq_runner.errors import ModelError
from mgrq_runner.files import file_sha256, read_bytes, write_atomic
from mgrq_runner.models import create_model
from mgrq_runner.quant import primitives
from mgrq_runner.quant.api import activation_quantizers, quant_layers, quantizers, replace_module
from mgrq_runner.quant.codes import weight_codes, weight_grid
from mgrq_runner.quant.modules import QuantConv2d, QuantLinear, QuantMatMul, QuantWeightLayer
from mgrq_runner.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer
from mgrq_runner.rundir import ONNX_FILE
from mgrq_runner.settings import ModelSettings, require_deploy

OPSET = 21
INPUT_NAME, OUTPUT_NAME = "images", "logits"
INTEGER_KERNELS = ("MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv", "ConvInteger", "QGemm")
_UNSUPPORTED_FIX = "export a model quantized by this runner's quantize_ (QuantLinear, QuantConv2d, QuantMatMul)"


# -- the two operators the exporter translates by hand ------------------------------------------------------------


@torch.library.custom_op("mgrq::quantize_dequantize", mutates_args=())
def quantize_dequantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int
) -> torch.Tensor:
    """The simulation's fake quantization (``zero_point`` as uint8; ``low``/``high`` the grid's real range)."""
    return primitives.fake_quantize_inference(x, scale, zero_point.float(), bits)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, low, high, bits):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


@torch.library.custom_op("mgrq::dequantize_weight", mutates_args=())
def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """Real weights of int8 ``codes``: ``(codes - zero_point) * scale`` per slice along ``axis``."""
    shape = [1] * codes.dim()
    shape[axis] = -1
    return (codes.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)


@dequantize_weight.register_fake
def _(codes, scale, zero_point, axis):  # noqa: ANN001, ANN202
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def _translations() -> dict[Any, Any]:
    """onnxscript translations of the two operators (imported here: onnxscript is the optional deploy extra)."""
    from onnxscript import opset21 as op

    def quantize_dequantize_onnx(x, scale, zero_point, low, high, bits: int):  # noqa: ANN001, ANN202
        if bits < 8:  # uint8's own saturation is the 8-bit grid's; narrower grids clip first
            x = op.Clip(x, low, high)
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    def dequantize_weight_onnx(codes, scale, zero_point, axis: int):  # noqa: ANN001, ANN202
        return op.DequantizeLinear(codes, scale, zero_point, axis=axis)

    return {
        torch.ops.mgrq.quantize_dequantize.default: quantize_dequantize_onnx,
        torch.ops.mgrq.dequantize_weight.default: dequantize_weight_onnx,
    }


# -- the deploy model: the quantized model with its quantizers as exportable operators -------------------------


class DeployQuantizer(nn.Module):
    """A uniform per-tensor activation quantizer as a QuantizeLinear/DequantizeLinear pair."""

    def __init__(self, quantizer: UniformQuantizer) -> None:
        super().__init__()
        if quantizer.per_channel or quantizer.scale.numel() != 1:
            raise ModelError("a per-channel activation quantizer has no per-tensor QuantizeLinear")
        self.bits = quantizer.bits
        scale = quantizer.scale.detach().float().reshape(())
        zero_point = quantizer.zero_point.detach().reshape(())
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", zero_point.to(torch.uint8))
        self.register_buffer("low", -zero_point * scale)
        self.register_buffer("high", (primitives.qmax(self.bits) - zero_point) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mgrq.quantize_dequantize(x, self.scale, self.zero_point, self.low, self.high, self.bits)


class DeployLogSqrt2(nn.Module):
    """The log-sqrt(2) quantizer in plain operators (an explicit float subgraph in ONNX)."""

    def __init__(self, quantizer: LogSqrt2Quantizer) -> None:
        super().__init__()
        self.register_buffer("delta", quantizer.delta.detach().float().reshape(()).clone())
        self.zero_code = float(primitives.log_sqrt2_zero_code(quantizer.bits, quantizer.extra_level))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # primitives.log_sqrt2_fake_quantize, out of place: levels k = round(-2 log2(x / delta)), value
        # delta * 2**(-k/2), the zero code (and x = 0, whose level is infinite) giving 0
        levels = torch.clamp(torch.round((torch.log2(x) - torch.log2(self.delta)) * -2.0), min=0.0)
        values = torch.exp2(levels * -0.5) * self.delta
        return torch.where(levels >= self.zero_code, torch.zeros_like(values), values)


# Without VNNI (AVX2, AVX-512F/BW), onnxruntime's u8 x s8 kernel multiplies with vpmaddubsw: each pair of
# neighbouring products along K is summed into a saturating int16 before the int32 accumulation.
INT16_MAX = 2**15 - 1


def weight_container(bits: int, int8_weights: bool = False) -> torch.dtype:
    """The ONNX container of ``bits``-bit weight codes: int8 (codes centred by ``2**(b-1)``) where no pair of
    uint8 activation x int8 weight products can leave int16, else uint8; ``int8_weights`` (``export=onnx_vnni``):
    int8 at every width, for the u8 x s8 kernel's speed on VNNI CPUs (``config_without_vnni`` says what a
    session on a CPU without VNNI then needs).

    Centred b-bit codes lie in ``-2**(b-1) .. 2**(b-1) - 1``, so a pair sums to at most ``2 * 255 * 2**(b-1)``:
    within int16 up to 7 bits, 65 280 at 8 bits, which the AVX2 kernel clips (the proxies' logits moved by up to
    a tenth of the largest). uint8 weights make onnxruntime take its u8 x u8 kernel instead, which sums pairs in
    int32 on every x86 CPU: exact, but about half as fast as u8 x s8 on a VNNI CPU (docs/deploy.md). Below 8 bits
    the u8 x s8 kernel stays: exact there too, and the faster one.
    """
    return torch.int8 if int8_weights or 2 * 255 * 2 ** (bits - 1) <= INT16_MAX else torch.uint8


def _weight_codes(layer: QuantWeightLayer, int8_weights: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's weight codes and zero points in their container (``weight_container``), and its scales."""
    try:
        codes = weight_codes(layer).to(torch.int16)
    except RuntimeError as err:
        raise ModelError(f"cannot export the weight: {err}") from None
    scale, zero_point = weight_grid(layer)
    bits = layer.weight_quantizer.bits
    container = weight_container(bits, int8_weights)
    offset = 2 ** (bits - 1) if container == torch.int8 else 0
    return (
        (codes - offset).to(container),
        scale.detach().float().reshape(-1).clone(),
        (zero_point.detach().reshape(-1) - offset).to(container),
    )


class _DeployWeightLayer(nn.Module):
    def __init__(self, layer: QuantWeightLayer, transpose: bool, int8_weights: bool) -> None:
        super().__init__()
        self.input_quantizer = deploy_quantizer(layer.input_quantizer)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.quantized = bool(layer.weight_quantizer.enabled)
        if self.quantized:
            codes, scale, zero_point = _weight_codes(layer, int8_weights)
            self.register_buffer("codes", codes.t().contiguous() if transpose else codes)
            self.register_buffer("weight_scale", scale)
            self.register_buffer("weight_zero_point", zero_point)
            self.axis = 1 if transpose else 0
        else:
            weight = layer.weight.detach().clone()
            self.register_buffer("weight", weight.t().contiguous() if transpose else weight)

    def real_weight(self) -> torch.Tensor:
        if not self.quantized:
            return self.weight
        return torch.ops.mgrq.dequantize_weight(self.codes, self.weight_scale, self.weight_zero_point, self.axis)


class DeployLinear(_DeployWeightLayer):
    """``x @ DequantizeLinear(codes [in, out]) + bias``: the MatMul onnxruntime turns into an integer kernel."""

    def __init__(self, layer: QuantLinear, int8_weights: bool = False) -> None:
        super().__init__(layer, transpose=True, int8_weights=int8_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.input_quantizer(x) @ self.real_weight()
        return out if self.bias is None else out + self.bias


class DeployConv2d(_DeployWeightLayer):
    """The patch embedding: a Conv over the quantized image with dequantized integer weights."""

    def __init__(self, layer: QuantConv2d, int8_weights: bool = False) -> None:
        super().__init__(layer, transpose=False, int8_weights=int8_weights)
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x)
        return F.conv2d(x, self.real_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def deploy_quantizer(quantizer: nn.Module) -> nn.Module:
    """The exportable form of an activation quantizer: Q/DQ, the log-sqrt(2) subgraph, or Identity when off."""
    if not getattr(quantizer, "enabled", False):
        return nn.Identity()
    if type(quantizer) is UniformQuantizer:
        return DeployQuantizer(quantizer)
    if type(quantizer) is LogSqrt2Quantizer:
        return DeployLogSqrt2(quantizer)
    raise ModelError(f"{type(quantizer).__name__} has no ONNX export")


@torch.no_grad()
def deploy_model(model: nn.Module, int8_weights: bool = False) -> nn.Module:
    """A CPU copy of the quantized ``model`` in which every quantized piece is an exportable operator (weights in
    the containers of ``weight_container``).

    Raises ModelError naming the first piece that has no ONNX form (an unknown quantized layer or quantizer, an
    AdaRound that was never hardened): nothing falls back to float silently.
    """
    deploy = copy.deepcopy(model).cpu().eval()
    for name, module in list(deploy.named_modules()):
        try:
            if type(module) is QuantLinear:
                replace_module(deploy, name, DeployLinear(module, int8_weights))
            elif type(module) is QuantConv2d:
                replace_module(deploy, name, DeployConv2d(module, int8_weights))
            elif type(module) is QuantMatMul:
                module.quantizer_a = deploy_quantizer(module.quantizer_a)
                module.quantizer_b = deploy_quantizer(module.quantizer_b)
        except ModelError as err:
            raise ModelError(f"{name} cannot be exported to ONNX: {err}. Fix: {_UNSUPPORTED_FIX}") from None
    leftover = [
        (name, module)
        for name, module in deploy.named_modules()
        if isinstance(module, QuantWeightLayer | UniformQuantizer | LogSqrt2Quantizer)
        and getattr(module, "enabled", True)
    ]
    if leftover:
        name, module = leftover[0]
        raise ModelError(
            f"{type(module).__name__} at {name} has no ONNX export (it would run in float). Fix: {_UNSUPPORTED_FIX}"
        )
    return deploy


# -- export and check ------------------------------------------------------------------------------------------


def expected_nodes(model: nn.Module) -> dict[str, int]:
    """QuantizeLinear and weight DequantizeLinear nodes an export of the quantized ``model`` must hold."""
    activations = sum(1 for _, q in activation_quantizers(model) if type(q) is UniformQuantizer and q.enabled)
    weights = sum(1 for _, layer in quant_layers(model) if layer.weight_quantizer.enabled)
    return {"QuantizeLinear": activations, "DequantizeLinear": activations + weights}


def check_onnx_file(path: Path, model: nn.Module, recorded: dict[str, Any]) -> None:
    """An exported ``model.onnx`` read back: a plain file inside its run dir, with the checksum its manifest
    records, and as many quantize/dequantize nodes as the manifest says and the simulated ``model`` needs (a
    replaced graph that runs some operands in float is refused even with an updated checksum)."""
    require_deploy()
    import onnx

    redo = "re-run that job with export=onnx"
    fix = f"Fix: {redo}."
    raw = read_bytes(path, "ONNX export", redo, error=ModelError, follow_links=False)
    if hashlib.sha256(raw).hexdigest() != recorded.get("sha256"):
        raise ModelError(f"{path} does not match the checksum in its manifest. {fix}")
    try:
        counts = Counter(node.op_type for node in onnx.load_from_string(raw).graph.node)
    except Exception as err:  # onnx raises protobuf's and its own errors for a damaged file
        raise ModelError(f"{path} cannot be read as ONNX ({type(err).__name__}). {fix}") from err
    for op_type, needed in {**recorded.get("nodes", {}), **expected_nodes(model)}.items():
        if counts[op_type] != needed:
            raise ModelError(
                f"{path} has {counts[op_type]} {op_type} nodes where its export had {needed}: the graph was "
                f"replaced. {fix}"
            )


def compact(proto: Any) -> Any:
    """``proto`` without the exporter's per-node debugging metadata (stack traces, source paths), with every
    initializer as raw bytes (int8 codes would otherwise take an int32 field each)."""
    import onnx.numpy_helper

    for node in proto.graph.node:
        del node.metadata_props[:]
    for index, tensor in enumerate(proto.graph.initializer):
        if not tensor.HasField("raw_data"):
            raw = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name)
            proto.graph.initializer[index].CopyFrom(raw)
    return proto


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter's progress lines (stdout) and its graph passes' INFO logs, silenced."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(
    model: nn.Module, run_dir: str | Path, example: torch.Tensor, int8_weights: bool = False
) -> dict[str, Any]:
    """Writes ``model.onnx`` of the quantized ``model`` into ``run_dir`` (dynamic batch size).

    Args:
        model: the final quantized model (calibrated, reconstructed, AdaRound hardened); it is not modified.
        run_dir: the run directory.
        example: one preprocessed input image batch, ``[N, C, H, W]`` (its size fixes H and W).
        int8_weights: 8-bit weights in int8 too (``export=onnx_vnni``; see ``weight_container``).

    Returns:
        The manifest's ``onnx`` entry: file, opset, containers, node counts.

    Raises:
        ModelError: a quantized piece has no ONNX form, or the graph lacks a quantizer the model has.
    """
    require_deploy()
    import onnx

    deploy = deploy_model(model, int8_weights)
    example = example[:2].detach().float().cpu()
    try:
        with quiet_exporter():
            program = torch.onnx.export(
                deploy,
                (example,),
                dynamo=True,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                custom_translation_table=_translations(),
                verbose=False,
            )
    except Exception as err:  # the exporter's own errors name the operator it could not translate
        raise ModelError(f"torch.onnx.export failed: {str(err).splitlines()[0]}. Fix: {_UNSUPPORTED_FIX}") from err
    proto = compact(program.model_proto)
    path = Path(run_dir) / ONNX_FILE
    write_atomic(path, lambda tmp: onnx.save_model(proto, str(tmp)))
    counts = Counter(node.op_type for node in proto.graph.node)
    for op_type, needed in expected_nodes(model).items():
        if counts[op_type] != needed:
            raise ModelError(
                f"the exported graph has {counts[op_type]} {op_type} nodes where the model has {needed} quantized "
                f"operands: some would run in float. Fix: {_UNSUPPORTED_FIX}"
            )
    log_sqrt2 = sum(1 for _, q in quantizers(model) if type(q) is LogSqrt2Quantizer and q.enabled)
    return {
        "file": ONNX_FILE,
        "sha256": file_sha256(path),
        "opset": OPSET,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "input_shape": ["batch", *example.shape[1:]],
        "containers": {
            "activations": "uint8 codes on the b-bit grid (Clip to the grid's range before QuantizeLinear when b < 8)",
            "weights": (
                "int8 codes c - 2**(b-1), per-output-channel DequantizeLinear; exactly the b-bit grid"
                if int8_weights
                else "int8 codes c - 2**(b-1) below 8 bits, uint8 codes c at 8 bits (no int16 pair sum overflows "
                "on x86 without VNNI), per-output-channel DequantizeLinear; exactly the b-bit grid"
            ),
        },
        # what a session on an x86 CPU without VNNI needs to compute the simulation's function
        "session_config_without_vnni": config_without_vnni(path),
        "softmax": (
            f"log-sqrt(2) as an explicit float elementwise subgraph ({log_sqrt2} quantizers); attn @ v in float"
            if log_sqrt2
            else "uniform QuantizeLinear/DequantizeLinear"
        ),
        "float_ops": ", ".join([*float_modules(model), "Softmax", "residual adds"]),
        "nodes": {op_type: counts[op_type] for op_type in ("QuantizeLinear", "DequantizeLinear", "Clip")},
        "size_mb": round(path.stat().st_size / 1e6, 6),
    }


def float_modules(model: nn.Module) -> list[str]:
    """The kinds of norm and MLP activation the graph computes in float (LayerNorm or a rotation's RMSNorm; GELU
    or the ReLU of the MLP reconstruction), in order of first appearance."""
    names = []
    for module in model.modules():
        name = type(module).__name__
        if ("Norm" in name or name in ("GELU", "ReLU")) and name not in names:
            names.append(name)
    return names


# -- onnxruntime -------------------------------------------------------------------------------------------------

# The x86 instruction sets onnxruntime's integer matrix kernels (its MLAS library) dispatch to, best first, with
# the /proc/cpuinfo flags each needs, and whether its u8 x s8 kernel there sums product pairs in saturating int16
# (vpmaddubsw) rather than in int32 (vpdpbusd, AMX tiles).
X86_INT8_KERNELS = (
    ("AMX-INT8", {"amx_int8", "amx_tile"}, False),
    ("AVX-512 VNNI", {"avx512_vnni", "avx512bw", "avx512dq", "avx512vl"}, False),
    ("AVX-VNNI", {"avx_vnni", "avx2"}, False),
    ("AVX-512 without VNNI", {"avx512bw", "avx512dq", "avx512vl"}, True),
    ("AVX2 without VNNI", {"avx2", "fma"}, True),
)


def cpu_int8_kernels(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The instruction set of onnxruntime's CPU integer kernels on this machine, read from the CPU's flags as its
    MLAS library reads CPUID, and whether its u8 x s8 kernel sums product pairs in int16 there (``None`` where
    the flags cannot be read or the CPU is neither x86 nor Arm; onnxruntime's quantization docs state that Arm
    kernels do not saturate)."""
    machine = platform.machine()
    if machine.lower() in ("aarch64", "arm64"):
        return {"isa": machine, "u8s8_pairs_in_int16": False}
    if machine.lower() not in ("x86_64", "amd64"):
        return {"isa": machine or "unknown", "u8s8_pairs_in_int16": None}
    flags: set[str] = set()
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                break
    for isa, needed, pairs_in_int16 in X86_INT8_KERNELS:
        if needed <= flags:
            return {"isa": isa, "u8s8_pairs_in_int16": pairs_in_int16}
    return {"isa": "x86 without AVX2" if flags else "x86 (flags unknown)", "u8s8_pairs_in_int16": None}


def int16_overflowing_weights(path: str | Path) -> list[str]:
    """The int8 weight initializers of an ONNX file whose codes can overflow an int16 pair sum of u8 x s8 products
    (``|c| > 64``): 8-bit weights of ``export=onnx_vnni``, and of exports made before 8-bit weights moved to
    uint8 containers."""
    import onnx
    import onnx.numpy_helper

    graph = onnx.load(str(path)).graph
    weights = {node.input[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    limit = INT16_MAX // (2 * 255)
    return [
        tensor.name
        for tensor in graph.initializer
        if tensor.name in weights
        and tensor.data_type == onnx.TensorProto.INT8
        and int(abs(onnx.numpy_helper.to_array(tensor).astype("int16")).max(initial=0)) > limit
    ]


X64_QUANT_PRECISION = "session.x64quantprecision"


def config_without_vnni(path: str | Path) -> dict[str, str]:
    """The onnxruntime session config entries ``path`` needs on an x86 CPU without VNNI to compute the simulation's
    function: where int8 weights can overflow the int16 pair sums there, ``session.x64quantprecision=1``, with
    which onnxruntime moves them into uint8 (its exact u8 x u8 kernel) at load time."""
    return {X64_QUANT_PRECISION: "1"} if int16_overflowing_weights(path) else {}


def session_config(path: str | Path) -> dict[str, str]:
    """The entries of ``config_without_vnni`` where this CPU needs them, else none: with onnxruntime 1.32 the entry
    also moves the weights into uint8 on an AVX-512 VNNI CPU, giving up the speed they were kept in int8 for."""
    return {} if cpu_int8_kernels()["u8s8_pairs_in_int16"] is False else config_without_vnni(path)


def session(
    path: str | Path,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    optimized: Path | None = None,
    config: dict[str, str] | None = None,
) -> Any:
    """An onnxruntime session of ``path`` (CUDA provider on a CUDA device when onnxruntime has it), with the config
    entries ``config`` (None: the ``session_config`` the file needs on this CPU)."""
    require_deploy()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only (saving an optimised graph warns that it is hardware-specific)
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    for key, value in (session_config(path) if config is None else config).items():
        options.add_session_config_entry(key, value)
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


def integer_kernels(
    path: str | Path, threads: int | None = None, config: dict[str, str] | None = None
) -> dict[str, int]:
    """Node counts of onnxruntime's optimised graph of ``path`` (CPU): integer kernels, leftover Q/DQ, float MatMuls."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, "cpu", threads, optimized, config)
        counts = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    shown = (*INTEGER_KERNELS, "QuantizeLinear", "DequantizeLinear", "MatMul", "FusedMatMul", "Gemm", "Conv")
    return {op_type: counts[op_type] for op_type in shown if counts[op_type]}


class OnnxRuntimeModel(nn.Module):
    """An ONNX model evaluated by onnxruntime, called like a torch model: ``logits = model(images)``."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", threads: int | None = None) -> None:
        super().__init__()
        self.session = session(path, device, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.providers = self.session.get_providers()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(None, {self.input_name: images.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(logits).to(images.device)


def onnxruntime_models(
    model: nn.Module, manifest: dict[str, Any], checkpoint: Path, device: torch.device
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """``eval.runtime=onnxruntime``: the FP model (when its weights can be reloaded), the simulated model and the
    export's ``model.onnx`` under onnxruntime, to evaluate in one pass (the last one's scores are the run's), and
    results.json's ``onnx`` record (file, providers, the optimised graph's kernels, the CPU's instruction set)."""
    if "onnx" not in manifest:
        raise ModelError(f"{checkpoint} holds no ONNX export. Fix: re-run that job with export=onnx.")
    path = checkpoint / ONNX_FILE  # read_manifest allows no other name: nothing outside the run dir is loaded
    check_onnx_file(path, model, manifest["onnx"])
    models: dict[str, nn.Module] = {}
    source = ModelSettings.parse(manifest["model"])
    if source.pretrained or source.checkpoint:  # the FP weights the run started from
        models["fp"] = create_model(source).to(device).eval()
    models["simulation"] = model
    models["onnxruntime"] = runtime = OnnxRuntimeModel(path, device)
    record = {
        "file": str(path),
        "providers": runtime.providers,
        "kernels": integer_kernels(path),
        "cpu": cpu_int8_kernels(),
        "session_config": session_config(path),
    }
    return models, record
