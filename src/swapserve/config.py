"""Server settings (one pydantic-settings object, env prefix ``SWAPSERVE_``) and tunables.

Every ``swapserve serve`` flag has an environment twin: ``--grpc-port`` is
``SWAPSERVE_GRPC_PORT``. Tests build a ``Settings`` directly with port 0.
"""
from __future__ import annotations

import enum
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Requests queued per serving version before the server answers RESOURCE_EXHAUSTED.
DEFAULT_MAX_QUEUE_SIZE = 4096
#: Input bytes queued per serving version before the server answers RESOURCE_EXHAUSTED
#: (--max-queue-bytes; a model's parameter ``swapserve.max_queue_bytes`` sets its own). Four
#: requests of the default message limit: a queue always takes a few of the largest requests,
#: while 4096 queued requests can no longer hold 4096 messages' worth; docs/serving.md "Limits".
DEFAULT_MAX_QUEUE_BYTES = 256 * 1024 * 1024
#: Requests of one ModelStreamInfer stream read and not yet answered (--stream-max-inflight): at
#: the limit the server stops reading the stream until the client takes a response. Enough to
#: fill a batch of most models from one stream; docs/serving.md "Limits".
DEFAULT_STREAM_MAX_INFLIGHT = 64
#: Response bytes of one stream waiting for its client (--stream-max-queued-bytes); beyond them
#: the stream ends RESOURCE_EXHAUSTED. Within the in-flight limit only responses of 1 MiB and
#: more on average get there.
DEFAULT_STREAM_MAX_QUEUED_BYTES = 64 * 1024 * 1024
#: How long a worker waits for a batch before checking for shutdown (microseconds).
WORKER_POLL_US = 100_000
#: Largest gRPC message on the inference port by default (--grpc-max-message-bytes raises it).
#: gRPC's own 4 MiB is too small for tensors (a batch of 64 224x224x3 FP32 images is 37 MiB);
#: a message up to the limit is held whole in memory while it is decoded and run, so this is also
#: roughly what one call can make the server hold. 64 MiB: 10x SageMaker's and TorchServe's 6 MB payloads, well below
#: Triton's 2 GiB (which trusts its network); docs/serving.md "Limits".
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: How long graceful shutdown waits for in-flight requests (seconds).
DEFAULT_SHUTDOWN_GRACE_S = 30.0


class ControlMode(str, enum.Enum):
    """Triton's --model-control-mode."""

    NONE = "none"  # load everything at start; repository load/unload RPCs refused
    EXPLICIT = "explicit"  # load --load-model names at start, then by RPC
    POLL = "poll"  # rescan the repository every --repository-poll-secs


class Frontend(str, enum.Enum):
    """What serves the inference port's gRPC."""

    AUTO = "auto"  # native when it is built, else python
    NATIVE = "native"  # grpc++ in C++ (swapserve._frontend); the servicers still run in Python
    PYTHON = "python"  # grpc.aio


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWAPSERVE_", extra="ignore")

    model_repository: Path | None = None
    """Triton-style repository: <repo>/<model>/config.pbtxt and <repo>/<model>/<version>/<file>.
    ``swapserve serve`` without one serves ``<home>/model_repository`` (the examples on a fresh install)."""

    host: str = "127.0.0.1"
    """Address the inference gRPC and metrics HTTP servers bind to. Loopback by default: binding
    beyond it (0.0.0.0, a pod IP) needs ``tls_cert``/``tls_key`` or, explicitly, ``insecure``."""

    tls_cert: Path | None = None
    """Server certificate chain, PEM (SWAPSERVE_TLS_CERT). With ``tls_key``, every port (inference,
    control, metrics) speaks TLS with it; reloaded on SIGHUP (docs/tls.md)."""

    tls_key: Path | None = None
    """Private key of ``tls_cert``, PEM (SWAPSERVE_TLS_KEY)."""

    tls_ca: Path | None = None
    """CA bundle, PEM (SWAPSERVE_TLS_CA): every port then requires a client certificate it issued (mTLS)."""

    insecure: bool = False
    """Allow plaintext ports beyond loopback (SWAPSERVE_INSECURE): for a network that encrypts and
    authenticates itself (a service mesh's mTLS). Logged as a warning at start."""

    grpc_port: int = 8001
    """KServe v2 / Triton gRPC inference port (0 picks a free port)."""

    metrics_port: int = 8002
    """Prometheus metrics HTTP port (0 picks a free port; -1 disables)."""

    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""

    model_control_mode: ControlMode = ControlMode.NONE
    load_model: list[str] = Field(default_factory=list)
    """Models to load at start in explicit mode ("*" loads all)."""

    repository_api: bool = False
    """Allow RepositoryModelLoad/RepositoryModelUnload on the inference port (SWAPSERVE_REPOSITORY_API).
    Off by default (PERMISSION_DENIED, as with Triton's restricted protocol); when on, they need
    explicit mode and go through the control plane: audited, refused during a rollout, a recorded
    champion protected. RepositoryIndex is always readable. See docs/security.md."""

    repository_poll_secs: float = 15.0
    """Rescan interval in poll mode."""

    grpc_max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, gt=0, le=2**31 - 1)
    """Largest request or response message on the inference port (default 64 MiB); larger ones get
    RESOURCE_EXHAUSTED. gRPC's limit is a 32-bit signed int, hence the ceiling."""

    max_queue_bytes: int = Field(default=DEFAULT_MAX_QUEUE_BYTES, gt=0)
    """Input bytes queued per serving version, all requests together (default 256 MiB); a request
    that would pass it gets RESOURCE_EXHAUSTED. A model's config parameter
    ``swapserve.max_queue_bytes`` sets its own bound instead."""

    stream_max_inflight: int = Field(default=DEFAULT_STREAM_MAX_INFLIGHT, ge=1)
    """Requests of one ModelStreamInfer stream read and not yet answered (default 64); at the limit
    the server reads no more of the stream until its client takes a response (back-pressure)."""

    stream_max_queued_bytes: int = Field(default=DEFAULT_STREAM_MAX_QUEUED_BYTES, gt=0)
    """Response bytes of one stream waiting for its client to read them (default 64 MiB); beyond
    them the stream ends RESOURCE_EXHAUSTED."""

    frontend: Frontend = Frontend.AUTO
    """Inference port transport: auto (native when built), native (grpc++) or python (grpc.aio)."""

    torch_threads: int = 1
    """Intra-op threads per torch runtime worker (the 2-core default leaves a core for gRPC)."""

    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    log_level: str = "INFO"

    home: Path = Path("~/.swapserve")
    """State directory (SWAPSERVE_HOME): the default SQLite registry lives here."""

    registry: str | None = None
    """Registry URL (any SQLAlchemy URL; SWAPSERVE_REGISTRY). Default: SQLite under ``home``."""

    control_address: str = "127.0.0.1:8003"
    """Operator control service. A non-loopback address needs ``control_token``."""

    control_token: str | None = None
    """Bearer token the control service requires (SWAPSERVE_CONTROL_TOKEN). Prefer ``control_token_file``:
    a token in argv is visible to every user of the machine (``ps``)."""

    control_token_file: Path | None = None
    """File holding the control token (SWAPSERVE_CONTROL_TOKEN_FILE; surrounding whitespace ignored)."""

    def control_token_value(self) -> str | None:
        """The control token: ``control_token``, else the first line of ``control_token_file``."""
        if self.control_token:
            return self.control_token
        if self.control_token_file is None:
            return None
        try:
            token = self.control_token_file.read_text().strip()
        except OSError as e:
            from swapserve.errors import ConfigError

            raise ConfigError(f"cannot read --control-token-file {self.control_token_file}: {e.strerror}") from None
        return token or None

    auth_file: Path | None = None
    """Identities and roles (SWAPSERVE_AUTH_FILE, YAML): principals with token hashes or client
    certificate names, their roles, the models they may call and their rate limits
    (docs/security.md, "Identities and roles"). With it, loopback callers get no control rights
    unless ``loopback_roles`` grants them."""

    inference_open: bool | None = None
    """Whether any caller may call any model on the inference port (SWAPSERVE_INFERENCE_OPEN).
    Default: the auth file's ``inference.open``, else open only when the port binds loopback."""

    feedback_token_file: Path | None = None
    """Feedback credentials (SWAPSERVE_FEEDBACK_TOKEN_FILE): one ``NAME TOKEN`` per line (``#`` comments).
    With any feedback token configured, reporting ground truth needs one; NAME is the reporter
    every label records (see docs/feedback.md)."""

    feedback_token: str | None = None
    """One feedback credential, reporter ``default`` (SWAPSERVE_FEEDBACK_TOKEN)."""

    feedback_open: bool = False
    """Accept feedback without a credential from any peer (reporter ``anonymous``). Off: only
    loopback peers may report without one, and only while no feedback token is configured."""

    webhook_secret: str | None = None
    """Key that signs rollout webhooks (HMAC-SHA256, header X-Swapserve-Signature; SWAPSERVE_WEBHOOK_SECRET).
    Without one, webhooks are sent unsigned."""

    device_memory_budget: str | None = None
    """Bytes of device memory resident versions may use ("8GiB", "512MiB", "1000000").
    Default: half of the available RAM on cpu, 80% of free memory on a GPU."""

    replica_id: str | None = None
    """This replica's name in the fleet (``swapserve status`` lists it; SWAPSERVE_REPLICA_ID).
    Default: ``$POD_NAME`` when set (Kubernetes), else ``hostname-pid``."""

    fleet_poll_s: float = Field(default=1.0, gt=0)
    """How often the registry's deployment generations are polled (seconds): the fallback to
    PostgreSQL LISTEN/NOTIFY, the only mechanism on SQLite."""

    rollout_lease_s: float = Field(default=4.0, gt=0)
    """Time to live of the rollout lease (seconds; SWAPSERVE_ROLLOUT_LEASE_S): the replica holding it
    decides the fleet's rollouts and renews it every quarter of this; another takes over after about
    this long without a renewal (at once when the holder stops gracefully)."""

    def registry_url(self) -> str:
        if self.registry:
            return self.registry
        home = self.home.expanduser()
        home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{home / 'registry.db'}"


_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
          "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """ "8GiB" -> 8589934592; plain integers are bytes. ValueError names the accepted units."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read '{text}' as a size; use e.g. 2GiB, 512MiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
