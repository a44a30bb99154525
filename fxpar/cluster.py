"""Cluster descriptions: devices, their links per mesh axis, and presets.

All figures are SI: FLOP/s, bytes, bytes/s, seconds, watts. GPU presets take their numbers from the
public datasheet and measurement table in ``docs/hardware.md`` (dense FP32 peaks unless the preset
says otherwise; bus bandwidths as nccl-tests report them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fxpar.errors import ClusterSpecError

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    peak_flops: float  # FLOP/s for the dtype the model trains in
    memory_bytes: float
    memory_bandwidth: float  # bytes/s
    compute_efficiency: float = 0.7  # achievable fraction of peak_flops
    memory_efficiency: float = 0.8  # achievable fraction of memory_bandwidth
    kernel_overhead_s: float = 5e-6  # launch/dispatch floor per op
    board_power_w: float = 0.0
    idle_power_w: float = 0.0


@dataclass(frozen=True)
class LinkSpec:
    """A ring's bus bandwidth (bytes/s, per direction) and per-hop latency (s) along one mesh axis."""

    bandwidth: float
    latency: float


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
        if self.num_devices < 1:
            raise ClusterSpecError(f"cluster {self.name!r}: num_devices is {self.num_devices}; it must be >= 1")
        if not self.links:
            raise ClusterSpecError(f"cluster {self.name!r} has no links; give at least one LinkSpec")
        for value, what in [
            (self.device.peak_flops, "device.peak_flops"),
            (self.device.memory_bytes, "device.memory_bytes"),
            (self.device.memory_bandwidth, "device.memory_bandwidth"),
            *[(link.bandwidth, f"links[{i}].bandwidth") for i, link in enumerate(self.links)],
        ]:
            if not value > 0:
                raise ClusterSpecError(f"cluster {self.name!r}: {what} is {value}; it must be positive")

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
        return json.dumps(asdict(self), indent=2)

    @staticmethod
    def from_json(text: str) -> Cluster:
        try:
            data = json.loads(text)
            return Cluster(
                name=data["name"],
                device=DeviceSpec(**data["device"]),
                num_devices=int(data["num_devices"]),
                links=tuple(LinkSpec(**link) for link in data["links"]),
                source=data.get("source", ""),
                extra=data.get("extra", {}),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ClusterSpecError(f"not a cluster description: {exc}; see Cluster.to_json() for the format") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @staticmethod
    def load(path: str | Path) -> Cluster:
        return Cluster.from_json(Path(path).read_text())


def _gpu(name: str, fp32_tflops: float, mem_gb: float, hbm_gbs: float, board_w: float, idle_w: float) -> DeviceSpec:
    return DeviceSpec(
        name=name,
        peak_flops=fp32_tflops * 1e12,
        memory_bytes=mem_gb * GB,
        memory_bandwidth=hbm_gbs * GB,
        board_power_w=board_w,
        idle_power_w=idle_w,
    )


P100 = _gpu("P100-SXM2-16GB", 10.6, 16, 732, 300, 35)
V100 = _gpu("V100-SXM2-32GB", 15.7, 32, 900, 300, 48)
V100_PCIE = _gpu("V100-PCIe-32GB", 14.0, 32, 900, 250, 40)
A100 = _gpu("A100-SXM4-80GB", 19.5, 80, 2039, 400, 55)
H100 = _gpu("H100-SXM5-80GB", 66.9, 80, 3350, 700, 100)
H200 = _gpu("H200-141GB", 66.9, 141, 4800, 700, 78)

# A CPU process of a small machine running gloo over loopback: rough defaults, to be replaced by
# figures measured on the machine at hand (a Cluster loads from JSON).
CPU = DeviceSpec(
    name="cpu-process",
    peak_flops=50e9,
    memory_bytes=8 * GiB,
    memory_bandwidth=10 * GB,
    kernel_overhead_s=10e-6,
)


def _presets() -> dict[str, Cluster]:
    us = 1e-6
    return {
        "cpu-local": Cluster("cpu-local", CPU, 2, (LinkSpec(2 * GB, 50 * us),), source="rough loopback gloo defaults"),
        "p100-nvlink-8": Cluster("p100-nvlink-8", P100, 8, (LinkSpec(80 * GB * 0.75, 3 * us),), source="docs/hardware.md: NVLink1, DGX-1"),
        "v100-pcie-4": Cluster("v100-pcie-4", V100_PCIE, 4, (LinkSpec(16 * GB * 0.75, 10 * us),), source="docs/hardware.md: PCIe Gen3 x16"),
        "v100-nvlink-8": Cluster("v100-nvlink-8", V100, 8, (LinkSpec(150 * GB * 0.75, 3 * us),), source="docs/hardware.md: NVLink2"),
        "a100-nvlink-8": Cluster("a100-nvlink-8", A100, 8, (LinkSpec(230 * GB, 3 * us),), source="docs/hardware.md: nccl-tests busbw 8xA100"),
        "h200-nvlink-8": Cluster("h200-nvlink-8", H200, 8, (LinkSpec(370 * GB, 3 * us),), source="docs/hardware.md: NVLink4 busbw"),
        "h100-2node-16": Cluster(
            "h100-2node-16",
            H100,
            16,
            (LinkSpec(46 * GB, 10 * us), LinkSpec(370 * GB, 3 * us)),
            source="docs/hardware.md: NDR InfiniBand between nodes, NVLink4 busbw within",
        ),
    }


PRESETS = _presets()


def preset(name: str, *, num_devices: int | None = None) -> Cluster:
    if name not in PRESETS:
        raise ClusterSpecError(f"unknown cluster preset {name!r}; known presets: {sorted(PRESETS)}")
    cluster = PRESETS[name]
    return cluster if num_devices is None else replace(cluster, num_devices=num_devices)
