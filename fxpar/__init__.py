"""fxpar: automatic, workload-aware parallelization of PyTorch training steps."""

from fxpar.api import FxparModule, compile
from fxpar.cluster import Cluster, DeviceSpec, LinkSpec, preset
from fxpar.errors import (
    CaptureError,
    ClusterSpecError,
    FallbackWarning,
    FxparError,
    IdleRankError,
    InfeasiblePlanError,
    PlanFileError,
    PlanMismatchError,
    PlanOptionError,
    PlanTimeoutError,
    RankFailedError,
    ShardingError,
    StepInputError,
    SweepError,
    UnsupportedOpError,
)
from fxpar.launch import launch
from fxpar.plan import Plan
from fxpar.planner import plan

__all__ = [
    "CaptureError",
    "Cluster",
    "ClusterSpecError",
    "DeviceSpec",
    "FallbackWarning",
    "FxparError",
    "FxparModule",
    "IdleRankError",
    "InfeasiblePlanError",
    "LinkSpec",
    "Plan",
    "PlanFileError",
    "PlanMismatchError",
    "PlanOptionError",
    "PlanTimeoutError",
    "RankFailedError",
    "ShardingError",
    "StepInputError",
    "SweepError",
    "UnsupportedOpError",
    "compile",
    "launch",
    "plan",
    "preset",
]
