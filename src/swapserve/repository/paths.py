"""The one place a model name, a version or a file a config names becomes a path.

Nothing below the repository root is opened from a caller's string (an RPC, a control verb)
or from a string in a model's files (config.pbtxt, monitoring.yaml) without passing here:

* a model name matches :data:`MODEL_NAME` (letters, digits, ``_ . -``, starting with a letter
  or digit, at most 128 characters) and holds no ``..``, so it is one directory entry, never a
  path: no separators, no absolute paths, no parent references, no length that makes the OS
  answer ENAMETOOLONG;
* a version is a positive integer below 2**63 (the registry's column);
* a file a config names is relative and, with every symlink resolved, stays inside the directory
  it is relative to; so is a model directory inside the repository and a version directory
  inside its model directory.

A caller's bad name is :class:`~swapserve.errors.InvalidInput` (INVALID_ARGUMENT) whose message
says what is allowed; a model whose own files point outside gets the same message as the reason
it is UNAVAILABLE (the repository turns it into the entry's error).
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from swapserve.errors import InvalidInput

#: A model name: one directory entry of the repository.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MODEL_NAME_RULE = ("model names are 1-128 characters of letters, digits, '_', '.' and '-', start with a letter "
                   "or a digit and contain no '..'")
#: Versions are registry integers (BIGINT).
MAX_VERSION = 2**63 - 1


def _show(text: str, limit: int = 80) -> str:
    """A caller's string fit for a message: repr (no control characters), cut to ``limit``."""
    shown = repr(text[:limit])
    return shown + (f" (and {len(text) - limit} more characters)" if len(text) > limit else "")


def check_model_name(name: object) -> str:
    """``name`` when it is a valid model name; InvalidInput naming the rule otherwise."""
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"a model name is required; {MODEL_NAME_RULE}")
    if MODEL_NAME.fullmatch(name) is None or ".." in name:
        raise InvalidInput(f"model name {_show(name)} is not allowed: {MODEL_NAME_RULE}")
    return name


def is_model_name(name: str) -> bool:
    return MODEL_NAME.fullmatch(name) is not None and ".." not in name


def check_version(version: object, model: str = "") -> int:
    """``version`` as an int when it is a positive integer (an int, or a string of decimal digits)."""
    where = f"model '{model}': " if model else ""
    value: int | None = None
    if isinstance(version, bool):
        value = None
    elif isinstance(version, int):
        value = version
    elif isinstance(version, str) and version.isascii() and version.isdigit() and len(version) <= 19:
        value = int(version)
    if value is None or not 1 <= value <= MAX_VERSION:
        raise InvalidInput(f"{where}version {_show(str(version))} is not allowed: versions are positive integers "
                           f"(1 to {MAX_VERSION})")
    return value


def version_of_dirname(dirname: str) -> int | None:
    """The version a directory name stands for (``"3"`` -> 3), None for anything else (``"0"``,
    ``"01"``, ``"x"``): only canonical positive integers are version directories."""
    if not (dirname.isascii() and dirname.isdigit()) or dirname.startswith("0") or len(dirname) > 19:
        return None
    value = int(dirname)
    return value if value <= MAX_VERSION else None


def inside(base: Path, relative: str, *, what: str) -> Path:
    """``base / relative``, resolved, when it stays inside ``base`` (symlinks followed).

    ``relative`` must be a relative path without ``..`` components; ``what`` names it in the
    message ("model_warmup input_data_file", "default_model_filename"). Raises InvalidInput.
    The path need not exist; a symlink whose target is outside ``base`` is refused whether its
    target exists or not.
    """
    if not relative or "\x00" in relative:
        raise InvalidInput(f"{what} {_show(relative)} is not allowed: name a file inside {base}")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or Path(relative).is_absolute() or ".." in pure.parts or "\\" in relative:
        raise InvalidInput(f"{what} {_show(relative)} is not allowed: it must be a relative path inside {base} "
                           "without '..' or a leading '/'")
    root = base.resolve()
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise InvalidInput(f"{what} {_show(relative)} resolves to {target}, outside {root} (a symlink out of it); "
                           "files a model uses must lie inside its directory")
    return target


def model_directory(root: Path, name: str) -> Path:
    """The directory of model ``name`` under the repository ``root`` (resolved). InvalidInput for a
    name that is not allowed or a directory that resolves outside ``root`` (a symlink out)."""
    check_model_name(name)
    return inside(root, name, what=f"model '{name}' directory")
