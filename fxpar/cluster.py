"""Cluster descriptions: devices, their links per mesh axis, and presets.

All figures are SI: FLOP/s, bytes, bytes/s, seconds, watts. GPU presets take their numbers from
public datasheets and published measurements; every preset names its source in ``source`` and
``docs/hardware.md`` / ``docs/cost-model.md`` give the derivation (``peak_flops`` is the dense FP32
peak; ``peak_flops_by_dtype`` holds the dense (non-sparse) TF32, BF16, FP16 and FP64 figures; bus
bandwidths as nccl-tests report them). ``python -m fxpar calibrate`` measures
the machine at hand and writes a ``Cluster`` as JSON; ``Cluster.load(path)`` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path

import torch

from fxpar.errors import ClusterSpecError

GB = 1e9
GiB = 2**30

# The op classes a device's efficiencies can be given for (fxpar.cost.op_class assigns them).
OP_CLASSES = ("matmul", "convolution", "elementwise", "reduction")
# The collectives a link's figures can be given for (fxpar.cost.collective_time prices them).
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")
# The dtypes a device's peak FLOP/s can be given for besides float32, whose figure is peak_flops.
# Names are torch's dtype names (str(torch.bfloat16) without "torch."); "tf32" is float32 run on
# TF32 tensor cores, which fxpar.cost.tf32_classes says torch's settings allow.
PEAK_DTYPES = ("float64", "tf32", "bfloat16", "float16")
# How a device's convolutions can be priced (DeviceSpec.convolution_algorithms).
CONVOLUTION_ALGORITHMS = ("direct", "cudnn")


def dtype_name(dtype: torch.dtype | str) -> str:
    """The name a dtype's peak is keyed by: ``"bfloat16"`` for ``torch.bfloat16``; a string
    (``"tf32"``, ``"float32"`` or one of ``PEAK_DTYPES``) names itself."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if dtype == "float32" or dtype in PEAK_DTYPES:
        return dtype
    raise ClusterSpecError(
        f"no peak FLOP/s can be named {dtype!r}; give a torch.dtype or one of {['float32', *PEAK_DTYPES]}"
    )


@dataclass(frozen=True)
class DeviceSpec:
    """One device. The compute time of an op of class ``c`` computing in dtype ``d`` is the roofline
    ``max(flops / (peak_flops_for(d) * compute_eff(c)), bytes / (memory_bandwidth * memory_eff(c)))``
    plus ``kernel_overhead_s``; ``compute_efficiency_by_class`` / ``memory_efficiency_by_class``
    override the device-wide fractions for single classes (a calibrated profile sets them).
    ``peak_flops`` is the float32 figure (and the fallback for any dtype ``peak_flops_by_dtype``
    has no entry for); ``peak_flops_by_dtype`` holds the others, keyed by ``PEAK_DTYPES`` names."""

    name: str
    peak_flops: float  # FLOP/s in float32 (no TF32), and for every dtype peak_flops_by_dtype lacks
    memory_bytes: float
    memory_bandwidth: float  # bytes/s
    compute_efficiency: float = 0.7  # achievable fraction of peak_flops
    memory_efficiency: float = 0.8  # achievable fraction of memory_bandwidth
    kernel_overhead_s: float = 5e-6  # launch/dispatch floor per op
    board_power_w: float = 0.0
    idle_power_w: float = 0.0
    compute_efficiency_by_class: dict[str, float] = field(default_factory=dict)
    memory_efficiency_by_class: dict[str, float] = field(default_factory=dict)
    # The fraction of an asynchronous collective's time that can run under independent compute:
    # 1 where communication has its own engines (GPUs with NCCL), lower where the two share cores.
    overlap_efficiency: float = 1.0
    # Peak FLOP/s per compute dtype other than float32 ({"bfloat16": 989.4e12, "tf32": ...}).
    peak_flops_by_dtype: dict[str, float] = field(default_factory=dict)
    # How convolutions are priced (CONVOLUTION_ALGORITHMS; fxpar.cost, docs/cost-model.md): "direct",
    # the FLOPs of a direct convolution at the convolution efficiency (CPUs, and calibrated profiles,
    # whose efficiency is measured against those FLOPs); "cudnn", the fastest of the algorithms cuDNN
    # offers for the shape (implicit GEMM, fused and non-fused Winograd), each priced on its own.
    convolution_algorithms: str = "direct"
    # Seconds of single matmul and convolution kernels timed on this device by
    # ``fxpar.calibrate.measure_kernels``, keyed by ``fxpar.cost.kernel_key`` (the op, its per-device
    # input shapes, dtype and other arguments); the cost model prices a kernel found here by its
    # measured time and any other by the roofline.
    measured_kernel_s: dict[str, float] = field(default_factory=dict)
    # One optimizer update of a parameter as torch.optim runs it on the runtime's DTensor
    # parameters, timed by ``fxpar.calibrate`` per optimizer (keys of ``OPTIMIZERS``): seconds per
    # parameter tensor (the update's fixed cost: dispatching its ops) and seconds per byte of the
    # device's piece. An optimizer without an entry is priced by the roofline of its kernels.
    optimizer_param_s: dict[str, float] = field(default_factory=dict)
    optimizer_byte_s: dict[str, float] = field(default_factory=dict)
    # Seconds per trainable parameter and step that fxpar's runtime spends outside the compiled
    # graph: carrying the parameter into the step and handing its gradient to autograd (a DTensor
    # per gradient, autograd's accumulation into ``.grad``, and clearing it for the next step), timed
    # by ``fxpar.calibrate`` through the module's own autograd function; 0 where not measured.
    gradient_handoff_s: float = 0.0

    def peak_flops_for(self, dtype: torch.dtype | str) -> float:
        """Peak FLOP/s of a kernel computing in ``dtype`` (a torch dtype, or a name: ``"tf32"``,
        ``"float32"``, one of ``PEAK_DTYPES``): its ``peak_flops_by_dtype`` entry, else ``peak_flops``."""
        return self.peak_flops_by_dtype.get(dtype_name(dtype), self.peak_flops)

    def efficiencies(self, op_class: str) -> tuple[float, float]:
        """(fraction of peak FLOP/s, fraction of memory bandwidth) an op of ``op_class`` reaches."""
        return (
            self.compute_efficiency_by_class.get(op_class, self.compute_efficiency),
            self.memory_efficiency_by_class.get(op_class, self.memory_efficiency),
        )


@dataclass(frozen=True)
class LinkSpec:
    """A ring's bus bandwidth (bytes/s, per direction) and per-hop latency (s) along one mesh axis.

    ``bandwidth_by_collective`` / ``latency_by_collective`` override them for single collectives:
    some backends (gloo on CPU) reach very different bus bandwidths for an all-gather and an
    all-reduce over the same wires, and a calibrated profile records each."""

    bandwidth: float
    latency: float
    bandwidth_by_collective: dict[str, float] = field(default_factory=dict)
    latency_by_collective: dict[str, float] = field(default_factory=dict)
    # Seconds a blocking collective inside a step costs beyond its alpha-beta time: the ranks reach
    # it at different moments, and the first waits for the last (calibrate measures it; 0 in presets).
    in_step_latency: float = 0.0
    # The bus bandwidth a blocking collective inside a step reaches, as a fraction of ``bandwidth``
    # (and of each ``bandwidth_by_collective``) measured after a barrier: the bytes of a collective
    # between computations move slower (calibrate measures it at two sizes; 1 in presets).
    in_step_bandwidth_ratio: float = 1.0

    def figures(self, kind: str) -> tuple[float, float]:
        """(bus bandwidth, per-hop latency) for collective ``kind``."""
        return self.bandwidth_by_collective.get(kind, self.bandwidth), self.latency_by_collective.get(kind, self.latency)


# Efficiencies are fractions of a datasheet or measured peak. A memory efficiency may exceed 1 a
# little: calibrate measures memory_bandwidth on its largest stream, and smaller ones run from cache.
COMPUTE_EFFICIENCY_MAX = 1.0
MEMORY_EFFICIENCY_MAX = 10.0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive(cluster: str, pairs: list[tuple[float, str]], *, allow_zero: bool = False) -> None:
    for value, what in pairs:
        ok = _is_number(value) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
        if not ok:
            bound = ">= 0" if allow_zero else "positive"
            raise ClusterSpecError(f"cluster {cluster!r}: {what} is {value!r}; it must be {bound} (and finite)")


def _check_fraction(cluster: str, pairs: list[tuple[float, str]], upper: float, meaning: str) -> None:
    for value, what in pairs:
        if not (_is_number(value) and 0 < value <= upper):
            raise ClusterSpecError(
                f"cluster {cluster!r}: {what} is {value!r}; it must be in (0, {upper:g}], the achievable fraction "
                f"of {meaning} (e.g. 0.7); measure it with `python -m fxpar calibrate`"
            )


def _check_dtype_peaks(cluster: str, peaks) -> None:
    what = "device.peak_flops_by_dtype"
    if not isinstance(peaks, dict):
        raise ClusterSpecError(
            f"cluster {cluster!r}: {what} is {describe_value(peaks)}; give a dict of FLOP/s by dtype name, "
            'e.g. {"bfloat16": 989.4e12}'
        )
    for key in peaks:
        if key == "float32":
            raise ClusterSpecError(
                f"cluster {cluster!r}: {what} has the key 'float32'; the float32 figure is device.peak_flops: "
                f"set that instead and keep {what} for {list(PEAK_DTYPES)}"
            )
        if not isinstance(key, str) or key not in PEAK_DTYPES:
            hint = f" (write {dtype_name(key)!r})" if isinstance(key, torch.dtype) else ""
            raise ClusterSpecError(
                f"cluster {cluster!r}: {what} has the key {key!r}{hint}; known dtype names: {list(PEAK_DTYPES)} "
                "(float32 is device.peak_flops)"
            )
    _check_positive(cluster, [(v, f"{what}[{k!r}]") for k, v in peaks.items()])


# The optimizers fxpar prices (fxpar.cost.OPTIMIZER_KERNELS; the ``optimizer`` of fxpar.plan).
OPTIMIZERS = ("sgd", "sgd-momentum", "adam", "adamw")


def _check_keys(cluster: str, what: str, keys, known: tuple[str, ...]) -> None:
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise ClusterSpecError(f"cluster {cluster!r}: {what} has unknown keys {unknown}; known: {list(known)}")


@dataclass(frozen=True)
class Cluster:
    """``num_devices`` identical devices. ``links[i]`` serves mesh axis ``i`` (outermost first, e.g.
    nodes then GPUs per node); a single link serves every axis."""

    name: str
    device: DeviceSpec
    num_devices: int
    links: tuple[LinkSpec, ...]
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ClusterSpecError(f"a cluster's name is {self.name!r}; give a string, e.g. 'my-cluster'")
        if not (isinstance(self.num_devices, int) and not isinstance(self.num_devices, bool) and self.num_devices >= 1):
            raise ClusterSpecError(
                f"cluster {self.name!r}: num_devices is {self.num_devices!r}; it must be a whole number >= 1, e.g. 8"
            )
        if not isinstance(self.device, DeviceSpec):
            raise ClusterSpecError(f"cluster {self.name!r}: device is {self.device!r}; give a fxpar.DeviceSpec")
        if not self.links:
            raise ClusterSpecError(f"cluster {self.name!r} has no links; give at least one LinkSpec")
        for i, link in enumerate(self.links):
            if not isinstance(link, LinkSpec):
                raise ClusterSpecError(f"cluster {self.name!r}: links[{i}] is {link!r}; give a fxpar.LinkSpec")
        d = self.device
        _check_fraction(self.name, [
            (d.compute_efficiency, "device.compute_efficiency"),
            *[(v, f"device.compute_efficiency_by_class[{k!r}]") for k, v in d.compute_efficiency_by_class.items()],
        ], COMPUTE_EFFICIENCY_MAX, "peak_flops")
        _check_fraction(self.name, [
            (d.memory_efficiency, "device.memory_efficiency"),
            *[(v, f"device.memory_efficiency_by_class[{k!r}]") for k, v in d.memory_efficiency_by_class.items()],
        ], MEMORY_EFFICIENCY_MAX, "memory_bandwidth")
        _check_positive(self.name, [
            (d.peak_flops, "device.peak_flops"),
            (d.memory_bytes, "device.memory_bytes"),
            (d.memory_bandwidth, "device.memory_bandwidth"),
            *[(link.bandwidth, f"links[{i}].bandwidth") for i, link in enumerate(self.links)],
            *[(v, f"links[{i}].bandwidth_by_collective[{k!r}]") for i, link in enumerate(self.links)
              for k, v in link.bandwidth_by_collective.items()],
        ])
        _check_positive(self.name, [
            (d.kernel_overhead_s, "device.kernel_overhead_s"),
            (d.gradient_handoff_s, "device.gradient_handoff_s"),
            (d.board_power_w, "device.board_power_w"),
            (d.idle_power_w, "device.idle_power_w"),
            *[(link.latency, f"links[{i}].latency") for i, link in enumerate(self.links)],
            *[(link.in_step_latency, f"links[{i}].in_step_latency") for i, link in enumerate(self.links)],
            *[(v, f"links[{i}].latency_by_collective[{k!r}]") for i, link in enumerate(self.links)
              for k, v in link.latency_by_collective.items()],
        ], allow_zero=True)
        for i, link in enumerate(self.links):
            if not (_is_number(link.in_step_bandwidth_ratio) and 0.0 < link.in_step_bandwidth_ratio <= 1.0):
                raise ClusterSpecError(
                    f"cluster {self.name!r}: links[{i}].in_step_bandwidth_ratio is {link.in_step_bandwidth_ratio}; "
                    "it must be in (0, 1] (the fraction of the link's bandwidth a collective inside a step reaches)"
                )
        if not (_is_number(d.overlap_efficiency) and 0.0 <= d.overlap_efficiency <= 1.0):
            raise ClusterSpecError(
                f"cluster {self.name!r}: device.overlap_efficiency is {d.overlap_efficiency}; it must be in [0, 1]"
            )
        _check_dtype_peaks(self.name, d.peak_flops_by_dtype)
        _check_positive(self.name, [(v, f"device.measured_kernel_s[{k!r}]") for k, v in d.measured_kernel_s.items()])
        for what, figures in (("optimizer_param_s", d.optimizer_param_s), ("optimizer_byte_s", d.optimizer_byte_s)):
            _check_keys(self.name, f"device.{what}", figures, OPTIMIZERS)
            _check_positive(self.name, [(v, f"device.{what}[{k!r}]") for k, v in figures.items()], allow_zero=True)
        if set(d.optimizer_param_s) != set(d.optimizer_byte_s):
            raise ClusterSpecError(
                f"cluster {self.name!r}: device.optimizer_param_s has {sorted(d.optimizer_param_s)} and "
                f"device.optimizer_byte_s {sorted(d.optimizer_byte_s)}; give both figures for each optimizer"
            )
        if d.convolution_algorithms not in CONVOLUTION_ALGORITHMS:
            raise ClusterSpecError(
                f"cluster {self.name!r}: device.convolution_algorithms is {d.convolution_algorithms!r}; it must be one "
                f"of {list(CONVOLUTION_ALGORITHMS)} ('direct': direct-convolution FLOPs, for CPUs and calibrated "
                "profiles; 'cudnn': the fastest algorithm cuDNN offers for the shape, for GPUs)"
            )
        _check_keys(self.name, "device.compute_efficiency_by_class", d.compute_efficiency_by_class, OP_CLASSES)
        _check_keys(self.name, "device.memory_efficiency_by_class", d.memory_efficiency_by_class, OP_CLASSES)
        for i, link in enumerate(self.links):
            _check_keys(self.name, f"links[{i}].bandwidth_by_collective", link.bandwidth_by_collective, COLLECTIVES)
            _check_keys(self.name, f"links[{i}].latency_by_collective", link.latency_by_collective, COLLECTIVES)

    def link(self, axis: int, mesh_ndim: int) -> LinkSpec:
        if len(self.links) == 1:
            return self.links[0]
        if len(self.links) != mesh_ndim:
            raise ClusterSpecError(
                f"cluster {self.name!r} describes {len(self.links)} link levels but the mesh has "
                f"{mesh_ndim} axes; give one LinkSpec per mesh axis or a single one for all"
            )
        return self.links[axis]

    def with_memory(self, memory_bytes: float) -> Cluster:
        return replace(self, device=replace(self.device, memory_bytes=memory_bytes))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str, *, origin: str | None = None) -> Cluster:
        """The cluster ``text`` describes (the format of ``to_json``), validated field by field.
        ``origin`` says where the text comes from in error messages (``"cluster file 'p.json'"``)."""
        where = origin or "cluster JSON"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClusterSpecError(
                f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}; "
                f"{_FORMAT_HINT}"
            ) from None
        except RecursionError:
            raise ClusterSpecError(
                f"{where} nests too deeply to be a cluster description (a cluster is an object with a "
                f"device and a list of links, three levels deep); {_FORMAT_HINT}"
            ) from None
        kwargs = _fields_from_json(Cluster, data, where, "")
        try:
            return Cluster(**kwargs)
        except ClusterSpecError as exc:
            raise ClusterSpecError(f"{where}: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @staticmethod
    def load(path: str | Path) -> Cluster:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ClusterSpecError(
                f"cannot read cluster profile {str(path)!r}: {exc.strerror}; write one with "
                "`python -m fxpar calibrate --out PATH` or Cluster.save(PATH)"
            ) from exc
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ClusterSpecError(
                f"cluster file {str(path)!r} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}): "
                f"it is not a cluster description; {_FORMAT_HINT}"
            ) from None
        return Cluster.from_json(text, origin=f"cluster file {str(path)!r}")


_FORMAT_HINT = (
    "write the file with `python -m fxpar calibrate --out PATH` or Cluster.save(PATH), or copy the format "
    "of fxpar.preset('cpu-local').to_json()"
)


def describe_value(value) -> str:
    """``value``'s repr (cut to 60 characters) and its type, for error messages."""
    text = repr(value)
    return (text if len(text) <= 60 else text[:57] + "...") + f" (a {type(value).__name__})"


_DICT_EXAMPLES = {"peak_flops_by_dtype": '{"bfloat16": 989.4e12}', "bandwidth_by_collective": '{"all_gather": 2e9}',
                  "latency_by_collective": '{"all_gather": 5e-5}'}


def _fields_from_json(cls, data, where: str, path: str) -> dict:
    """The keyword arguments of ``cls`` that the JSON object ``data`` gives, each checked against
    the field's annotated type; nested specs are built. Ranges are checked by ``Cluster``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    at = path or "the top level"
    if not isinstance(data, dict):
        raise ClusterSpecError(
            f"{where}: {at} is {describe_value(data)}; it must be an object with the keys {sorted(fields)}; "
            f"{_FORMAT_HINT}"
        )
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ClusterSpecError(
            f"{where}: {at} has unknown keys {unknown}; known keys: {sorted(fields)} (check the spelling)"
        )
    required = [n for n, f in fields.items() if f.default is MISSING and f.default_factory is MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ClusterSpecError(f"{where}: {at} lacks the required keys {missing}; {_FORMAT_HINT}")
    out = {}
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        kind = fields[name].type

        def bad(expected: str, key=key, value=value):
            return ClusterSpecError(f"{where}: {key} is {describe_value(value)}; it must be {expected}")

        if kind == "str":
            if not isinstance(value, str):
                raise bad("a string")
        elif kind == "float":
            if not _is_number(value):
                raise bad("a number")
        elif kind == "int":
            if not (_is_number(value) and float(value).is_integer()):
                raise bad("a whole number, e.g. 8")
            value = int(value)
        elif kind == "dict[str, float]":
            if not isinstance(value, dict):
                raise bad("an object of numbers, e.g. " + _DICT_EXAMPLES.get(name, '{"matmul": 0.8}'))
            for k, v in value.items():
                if not _is_number(v):
                    raise ClusterSpecError(f"{where}: {key}[{k!r}] is {describe_value(v)}; it must be a number")
        elif kind == "dict":
            if not isinstance(value, dict):
                raise bad("an object")
        elif kind == "DeviceSpec":
            value = DeviceSpec(**_fields_from_json(DeviceSpec, value, where, key))
        elif kind == "tuple[LinkSpec, ...]":
            if not isinstance(value, list) or not value:
                raise bad("a non-empty list of links, one per mesh axis or one for all")
            value = tuple(LinkSpec(**_fields_from_json(LinkSpec, v, where, f"{key}[{i}]")) for i, v in enumerate(value))
        else:
            raise AssertionError(f"no JSON check for field {cls.__name__}.{name} of type {kind}")
        out[name] = value
    return out


def _gpu(
    name: str, fp32_tflops: float, mem_gb: float, hbm_gbs: float, board_w: float, idle_w: float, **dtype_tflops: float
) -> DeviceSpec:
    return DeviceSpec(
        name=name,
        peak_flops=fp32_tflops * 1e12,
        memory_bytes=mem_gb * GB,
        memory_bandwidth=hbm_gbs * GB,
        board_power_w=board_w,
        idle_power_w=idle_w,
        peak_flops_by_dtype={k: v * 1e12 for k, v in dtype_tflops.items()},
        convolution_algorithms="cudnn",  # PyTorch and TensorFlow run GPU convolutions through cuDNN
    )


# Datasheet figures (dense FP32, capacity, HBM bandwidth, max board power, and the dense (non-sparse)
# peaks of the other dtypes, tensor cores where the GPU has them for that dtype); idle power is a
# point in the range public nvidia-smi readings report. Sources (URLs) per device in docs/hardware.md.
# A dtype a GPU has no figure for (BF16 and TF32 before Ampere) falls back to peak_flops.
P100 = _gpu("P100-SXM2-16GB", 10.6, 16, 732, 300, 35,  # NVIDIA Tesla P100 datasheet (SXM2); FP16 without tensor cores
            float64=5.3, float16=21.2)
V100 = _gpu("V100-SXM2-32GB", 15.7, 32, 900, 300, 48,  # NVIDIA Tesla V100 datasheet (SXM2); FP16 tensor cores
            float64=7.8, float16=125.0)
V100_PCIE = _gpu("V100-PCIe-32GB", 14.0, 32, 900, 250, 40,  # NVIDIA Tesla V100 datasheet (PCIe)
                 float64=7.0, float16=112.0)
A100 = _gpu("A100-SXM4-80GB", 19.5, 80, 2039, 400, 55,  # NVIDIA A100 datasheet (80 GB SXM); FP64 tensor cores
            float64=19.5, tf32=156.0, bfloat16=312.0, float16=312.0)
H100 = _gpu("H100-SXM5-80GB", 66.9, 80, 3350, 700, 100,  # NVIDIA H100 datasheet (SXM) / Hopper whitepaper
            float64=66.9, tf32=494.7, bfloat16=989.4, float16=989.4)
H200 = _gpu("H200-141GB", 66.9, 141, 4800, 700, 78,  # NVIDIA H200 datasheet (SXM): H100's compute
            float64=66.9, tf32=494.7, bfloat16=989.4, float16=989.4)

# A CPU process of a small machine running gloo over loopback: rough defaults, to be replaced by
# figures measured on the machine at hand (`python -m fxpar calibrate`). No per-dtype peaks: every
# dtype is priced at peak_flops until a calibrated profile measures bfloat16 and float16 matmuls.
CPU = DeviceSpec(
    name="cpu-process",
    peak_flops=50e9,
    memory_bytes=8 * GiB,
    memory_bandwidth=10 * GB,
    kernel_overhead_s=10e-6,
)

# Links (bus bandwidth per direction, per-hop latency). 0.75 x a per-direction peak is an assumed
# achievable fraction where no measurement is published; see docs/hardware.md.
_US = 1e-6
NVLINK1 = LinkSpec(80 * GB * 0.75, 3 * _US)  # P100: 4 links x 20 GB/s per direction (DGX-1)
NVLINK2 = LinkSpec(150 * GB * 0.75, 3 * _US)  # V100: 6 links x 25 GB/s per direction
NVLINK3 = LinkSpec(230 * GB, 3 * _US)  # nccl-tests busbw, 8 x A100 over NVSwitch (peak 300 GB/s)
NVLINK4 = LinkSpec(370 * GB, 3 * _US)  # nccl-tests ring busbw, 8 x H100 over NVSwitch (peak 450 GB/s)
PCIE3 = LinkSpec(16 * GB * 0.75, 10 * _US)  # PCIe Gen3 x16: 16 GB/s per direction
PCIE4 = LinkSpec(32 * GB * 0.75, 10 * _US)  # PCIe Gen4 x16: 32 GB/s per direction
IB_HDR = LinkSpec(23 * GB, 10 * _US)  # HDR InfiniBand 200 Gb/s = 25 GB/s raw per NIC, x 0.92 (NDR's measured fraction)
IB_NDR = LinkSpec(46 * GB, 10 * _US)  # NDR InfiniBand 400 Gb/s = 50 GB/s raw; 46-48 GB/s measured


def _presets() -> dict[str, Cluster]:
    return {
        "cpu-local": Cluster("cpu-local", CPU, 2, (LinkSpec(2 * GB, 50 * _US),), source="rough loopback gloo defaults"),
        "p100-nvlink-8": Cluster("p100-nvlink-8", P100, 8, (NVLINK1,), source="docs/hardware.md: NVLink1, DGX-1"),
        "v100-pcie-4": Cluster("v100-pcie-4", V100_PCIE, 4, (PCIE3,), source="docs/hardware.md: PCIe Gen3 x16"),
        "v100-nvlink-8": Cluster("v100-nvlink-8", V100, 8, (NVLINK2,), source="docs/hardware.md: NVLink2"),
        "a100-pcie-8": Cluster("a100-pcie-8", A100, 8, (PCIE4,), source="docs/cost-model.md: PCIe Gen4 x16, no NVLink"),
        "a100-nvlink-8": Cluster("a100-nvlink-8", A100, 8, (NVLINK3,), source="docs/hardware.md: nccl-tests busbw 8xA100"),
        "a100-2node-16": Cluster(
            "a100-2node-16", A100, 16, (IB_HDR, NVLINK3), extra={"devices_per_node": 8},
            source="docs/cost-model.md: HDR InfiniBand between nodes, NVLink3 busbw within",
        ),
        "h100-nvlink-8": Cluster("h100-nvlink-8", H100, 8, (NVLINK4,), source="docs/hardware.md: NVLink4 busbw 8xH100"),
        "h200-nvlink-8": Cluster("h200-nvlink-8", H200, 8, (NVLINK4,), source="docs/hardware.md: NVLink4 busbw"),
        "h100-2node-16": Cluster(
            "h100-2node-16", H100, 16, (IB_NDR, NVLINK4), extra={"devices_per_node": 8},
            source="docs/hardware.md: NDR InfiniBand between nodes, NVLink4 busbw within",
        ),
    }


PRESETS = _presets()

# One NVLink1 link, 20 GB/s per direction (a P100 has four; NVIDIA Tesla P100 datasheet).
NVLINK1_ONE_LINK = LinkSpec(20 * GB * 0.75, 3 * _US)
# A DGX-1's hybrid cube mesh: GPUs 0-3 and 4-7 each fully connected, and GPU i to GPU i + 4.
DGX1_NVLINK_PAIRS = frozenset(
    {frozenset((a, b)) for quad in ((0, 1, 2, 3), (4, 5, 6, 7)) for a in quad for b in quad if a < b}
    | {frozenset((i, i + 4)) for i in range(4)}
)


def dgx1_tf2017(num_devices: int) -> Cluster:
    """The first ``num_devices`` P100s of a DGX-1 as TensorFlow 1.x with NCCL 1.x drove them in the
    published 2017 benchmarks (docs/study.md): replicated variables, one ``nccl.all_sum`` per
    gradient. NCCL 1.x runs one ring over the devices in their order, in a kernel on a single SM, so
    each hop of the ring uses one link: an NVLink (20 GB/s per direction) where the cube mesh joins
    the two GPUs, PCIe Gen3 through the host otherwise (GPU 3 to 4 and 7 to 0 in the 8-GPU ring); the
    slowest hop sets the ring's bus bandwidth. TensorFlow's NCCL stream waits for everything the
    compute stream has queued when a collective is launched, and the graph's executor queues the
    whole backward pass long before its kernels finish, so the gradient all-reduces run after the
    backward pass: ``overlap_efficiency`` 0. Sources in docs/hardware.md."""
    if not (isinstance(num_devices, int) and not isinstance(num_devices, bool) and 1 <= num_devices <= 8):
        raise ClusterSpecError(f"a DGX-1 has 1 to 8 GPUs; num_devices is {num_devices!r}, give one of 1..8")
    ring = [(i, (i + 1) % num_devices) for i in range(num_devices)] if num_devices > 1 else []
    hops = [NVLINK1_ONE_LINK if frozenset(h) in DGX1_NVLINK_PAIRS else PCIE3 for h in ring]
    link = min(hops, key=lambda h: h.bandwidth) if hops else NVLINK1_ONE_LINK
    link = LinkSpec(link.bandwidth, max(h.latency for h in hops) if hops else link.latency)
    return Cluster(
        f"dgx1-tf2017-{num_devices}", replace(P100, overlap_efficiency=0.0), num_devices, (link,),
        source="docs/hardware.md: DGX-1 under TensorFlow 1.x / NCCL 1.x (one ring in device order, after the backward)",
    )


def preset(name: str, *, num_devices: int | None = None) -> Cluster:
    if name not in PRESETS:
        raise ClusterSpecError(f"unknown cluster preset {name!r}; known presets: {sorted(PRESETS)}")
    cluster = PRESETS[name]
    return cluster if num_devices is None else replace(cluster, num_devices=num_devices)
