"""Triton-style model repository: layout, config.pbtxt parsing and validation, version policy.

This package reads config.pbtxt through the ``inference.ModelConfig`` protobuf schema
(text format is protobuf's), which makes it the one place outside ``server/`` that
touches generated protobuf code. Everything it hands to the rest of the server is a
plain ``ModelSpec`` (swapserve.types); the parsed message is kept only so the
ModelConfig RPC can return it verbatim.
"""
from __future__ import annotations

from swapserve.repository.config import parse_config, spec_from_config
from swapserve.repository.repository import ModelEntry, ModelRepository

__all__ = ["ModelEntry", "ModelRepository", "parse_config", "spec_from_config"]
