"""Plain data types shared across the server. No protobuf here (see server/converters.py).

Tensors are numpy arrays. BF16 has no numpy dtype: it travels as ``uint16`` holding the
bfloat16 bit pattern, and backends reinterpret it (see ``swapserve.dtypes``).

The request context that is not part of the request (``ARRIVALS``) lives here too, beside
``InferRequest``: transports set it, the layers below read it, neither imports the other.
"""
from __future__ import annotations

import enum
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Union

import numpy as np

#: A request or response parameter value, as KServe v2's InferParameter allows.
ParamValue = Union[bool, int, float, str]


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as declared in config.pbtxt.

    ``dims`` excludes the batch dimension when the model batches (max_batch_size > 0);
    -1 marks a variable-size dimension. ``reshape`` (when set) is the shape the model
    sees instead of ``dims``.
    """

    name: str
    datatype: str  # Triton wire name: "FP32", "INT64", ...
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None
    optional: bool = False


class VersionPolicyKind(str, enum.Enum):
    LATEST = "latest"
    ALL = "all"
    SPECIFIC = "specific"


@dataclass(frozen=True)
class VersionPolicy:
    """Which version directories a model serves (Triton's version_policy; default latest 1)."""

    kind: VersionPolicyKind = VersionPolicyKind.LATEST
    latest: int = 1
    specific: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """The versions of ``available`` this policy loads, ascending."""
        ordered = sorted(available)
        if self.kind is VersionPolicyKind.ALL:
            return ordered
        if self.kind is VersionPolicyKind.SPECIFIC:
            return [v for v in ordered if v in self.specific]
        return ordered[-self.latest:] if self.latest > 0 else []


@dataclass(frozen=True)
class DynamicBatching:
    """Server-side batching settings (config.pbtxt dynamic_batching)."""

    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    max_queue_size: int = 0  # 0: the server default bound (never unbounded)


@dataclass(frozen=True)
class WarmupSample:
    """One model_warmup entry: inputs to run before the version takes traffic."""

    name: str
    batch_size: int
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    count: int = 1


@dataclass(frozen=True)
class ModelSpec:
    """A model's parsed and validated configuration (one per model, shared by its versions)."""

    name: str
    platform: str  # "pytorch_libtorch" | "onnxruntime_onnx"
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    version_policy: VersionPolicy = VersionPolicy()
    dynamic_batching: DynamicBatching | None = None
    instance_count: int = 1
    instance_kind: str = "KIND_AUTO"
    default_model_filename: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    warmup: tuple[WarmupSample, ...] = ()
    max_queue_bytes: int = 0  # parameter swapserve.max_queue_bytes; 0: the server's --max-queue-bytes

    @property
    def batching(self) -> bool:
        """True when requests carry a leading batch dimension."""
        return self.max_batch_size > 0

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)


@dataclass
class Tensor:
    """A named tensor on the request path: wire datatype, wire shape and its data."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class InferRequest:
    """A decoded inference request. ``model_version`` "" means: route by policy."""

    model_name: str
    model_version: str = ""
    id: str = ""
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    inputs: list[Tensor] = field(default_factory=list)
    #: Names of the outputs to return; None returns every output.
    outputs: list[str] | None = None
    #: How the serving version was chosen, set by the data plane: "" = assigned by the router (hash
    #: of the routing key or id: rollout-gate evidence), "pinned" (model_version named), "cohort" (a
    #: cohort rule matched a parameter the client set). Only "" counts in rollout gates.
    assignment: str = ""


#: Request context the transport sets and the layers below read, beside the request itself.
#: How many calls the front end received together with the current one (0: it cannot tell).
#: The native front end sets it for each burst it hands to the event loop (tasks copy it); an
#: inline version that is idle runs a request that arrived alone at once instead of queueing it
#: for a batch of one.
ARRIVALS: ContextVar[int] = ContextVar("swapserve_arrivals", default=0)


@dataclass
class InferResponse:
    """A finished inference: ``model_version`` is always the version that ran."""

    model_name: str
    model_version: str
    id: str
    outputs: list[Tensor]
    parameters: dict[str, ParamValue] = field(default_factory=dict)


# -- control plane views (what `swapserve status` and the control RPCs report) ----------------


@dataclass(frozen=True)
class ReplicaView:
    """One replica of the fleet as it last reported a model: the deployment generation it serves
    and, when not converged on the registry's current one, why."""

    replica_id: str
    address: str = ""
    generation: int = 0
    converged: bool = False
    reason: str = ""
    heartbeat_at: str = ""  # ISO 8601 UTC
    stale: bool = False  # no heartbeat for a while: it may be down
    this: bool = False  # the replica that answered


@dataclass(frozen=True)
class VersionView:
    """One version as the control plane sees it: registry facts plus residency and traffic."""

    version: int
    state: str  # registered | loading | warming | ready | serving | draining | unloaded | failed
    reason: str = ""
    traffic_bp: int = 0
    shadow: bool = False
    resident: bool = False
    memory_bytes: int = 0
    sha256: str = ""
    stage: str = ""
    source_path: str = ""
    registered_at: str = ""
    training_run: str = ""
    data_ref: str = ""
    parent_version: int = 0
    last_used_at: str = ""


@dataclass(frozen=True)
class ModelView:
    """A model's live state. ``traffic`` is ((version, basis points), ...), summing to 10000 when serving."""

    name: str
    champion: int = 0  # 0: nothing serves
    previous_champions: tuple[int, ...] = ()  # most recent last; rollback pops it
    traffic: tuple[tuple[int, int], ...] = ()
    shadows: tuple[int, ...] = ()
    cohorts: tuple[tuple[str, str, int], ...] = ()  # (attribute, value, version)
    key_attribute: str = "routing_key"
    generation: int = 0  # the registry deployment generation (0: Triton default routing, nothing recorded)
    versions: tuple[VersionView, ...] = ()
    memory_budget_bytes: int = 0
    memory_used_bytes: int = 0
    warnings: tuple[str, ...] = ()
    rollout: dict[str, object] | None = None
    #: Live per-version, per-slice counts: {"2": {"overall": {"requests": ..., "accuracy": ...}}}.
    live: dict[str, dict[str, dict[str, object]]] = field(default_factory=dict)
    #: Drift summary per monitored version: {"2": {"state": "ok|warn|alert", "score": ..., "top": [...]}}.
    drift: dict[str, dict[str, object]] = field(default_factory=dict)
    #: The registry's current deployment generation (0: unknown, e.g. the registry is down).
    registry_generation: int = 0
    #: Every replica's applied generation of this model (the fleet; this replica included).
    replicas: tuple[ReplicaView, ...] = ()


@dataclass(frozen=True)
class ModelSummaryView:
    name: str
    champion: int
    traffic: tuple[tuple[int, int], ...]
    resident_versions: tuple[int, ...]
    state: str  # READY | UNAVAILABLE
    rollout_state: str = ""


# -- live quality per version and slice (feedback join -> rollout gates) ------------------------


@dataclass(frozen=True)
class SliceCounts:
    """Cumulative counts for one (model, version, slice) since some start time.

    ``labelled``/``correct`` count outcomes joined by request id (class labels or
    correct/incorrect flags); numeric targets add to ``abs_error_sum``/``sq_error_sum``
    (``numeric`` of them). ``latency_p99_s`` is over the requests counted here (None: none).
    """

    requests: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0
    numeric: int = 0
    abs_error_sum: float = 0.0
    sq_error_sum: float = 0.0
    latency_p99_s: float | None = None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None
