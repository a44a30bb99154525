"""Energy of a training step: busy power while a device computes or communicates, idle otherwise.

For a plan on ``k`` devices with predicted compute time ``C``, exposed communication time ``M``
(``Plan.comm_s``: what compute does not hide; hidden communication runs while the device is busy
computing) and step time ``T`` (``T = C + M`` as predicted; a measured ``T`` may be longer), one
step costs

    E = k * (C * P_busy + M * P_comm + max(0, T - C - M) * P_idle)  [+ (N - k) * T * P_idle]

joules, where ``P_busy`` defaults to the device's board power (``DeviceSpec.board_power_w``),
``P_comm`` to ``P_busy`` and ``P_idle`` to ``DeviceSpec.idle_power_w``. The bracketed term counts the
``N - k`` devices of the cluster that the plan leaves unused; it is off by default, since devices a
job does not take are free for other jobs (or can be powered down), so they are not its energy.
Every figure can be overridden, e.g. with a measured average power under load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fxpar.cluster import DeviceSpec
from fxpar.errors import ClusterSpecError
from fxpar.plan import Plan


@dataclass(frozen=True)
class PowerModel:
    """Watts drawn by one device: ``busy_w`` while computing, ``comm_w`` while communicating
    (``busy_w`` when None), ``idle_w`` otherwise. ``count_unused`` charges the cluster's unused
    devices their idle power for the length of the step."""

    busy_w: float
    idle_w: float
    comm_w: float | None = None
    count_unused: bool = False

    def __post_init__(self) -> None:
        for value, what in [(self.busy_w, "busy_w"), (self.idle_w, "idle_w"), (self.comm_power_w, "comm_w")]:
            if not (math.isfinite(value) and value >= 0):
                raise ClusterSpecError(f"power model: {what} is {value}; it must be a finite number of watts >= 0")
        if not self.busy_w > 0:
            raise ClusterSpecError(
                "power model: busy_w is 0, so every configuration would cost no energy; give the device's "
                "power under load (DeviceSpec.board_power_w, or busy_w=... / --busy-w)"
            )
        if self.idle_w > self.busy_w:
            raise ClusterSpecError(
                f"power model: idle_w ({self.idle_w} W) exceeds busy_w ({self.busy_w} W); a device draws "
                "less idle than under load, so check the two figures"
            )

    @property
    def comm_power_w(self) -> float:
        return self.busy_w if self.comm_w is None else self.comm_w

    @staticmethod
    def of(
        device: DeviceSpec,
        *,
        busy_w: float | None = None,
        idle_w: float | None = None,
        comm_w: float | None = None,
        count_unused: bool = False,
    ) -> PowerModel:
        """The device's own board and idle power, with any figure overridden."""
        busy = device.board_power_w if busy_w is None else busy_w
        if not busy > 0:
            raise ClusterSpecError(
                f"device {device.name!r} has no board power figure (board_power_w={device.board_power_w}); "
                "give busy_w=... (and idle_w=...) in watts, or a DeviceSpec with board_power_w and idle_power_w"
            )
        idle = device.idle_power_w if idle_w is None else idle_w
        return PowerModel(busy_w=busy, idle_w=idle, comm_w=comm_w, count_unused=count_unused)


@dataclass(frozen=True)
class StepEnergy:
    num_devices: int  # devices the plan runs on
    step_s: float
    compute_s: float
    comm_s: float
    joules_per_step: float
    global_batch: int

    @property
    def joules_per_sample(self) -> float:
        return self.joules_per_step / self.global_batch

    @property
    def samples_per_s(self) -> float:
        return self.global_batch / self.step_s

    @property
    def average_power_w(self) -> float:
        return self.joules_per_step / self.step_s


def step_energy(
    plan: Plan,
    global_batch: int,
    power: PowerModel | None = None,
    *,
    step_s: float | None = None,
    cluster_devices: int | None = None,
) -> StepEnergy:
    """Joules per step (and per sample) of ``plan``. ``step_s`` replaces the predicted step time
    (e.g. a measured one; time beyond the predicted busy time counts as idle). ``cluster_devices``
    is the cluster size for ``power.count_unused`` (the plan's cluster by default)."""
    if global_batch < 1:
        raise ClusterSpecError(f"global_batch is {global_batch}; it must be >= 1 sample")
    power = power or PowerModel.of(plan.cluster.device)
    k = math.prod(plan.mesh_shape)
    total_s = plan.predicted_step_s if step_s is None else step_s
    if not total_s > 0:
        raise ClusterSpecError(f"step time is {total_s} s; it must be positive")
    compute_s, comm_s = max(plan.compute_s, 0.0), max(plan.comm_s, 0.0)
    if compute_s + comm_s > total_s:
        # A measured step shorter than the predicted busy time: keep the predicted compute/comm split.
        scale = total_s / (compute_s + comm_s)
        compute_s, comm_s = compute_s * scale, comm_s * scale
    idle_s = max(0.0, total_s - compute_s - comm_s)
    per_device = compute_s * power.busy_w + comm_s * power.comm_power_w + idle_s * power.idle_w
    joules = k * per_device
    if power.count_unused:
        n = plan.cluster.num_devices if cluster_devices is None else cluster_devices
        joules += max(0, n - k) * total_s * power.idle_w
    return StepEnergy(k, total_s, compute_s, comm_s, joules, global_batch)
