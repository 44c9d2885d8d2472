"""Scanning a Triton-style repository: which models exist, their configs and version directories."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from swapserve._proto import model_config_pb2 as mc
from swapserve.errors import ConfigError, ModelNotFound, SwapserveError
from swapserve.repository.config import parse_config, spec_from_config
from swapserve.repository.paths import (MODEL_NAME_RULE, check_model_name, inside, is_model_name, model_directory,
                                        version_of_dirname)
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
        """The version's model file, resolved; InvalidInput when ``default_model_filename`` (or a
        symlink on the way) leads out of the version directory."""
        assert self.spec is not None
        return inside(self.versions[version], self.spec.default_model_filename,
                      what=f"model '{self.name}' version {version} default_model_filename")


class ModelRepository:
    """A directory of models. Scans are cheap and side-effect free; loading is the lifecycle's job."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"model repository {self.root} does not exist or is not a directory")
        self._listed: frozenset[str] | None = None
        #: Directory names already reported as not allowed (logged once, not on every poll).
        self._refused: set[str] = set()

    def names(self) -> list[str]:
        """The model directories now (lists the repository: control path only). Directories whose
        name is not a valid model name (swapserve.repository.paths) are left out, with a warning."""
        names = []
        for p in self.root.iterdir():
            if p.name.startswith(".") or not p.is_dir():
                continue
            if not is_model_name(p.name):
                if p.name not in self._refused:
                    self._refused.add(p.name)
                    log.warning("model repository %s: directory %r is not served: %s", self.root, p.name,
                                MODEL_NAME_RULE)
                continue
            names.append(p.name)
        names.sort()
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
        """Read one model. Raises InvalidInput for a name that is not allowed (it never becomes a
        path) and ModelNotFound when there is no such directory; anything wrong inside the model's
        directory (a bad config, a missing or unreadable file, a file or symlink that leads out of
        it, a warmup sample too large) yields an entry with ``error`` set, never an exception."""
        check_model_name(name)
        path = self.root / name
        if not path.is_dir():
            raise ModelNotFound(f"model '{name}' is not in the repository {self.root}; RepositoryIndex lists what is")
        entry = ModelEntry(name=name, path=path)
        try:
            model_directory(self.root, name)  # a symlink out of the repository is refused
            for p in path.iterdir():
                version = version_of_dirname(p.name)
                if version is None or not p.is_dir():
                    continue
                inside(path, p.name, what=f"model '{name}' version directory")
                entry.versions[version] = p
            cfg = path / "config.pbtxt"
            if cfg.exists():
                st = cfg.stat()
                entry.stamp = (st.st_mtime, st.st_size)
            entry.config = parse_config(path)
            entry.spec = spec_from_config(entry.config, path)
        except SwapserveError as exc:
            entry.config, entry.spec = None, None
            entry.error = exc.message if exc.message.startswith(f"model '{name}'") else f"model '{name}': {exc.message}"
            log.error("%s", entry.error)
        except Exception as exc:  # noqa: BLE001 - one bad model must not stop the server or the poll
            entry.config, entry.spec = None, None
            entry.error = f"model '{name}': cannot read {path}: {type(exc).__name__}: {exc}"
            log.exception("%s", entry.error)
        return entry

    def scan(self) -> dict[str, ModelEntry]:
        return {name: self.entry(name) for name in self.names()}
