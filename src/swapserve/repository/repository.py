"""Scanning a Triton-style repository: which models exist, their configs and version directories."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from swapserve._proto import model_config_pb2 as mc
from swapserve.errors import ConfigError, ModelNotFound
from swapserve.repository.config import parse_config, spec_from_config
from swapserve.types import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class ModelEntry:
    """One model directory as found on disk.

    Exactly one of ``spec`` (valid config) and ``error`` (why the model cannot load) is set.
    ``versions`` maps every numeric version directory to its path, whatever the policy says.
    """

    name: str
    path: Path
    config: mc.ModelConfig | None = None
    spec: ModelSpec | None = None
    error: str | None = None
    versions: dict[int, Path] = field(default_factory=dict)
    #: Fingerprint of config.pbtxt (mtime, size) so poll mode reloads on change.
    stamp: tuple[float, int] = (0.0, 0)

    def policy_versions(self) -> list[int]:
        """Versions the config's version policy selects, ascending (empty for an invalid model)."""
        return self.spec.version_policy.select(list(self.versions)) if self.spec else []

    def model_file(self, version: int) -> Path:
        assert self.spec is not None
        return self.versions[version] / self.spec.default_model_filename


class ModelRepository:
    """A directory of models. Scans are cheap and side-effect free; loading is the lifecycle's job."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"model repository {self.root} does not exist or is not a directory")
        self._listed: frozenset[str] | None = None

    def names(self) -> list[str]:
        """The model directories now (lists the repository: control path only)."""
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self._listed = frozenset(names)
        return names

    def listed(self, name: str) -> bool:
        """Whether ``name`` was a model directory when the repository was last listed (start, poll,
        index, load). No I/O after the first listing, so the request path may ask."""
        if self._listed is None:
            self.names()
        assert self._listed is not None
        return name in self._listed

    def entry(self, name: str) -> ModelEntry:
        """Read one model; an invalid config yields an entry with ``error`` set, never an exception."""
        path = self.root / name
        if not path.is_dir():
            raise ModelNotFound(f"model '{name}' is not in the repository {self.root}; RepositoryIndex lists what is")
        entry = ModelEntry(name=name, path=path)
        entry.versions = {int(p.name): p for p in path.iterdir() if p.is_dir() and p.name.isdigit()}
        cfg = path / "config.pbtxt"
        if cfg.exists():
            st = cfg.stat()
            entry.stamp = (st.st_mtime, st.st_size)
        try:
            entry.config = parse_config(path)
            entry.spec = spec_from_config(entry.config, path)
        except ConfigError as exc:
            entry.error = exc.message
            log.error("%s", exc.message)
        return entry

    def scan(self) -> dict[str, ModelEntry]:
        return {name: self.entry(name) for name in self.names()}
