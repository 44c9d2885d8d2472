"""Registry tables of versions and their metrics by slice: register, look up, state, stage."""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from swapserve import errors
from swapserve.registry.engine import RegistryBase
from swapserve.registry.models import MetricValue, ModelVersion
from swapserve.registry.records import DEFAULT_STAGE, METRIC_SOURCES, STAGES, STATES, VersionRecord
from swapserve.registry.rows import check_model, check_version, require_version, version_record, version_row


class VersionTables(RegistryBase):
    """Registry tables of versions and their metrics by slice: register, look up, state, stage."""

    def register_version(
        self,
        model: str,
        version: int,
        *,
        source_path: str | Path,
        sha256: str,
        training_run: str | None = None,
        data_ref: str | None = None,
        parent_version: int | None = None,
        rollback_thresholds: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        actor: str = "system",
        reason: str = "",
    ) -> VersionRecord:
        """Record a new version (state ``registered``, stage ``staging``); audited + event.

        Idempotent: registering the same files (same sha256) again returns the existing
        record and writes nothing. Different files under an existing (model, version)
        raise ``AlreadyExists`` naming both hashes: versions are immutable.
        """
        check_model(model)
        check_version(model, version)
        if parent_version is not None:
            check_version(model, parent_version)
        digest = str(sha256).strip().lower()
        if not digest:
            raise errors.InvalidInput(
                f"model '{model}' version {version}: sha256 is empty; pass the hex digest "
                "of the version's files"
            )

        def run(s: Session) -> VersionRecord:
            row = version_row(s, model, version)
            if row is not None:
                if row.sha256 == digest:
                    return version_record(row)
                raise errors.AlreadyExists(
                    f"model '{model}' version {version} is already registered with sha256 "
                    f"{row.sha256} (from {row.source_path}); the new files at {source_path} "
                    f"hash to {digest}. Versions are immutable: register the new files under "
                    "a new version number."
                )
            now = self._now()
            row = ModelVersion(
                model=model, version=version, source_path=str(source_path), sha256=digest,
                registered_at=now, deployed_at=None, training_run=training_run,
                data_ref=data_ref, parent_version=parent_version, stage=DEFAULT_STAGE,
                state="registered", state_reason="", state_changed_at=now,
                rollback_thresholds=dict(rollback_thresholds or {}), meta=dict(metadata or {}),
            )
            s.add(row)
            s.flush()
            rec = version_record(row)
            self._audit(s, actor=actor, action="register", model=model, version=version,
                        before=None, after=rec.to_dict(), reason=reason)
            self._event(s, "registry", f"{model} v{version} registered", model=model,
                        version=version, data={"sha256": digest, "source_path": str(source_path)})
            return rec

        result: VersionRecord = self._write_retrying(run)
        return result

    def get_version(self, model: str, version: int) -> VersionRecord | None:
        with self._read() as s:
            row = version_row(s, model, version)
            return version_record(row) if row is not None else None

    def require_version(self, model: str, version: int) -> VersionRecord:
        """Like ``get_version`` but raises ``ModelNotFound`` for an unknown version."""
        with self._read() as s:
            return version_record(require_version(s, model, version))

    def list_versions(self, model: str) -> list[VersionRecord]:
        """The model's versions, ascending by version number (empty for an unknown model)."""
        with self._read() as s:
            rows = s.scalars(
                sa.select(ModelVersion).where(ModelVersion.model == model).order_by(ModelVersion.version)
            )
            return [version_record(r) for r in rows]

    def list_models(self) -> list[str]:
        """Every model with at least one registered version, sorted."""
        with self._read() as s:
            return list(s.scalars(sa.select(ModelVersion.model).distinct().order_by(ModelVersion.model)))

    def set_state(self, model: str, version: int, state: str, reason: str = "") -> VersionRecord:
        """Record a lifecycle transition and emit a ``lifecycle`` event.

        The lifecycle module owns which transitions are legal; the registry checks only that
        ``state`` is one of ``records.STATES``. The first time a version is ``serving``,
        its ``deployed_at`` is set.
        """
        if state not in STATES:
            raise errors.InvalidInput(
                f"model '{model}' version {version}: unknown lifecycle state '{state}'; "
                f"use one of {', '.join(STATES)}"
            )

        def run(s: Session) -> VersionRecord:
            row = require_version(s, model, version)
            old = row.state
            now = self._now()
            row.state, row.state_reason, row.state_changed_at = state, reason, now
            if state == "serving" and row.deployed_at is None:
                row.deployed_at = now
            s.flush()
            msg = f"{model} v{version}: {old} -> {state}" + (f" ({reason})" if reason else "")
            self._event(s, "lifecycle", msg, model=model, version=version,
                        data={"from": old, "to": state, "reason": reason})
            return version_record(row)

        result: VersionRecord = self._write_retrying(run)
        return result

    def set_stage(
        self, model: str, version: int, stage: str, *, actor: str, reason: str = "",
    ) -> VersionRecord:
        """Move a version to ``staging``/``production``/``archived``; audited + event."""
        if stage not in STAGES:
            raise errors.InvalidInput(
                f"model '{model}' version {version}: unknown stage '{stage}'; "
                f"use one of {', '.join(STAGES)}"
            )

        def run(s: Session) -> VersionRecord:
            row = require_version(s, model, version)
            old = row.stage
            row.stage = stage
            s.flush()
            self._audit(s, actor=actor, action="stage", model=model, version=version,
                        before={"stage": old}, after={"stage": stage}, reason=reason)
            self._event(s, "control", f"{model} v{version}: stage {old} -> {stage}",
                        model=model, version=version, data={"from": old, "to": stage, "actor": actor})
            return version_record(row)

        result: VersionRecord = self._write_retrying(run)
        return result

    def set_rollback_thresholds(
        self, model: str, version: int, thresholds: Mapping[str, Any], *, actor: str, reason: str = "",
    ) -> VersionRecord:
        """Replace the version's rollback thresholds (JSON object); audited."""

        def run(s: Session) -> VersionRecord:
            row = require_version(s, model, version)
            before = dict(row.rollback_thresholds)
            row.rollback_thresholds = dict(thresholds)
            s.flush()
            self._audit(s, actor=actor, action="thresholds", model=model, version=version,
                        before=before, after=dict(thresholds), reason=reason)
            return version_record(row)

        result: VersionRecord = self._write_retrying(run)
        return result

    def mark_deployed(self, model: str, version: int) -> VersionRecord:
        """Set ``deployed_at`` to now unless it is already set (first time it served)."""

        def run(s: Session) -> VersionRecord:
            row = require_version(s, model, version)
            if row.deployed_at is None:
                row.deployed_at = self._now()
                s.flush()
            return version_record(row)

        result: VersionRecord = self._write_retrying(run)
        return result

    # -- metrics ----------------------------------------------------------------------

    def record_metrics(
        self,
        model: str,
        version: int,
        metrics: Mapping[str, Mapping[str, float]],
        *,
        source: str = "offline",
    ) -> None:
        """Append ``{slice: {metric: value}}`` for a version (``"overall"`` = all traffic).

        Values must be finite numbers. History is kept; ``metrics()`` returns the latest.
        """
        if source not in METRIC_SOURCES:
            raise errors.InvalidInput(
                f"model '{model}' version {version}: unknown metric source '{source}'; "
                f"use one of {', '.join(METRIC_SOURCES)}"
            )
        flat: list[tuple[str, str, float]] = []
        for slice_name, values in metrics.items():
            if not isinstance(values, Mapping):
                raise errors.InvalidInput(
                    f"model '{model}' version {version}: metrics must be {{slice: {{metric: value}}}}; "
                    f"slice '{slice_name}' maps to {type(values).__name__}"
                )
            for name, value in values.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise errors.InvalidInput(
                        f"model '{model}' version {version}: metric '{name}' of slice "
                        f"'{slice_name}' is {value!r}; metric values must be finite numbers"
                    )
                flat.append((str(slice_name), str(name), float(value)))

        def run(s: Session) -> None:
            require_version(s, model, version)
            now = self._now()
            s.add_all(
                MetricValue(model=model, version=version, slice=sl, name=n, value=v,
                            source=source, recorded_at=now)
                for sl, n, v in flat
            )

        self._write_retrying(run)

    def metrics(
        self, model: str, version: int, *, source: str | None = None,
    ) -> dict[str, dict[str, float]]:
        """The latest value per (slice, metric), optionally only from one ``source``."""
        with self._read() as s:
            require_version(s, model, version)
            q = sa.select(MetricValue).where(MetricValue.model == model, MetricValue.version == version)
            if source is not None:
                q = q.where(MetricValue.source == source)
            out: dict[str, dict[str, float]] = {}
            for r in s.scalars(q.order_by(MetricValue.recorded_at, MetricValue.id)):
                out.setdefault(r.slice, {})[r.name] = r.value
            return out
