"""Per-model monitoring settings: ``<repository>/<model>/monitoring.yaml``, beside config.pbtxt.

Every key is optional; a missing file means "all defaults", and the defaults work: count
(never reject) data-quality issues, profile each version from its ``reference.npz`` or from
the first 1000 rows it serves, score 5-minute and 1-hour windows, fire no retraining.
Durations are seconds (a number) or a string with units: ``500ms``, ``5s``, ``5m``, ``1h``,
``1h30m``, ``1d`` (the grammar of :mod:`swapserve.units`). Unknown keys are errors (a typo must not silently disable a check)::

    enabled: true
    windows: [5m, 1h]            # sliding windows scored for drift (each >= 1s)
    slots: 10                    # ring slots per window: the window slides in steps of window/slots
    profile:
      reference_file: reference.npz   # in the version directory; see swapserve.monitoring.profile
      min_reference_rows: 100    # a smaller file is ignored and the profile is captured instead
      capture: 1000              # rows captured from live traffic when there is no usable file
      bins: 10                   # quantile bins per feature
      max_features: 256          # monitored elements across all inputs (larger inputs are subsampled)
    data_quality:
      policy: count              # count | reject
      reject_kinds: [nan, inf, out_of_range]   # what "reject" rejects (constant rows are only counted)
      range_margin: 0.0          # widen the reference [min, max] by this fraction of max - min
      ranges:                    # overrides of the reference ranges
        pixels: [0.0, 1.0]       #   every feature of an input
        "pixels[17]": [0.0, 0.5] #   one flattened element
    drift:
      min_samples: 100           # rows a window needs before it is scored (else "insufficient")
      psi: {warn: 0.1, alert: 0.25}            # input features
      prediction_psi: {warn: 0.1, alert: 0.25} # outputs (predicted class / output quantiles)
      p_value: 0.01              # family-wise significance, Bonferroni-corrected over features
      top_k: 5                   # features exported as metrics and listed first
    trigger:
      command: [python, examples/retrain_digits.py, --context, "{context}"]
      webhook: http://retrain.internal/hooks/swapserve
      webhook_timeout: 10s
      on_drift: true             # fire on a drift alert episode
      accuracy_floor: 0.9        # fire when live accuracy (feedback) is below this
      min_labelled: 100          # ... over at least this many labelled predictions
      schedule: 24h              # also fire periodically (reason "schedule")
      min_interval: 1h           # never two firings for a model closer than this (>= 1m)
      timeout: 1h                # the command's process group is killed after this
      kill_grace: 10s            # ... SIGTERM first, SIGKILL this long after
      pass_env: [AWS_PROFILE, "MLFLOW_*"]   # server variables the command may see (names or PREFIX*)
      env: {RETRAIN_EPOCHS: "5"}             # literal variables for the command

The command never inherits the server's environment: it sees ``DEFAULT_PASS_ENV``, the
``SWAPSERVE_*`` variables of its context (see :mod:`swapserve.monitoring.trigger`),
``pass_env`` and ``env`` -- so no control token, feedback token or registry password
reaches a retraining job unless ``pass_env`` names it.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from swapserve import units
from swapserve.errors import ConfigError

#: The file name, in the model directory next to config.pbtxt.
FILENAME = "monitoring.yaml"

log = logging.getLogger(__name__)

QUALITY_KINDS = ("nan", "inf", "out_of_range", "constant")

#: Server environment variables every retraining command sees (``PREFIX*`` = every name with
#: that prefix). Nothing secret: locale, time zone, paths, who runs it.
DEFAULT_PASS_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR", "PYTHONPATH")
#: The shortest ``trigger.min_interval`` accepted: an alert that flaps can start at most one
#: retraining job a minute per model.
MIN_INTERVAL_FLOOR_S = 60.0
#: Tests only: an environment variable (seconds) that lowers MIN_INTERVAL_FLOOR_S for the server
#: process that reads monitoring.yaml; a lowered floor is logged as a warning on every parse.
MIN_INTERVAL_FLOOR_ENV = "SWAPSERVE_UNSAFE_TRIGGER_MIN_INTERVAL_FLOOR_S"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Thresholds:
    """Warn and alert levels of one score (a score >= the level is in that state)."""

    warn: float = 0.1
    alert: float = 0.25


@dataclass(frozen=True)
class ProfileConfig:
    reference_file: str = "reference.npz"
    min_reference_rows: int = 100
    capture: int = 1000
    bins: int = 10
    max_features: int = 256


@dataclass(frozen=True)
class QualityConfig:
    policy: str = "count"  # count | reject
    reject_kinds: tuple[str, ...] = ("nan", "inf", "out_of_range")
    range_margin: float = 0.0
    #: "input" or "input[i]" -> (lo, hi)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    def rejects(self, kind: str) -> bool:
        return self.policy == "reject" and kind in self.reject_kinds


@dataclass(frozen=True)
class DriftConfig:
    min_samples: int = 100
    psi: Thresholds = Thresholds()
    prediction_psi: Thresholds = Thresholds()
    p_value: float = 0.01
    top_k: int = 5


@dataclass(frozen=True)
class TriggerConfig:
    command: tuple[str, ...] = ()
    webhook: str = ""
    webhook_timeout_s: float = 10.0
    on_drift: bool = True
    accuracy_floor: float | None = None
    min_labelled: int = 100
    schedule_s: float | None = None
    min_interval_s: float = 3600.0
    #: The command's whole process group is killed this long after it started.
    timeout_s: float = 3600.0
    #: SIGTERM at the timeout, SIGKILL to the group this long after if anything is left.
    kill_grace_s: float = 10.0
    #: Server variables (exact names or ``PREFIX*``) passed on besides DEFAULT_PASS_ENV.
    pass_env: tuple[str, ...] = ()
    #: Literal variables set for the command.
    env: dict[str, str] = field(default_factory=dict)

    @property
    def configured(self) -> bool:
        """True when there is somewhere to send a trigger (a command or a webhook)."""
        return bool(self.command or self.webhook)


@dataclass(frozen=True)
class MonitoringConfig:
    enabled: bool = True
    windows_s: tuple[float, ...] = (300.0, 3600.0)
    slots: int = 10
    profile: ProfileConfig = ProfileConfig()
    quality: QualityConfig = QualityConfig()
    drift: DriftConfig = DriftConfig()
    trigger: TriggerConfig = TriggerConfig()
    source: str = ""  # the file it came from ("" = defaults)


def min_interval_floor_s() -> float:
    """MIN_INTERVAL_FLOOR_S, or the value of MIN_INTERVAL_FLOOR_ENV (tests only; logged loudly)."""
    raw = os.environ.get(MIN_INTERVAL_FLOOR_ENV, "")
    if not raw:
        return MIN_INTERVAL_FLOOR_S
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{MIN_INTERVAL_FLOOR_ENV}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{MIN_INTERVAL_FLOOR_ENV}={raw!r} must be a number of seconds >= 0")
    log.warning("%s=%s: retraining trigger min_interval floor lowered from %s to %s (meant for tests only)",
                MIN_INTERVAL_FLOOR_ENV, raw, units.format_duration(MIN_INTERVAL_FLOOR_S), units.format_duration(value))
    return value


def _finite(v: Any) -> bool:
    """A number (not a bool) that a float holds finitely; a YAML integer too large for a float is
    not (``math.isfinite`` raises OverflowError on it)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _seconds(value: Any, where: str) -> float:
    """A duration in the one grammar of :mod:`swapserve.units`; ConfigError naming ``where`` otherwise."""
    try:
        return units.parse_duration(value)
    except units.UnitError as exc:
        raise ConfigError(f"{where}: {exc}") from None


class _Section:
    """Typed reads from one mapping with errors that name the file and the dotted field."""

    def __init__(self, data: Any, where: str, path: str, known: set[str]) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: '{path or 'top level'}' must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(map(str, data)) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {[self._dot(path, u) for u in unknown]}; "
                              f"known fields here are {sorted(known)}")
        self.data, self.where, self.path = data, where, path

    @staticmethod
    def _dot(path: str, key: str) -> str:
        return f"{path}.{key}" if path else key

    def field(self, key: str) -> str:
        return f"{self.where}: field '{self._dot(self.path, key)}'"

    def sub(self, key: str, known: set[str]) -> _Section:
        return _Section(self.data.get(key), self.where, self._dot(self.path, key), known)

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def boolean(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        v = self.data[key]
        if not isinstance(v, bool):
            raise ConfigError(f"{self.field(key)} must be true or false, got {v!r}")
        return v

    def integer(self, key: str, default: int, lo: int, hi: int | None = None) -> int:
        if not self.has(key):
            return default
        v = self.data[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise ConfigError(f"{self.field(key)} must be an integer {bound}, got {v!r}")
        return v

    def number(self, key: str, default: float, lo: float, hi: float | None = None) -> float:
        if not self.has(key):
            return default
        v = self.data[key]
        if not _finite(v) or v < lo or (hi is not None and v > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise ConfigError(f"{self.field(key)} must be a number {bound}, got {v!r}")
        return float(v)

    def duration(self, key: str, default: float | None, minimum: float = 0.0) -> float | None:
        if not self.has(key):
            return default
        seconds = _seconds(self.data[key], self.field(key))
        if seconds < minimum:
            raise ConfigError(f"{self.field(key)} must be at least {units.format_duration(minimum)}, "
                              f"got {self.data[key]!r}")
        return seconds

    def string(self, key: str, default: str, choices: tuple[str, ...] = ()) -> str:
        if not self.has(key):
            return default
        v = self.data[key]
        if not isinstance(v, str) or (choices and v not in choices):
            expected = f"one of {list(choices)}" if choices else "a string"
            raise ConfigError(f"{self.field(key)} must be {expected}, got {v!r}")
        return v

    def thresholds(self, key: str, default: Thresholds) -> Thresholds:
        s = self.sub(key, {"warn", "alert"})
        t = Thresholds(warn=s.number("warn", default.warn, 0.0), alert=s.number("alert", default.alert, 0.0))
        if t.warn > t.alert:
            raise ConfigError(f"{self.field(key)}: warn ({t.warn}) must not exceed alert ({t.alert})")
        return t


def _ranges(sec: _Section) -> dict[str, tuple[float, float]]:
    if not sec.has("ranges"):
        return {}
    raw = sec.data["ranges"]
    if not isinstance(raw, dict):
        raise ConfigError(f"{sec.field('ranges')} must map an input name (or 'input[i]') to [lo, hi]")
    out: dict[str, tuple[float, float]] = {}
    for key, value in raw.items():
        where = f"{sec.field('ranges')} entry '{key}'"
        if not isinstance(key, str) or not re.fullmatch(r"[^\[\]]+(\[\d+\])?", key):
            raise ConfigError(f"{where}: the key must be an input name or 'input[i]' (i = flattened element index)")
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(_finite(v) for v in value)
                or not value[0] <= value[1]):
            raise ConfigError(f"{where}: expected [lo, hi] with lo <= hi, got {value!r}")
        out[key] = (float(value[0]), float(value[1]))
    return out


def _pass_env(sec: _Section) -> tuple[str, ...]:
    if not sec.has("pass_env"):
        return ()
    raw = sec.data["pass_env"]
    if not isinstance(raw, list) or not all(isinstance(n, str) and _ENV_NAME.fullmatch(n.removesuffix("*"))
                                            for n in raw):
        raise ConfigError(f"{sec.field('pass_env')} must be a list of environment variable names "
                          f"(or PREFIX* patterns), e.g. [AWS_PROFILE, 'MLFLOW_*'], got {raw!r}")
    return tuple(raw)


def _literal_env(sec: _Section) -> dict[str, str]:
    if not sec.has("env"):
        return {}
    raw = sec.data["env"]
    if not isinstance(raw, dict):
        raise ConfigError(f"{sec.field('env')} must map variable names to values, e.g. {{RETRAIN_EPOCHS: '5'}}")
    out: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise ConfigError(f"{sec.field('env')}: {key!r} is not an environment variable name")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{sec.field('env')}: the value of {key} must be a string or a number, got {value!r}")
        out[key] = str(value)
    return out


def parse_monitoring(data: Any, where: str) -> MonitoringConfig:
    """Validate a parsed monitoring.yaml document; ``where`` names it in errors."""
    top = _Section(data, where, "", {"enabled", "windows", "slots", "profile", "data_quality", "drift", "trigger"})
    windows: tuple[float, ...] = MonitoringConfig.windows_s
    if top.has("windows"):
        raw = top.data["windows"]
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{top.field('windows')} must be a non-empty list of durations, e.g. [5m, 1h]")
        parsed = [_seconds(w, f"{top.field('windows')} item {i}") for i, w in enumerate(raw)]
        for w, original in zip(parsed, raw):
            if w < 1.0:
                raise ConfigError(f"{top.field('windows')}: window {original!r} is shorter than 1s")
        labels = [units.format_duration(w) for w in parsed]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"{top.field('windows')}: duplicate windows {raw!r}")
        windows = tuple(sorted(parsed))
    prof = top.sub("profile", {"reference_file", "min_reference_rows", "capture", "bins", "max_features"})
    profile = ProfileConfig(
        reference_file=prof.string("reference_file", ProfileConfig.reference_file),
        min_reference_rows=prof.integer("min_reference_rows", ProfileConfig.min_reference_rows, 1),
        capture=prof.integer("capture", ProfileConfig.capture, 10, 1_000_000),
        bins=prof.integer("bins", ProfileConfig.bins, 2, 100),
        max_features=prof.integer("max_features", ProfileConfig.max_features, 1, 4096),
    )
    dq = top.sub("data_quality", {"policy", "reject_kinds", "range_margin", "ranges"})
    reject_kinds = QualityConfig.reject_kinds
    if dq.has("reject_kinds"):
        rk = dq.data["reject_kinds"]
        if not isinstance(rk, list) or any(k not in QUALITY_KINDS for k in rk):
            raise ConfigError(f"{dq.field('reject_kinds')} must be a list drawn from {list(QUALITY_KINDS)}, got {rk!r}")
        reject_kinds = tuple(rk)
    quality = QualityConfig(
        policy=dq.string("policy", QualityConfig.policy, ("count", "reject")),
        reject_kinds=reject_kinds,
        range_margin=dq.number("range_margin", QualityConfig.range_margin, 0.0, 10.0),
        ranges=_ranges(dq),
    )
    dr = top.sub("drift", {"min_samples", "psi", "prediction_psi", "p_value", "top_k"})
    drift = DriftConfig(
        min_samples=dr.integer("min_samples", DriftConfig.min_samples, 1),
        psi=dr.thresholds("psi", DriftConfig.psi),
        prediction_psi=dr.thresholds("prediction_psi", DriftConfig.prediction_psi),
        p_value=dr.number("p_value", DriftConfig.p_value, 0.0, 1.0),
        top_k=dr.integer("top_k", DriftConfig.top_k, 0, 100),
    )
    tr = top.sub("trigger", {"command", "webhook", "webhook_timeout", "on_drift", "accuracy_floor",
                             "min_labelled", "schedule", "min_interval", "timeout", "kill_grace", "pass_env",
                             "env"})
    command: tuple[str, ...] = ()
    if tr.has("command"):
        cmd = tr.data["command"]
        if not isinstance(cmd, list) or not cmd or not all(isinstance(a, (str, int, float)) for a in cmd):
            raise ConfigError(f"{tr.field('command')} must be a non-empty argv list, e.g. "
                              f"[python, retrain.py, --context, '{{context}}'] (no shell)")
        command = tuple(str(a) for a in cmd)
    webhook = tr.string("webhook", "")
    if webhook and not re.match(r"^https?://", webhook):
        raise ConfigError(f"{tr.field('webhook')} must be an http:// or https:// URL, got {webhook!r}")
    floor = tr.number("accuracy_floor", -1.0, 0.0, 1.0) if tr.has("accuracy_floor") else None
    min_interval = TriggerConfig.min_interval_s
    if tr.has("min_interval"):
        min_interval = _seconds(tr.data["min_interval"], tr.field("min_interval"))
        least = min_interval_floor_s()
        if min_interval < least:
            raise ConfigError(
                f"{tr.field('min_interval')} must be at least {units.format_duration(least)} "
                f"(one retraining job per model at most that often), got {tr.data['min_interval']!r}: "
                f"set e.g. 'min_interval: 1h'")
    trigger = TriggerConfig(
        command=command,
        webhook=webhook,
        webhook_timeout_s=tr.duration("webhook_timeout", TriggerConfig.webhook_timeout_s, 0.001) or 10.0,
        on_drift=tr.boolean("on_drift", True),
        accuracy_floor=floor,
        min_labelled=tr.integer("min_labelled", TriggerConfig.min_labelled, 1),
        schedule_s=tr.duration("schedule", None, 1.0),
        min_interval_s=min_interval,
        timeout_s=tr.duration("timeout", TriggerConfig.timeout_s, 1.0) or TriggerConfig.timeout_s,
        kill_grace_s=tr.duration("kill_grace", TriggerConfig.kill_grace_s, 0.0) or 0.0,
        pass_env=_pass_env(tr),
        env=_literal_env(tr),
    )
    return MonitoringConfig(
        enabled=top.boolean("enabled", True),
        windows_s=windows,
        slots=top.integer("slots", MonitoringConfig.slots, 1, 600),
        profile=profile, quality=quality, drift=drift, trigger=trigger, source=where,
    )


def load_monitoring_config(model_dir: Path | str) -> MonitoringConfig:
    """Read ``model_dir/monitoring.yaml``; all defaults when the file does not exist.

    Raises ConfigError naming the file and the field for YAML syntax errors, unknown
    fields, wrong types and out-of-range values.
    """
    path = Path(model_dir) / FILENAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return MonitoringConfig()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"model '{Path(model_dir).name}': {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"model '{Path(model_dir).name}': cannot read {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"model '{Path(model_dir).name}': {path} is not valid YAML: {exc}") from None
    except (ValueError, RecursionError) as exc:  # PyYAML's int() of a >4300-digit integer; absurd nesting
        raise ConfigError(f"model '{Path(model_dir).name}': {path} is not a usable YAML document: {exc}") from None
    return parse_monitoring(data, f"model '{Path(model_dir).name}': {path}")
