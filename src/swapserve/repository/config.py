"""config.pbtxt -> validated ``ModelSpec``.

Validation rejects what swapserve cannot serve faithfully (sequence batching,
ensembles, unknown platforms, inconsistent shapes) with a message that names the
model, the field and the fix. A model whose config fails is marked UNAVAILABLE
with that message; other models are unaffected.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from swapserve import dtypes
from swapserve._proto import model_config_pb2 as mc
from swapserve.config import parse_bytes
from swapserve.errors import ConfigError, InvalidInput
from swapserve.repository.paths import inside
from swapserve.types import (
    DynamicBatching,
    ModelSpec,
    TensorSpec,
    VersionPolicy,
    VersionPolicyKind,
    WarmupSample,
)

#: Triton backend names -> platform names, and the model file each expects by default.
PLATFORMS: dict[str, str] = {"pytorch": "pytorch_libtorch", "onnxruntime": "onnxruntime_onnx"}
DEFAULT_FILENAMES: dict[str, str] = {"pytorch_libtorch": "model.pt", "onnxruntime_onnx": "model.onnx"}
#: Largest warmup sample (all its inputs together): a config cannot make the server allocate more.
MAX_WARMUP_SAMPLE_BYTES = 64 * 1024 * 1024
#: Largest config.pbtxt read (Triton's are a few KiB).
MAX_CONFIG_BYTES = 1024 * 1024
#: Most runtime worker threads one version may ask for (``instance_group.count``, summed).
MAX_INSTANCE_COUNT = 64
#: Most times one warmup sample may run (``model_warmup.count``): loading must end.
MAX_WARMUP_COUNT = 1000
#: Longest ``dynamic_batching.max_queue_delay_microseconds`` (one minute): a request waits at most
#: this long for company. The field is a uint64; the native batcher counts in int64 nanoseconds.
MAX_QUEUE_DELAY_US = 60_000_000
#: The config parameter that sets a model's bound on queued input bytes ("512MiB", "1GiB", bytes).
MAX_QUEUE_BYTES_PARAMETER = "swapserve.max_queue_bytes"


def parse_config(model_dir: Path) -> mc.ModelConfig:
    """Parse ``model_dir/config.pbtxt``; ConfigError with the parser's line and column on failure."""
    path = model_dir / "config.pbtxt"
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"model '{model_dir.name}': {path} is larger than {MAX_CONFIG_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"model '{model_dir.name}': {path} is missing; every model directory needs a config.pbtxt") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"model '{model_dir.name}': {path} is not UTF-8 text (byte {exc.start}); "
                          "protobuf text format is UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"model '{model_dir.name}': cannot read {path}: {exc.strerror or exc}") from None
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ConfigError(f"model '{model_dir.name}': {path}: {exc}") from None
    except ValueError as exc:  # text_format's setattr of a value out of the field's range: no line number
        raise ConfigError(f"model '{model_dir.name}': {path}: {exc} (a number too large for its field?)") from None
    return config


def _infer_platform(config: mc.ModelConfig, model_dir: Path) -> str:
    if config.platform:
        if config.platform not in DEFAULT_FILENAMES:
            raise ConfigError(
                f"model '{config.name}': platform '{config.platform}' is not supported; "
                f"use one of {sorted(DEFAULT_FILENAMES)}"
            )
        return config.platform
    if config.backend:
        if config.backend not in PLATFORMS:
            raise ConfigError(
                f"model '{config.name}': backend '{config.backend}' is not supported; use one of {sorted(PLATFORMS)}"
            )
        return PLATFORMS[config.backend]
    # Like Triton's auto-complete: infer from the model files present.
    for platform, filename in DEFAULT_FILENAMES.items():
        if any((d / filename).exists() for d in model_dir.iterdir() if d.is_dir()):
            return platform
    raise ConfigError(
        f"model '{config.name}': config.pbtxt sets neither platform nor backend and no version directory holds "
        f"{' or '.join(DEFAULT_FILENAMES.values())}; set platform: \"pytorch_libtorch\" or \"onnxruntime_onnx\""
    )


def _enum_name(model: str, enum: object, value: int, what: str) -> str:
    """The name of ``value`` in a protobuf ``enum``; ConfigError for a number the enum does not
    define (text format accepts any number for an open enum: ``data_type: 999``)."""
    try:
        return enum.Name(value)  # type: ignore[attr-defined, no-any-return]
    except ValueError:
        names = ", ".join(enum.keys())  # type: ignore[attr-defined]
        raise ConfigError(f"model '{model}': {what} {value} is not a known value; use one of {names}") from None


def _wire_dtype(model: str, data_type: int, what: str) -> tuple[str, np.dtype]:
    """The wire datatype and numpy dtype of a fixed-size config ``data_type``; ConfigError otherwise."""
    enum_name = _enum_name(model, mc.DataType, data_type, f"{what} data_type")
    wire = dtypes.from_config(enum_name)
    if wire not in dtypes.NUMPY:
        raise ConfigError(f"model '{model}': {what} has data_type {enum_name}; give a fixed-size type such as TYPE_FP32")
    return wire, dtypes.numpy_dtype(wire)


def _tensor(model: str, kind: str, name: str, data_type: int, dims: list[int], reshape: list[int] | None,
            optional: bool) -> TensorSpec:
    if not name:
        raise ConfigError(f"model '{model}': an {kind} has no name")
    enum_name = _enum_name(model, mc.DataType, data_type, f"{kind} '{name}' data_type")
    if enum_name == "TYPE_INVALID":
        raise ConfigError(f"model '{model}': {kind} '{name}' has no data_type; set e.g. data_type: TYPE_FP32")
    wire = dtypes.from_config(enum_name)
    if wire == "BYTES":
        raise ConfigError(f"model '{model}': {kind} '{name}' is TYPE_STRING; swapserve's backends serve fixed-size types only")
    if any(d < -1 or d == 0 for d in dims):
        raise ConfigError(f"model '{model}': {kind} '{name}' dims {list(dims)} must be positive or -1 (variable)")
    if reshape is not None:
        fixed = all(d > 0 for d in dims) and all(d > 0 for d in reshape)
        if fixed and math.prod(dims) != math.prod(reshape):
            raise ConfigError(
                f"model '{model}': {kind} '{name}' reshape {list(reshape)} has {math.prod(reshape)} elements "
                f"but dims {list(dims)} have {math.prod(dims)}"
            )
    return TensorSpec(name, wire, tuple(dims), tuple(reshape) if reshape is not None else None, optional)


def _version_policy(config: mc.ModelConfig) -> VersionPolicy:
    which = config.version_policy.WhichOneof("policy_choice")
    if which == "all":
        return VersionPolicy(VersionPolicyKind.ALL)
    if which == "specific":
        return VersionPolicy(VersionPolicyKind.SPECIFIC, specific=tuple(config.version_policy.specific.versions))
    if which == "latest":
        n = config.version_policy.latest.num_versions
        if n < 1:
            raise ConfigError(f"model '{config.name}': version_policy latest.num_versions must be at least 1")
        return VersionPolicy(VersionPolicyKind.LATEST, latest=n)
    return VersionPolicy()


def _warmup(config: mc.ModelConfig, spec_inputs: dict[str, TensorSpec], model_dir: Path) -> tuple[WarmupSample, ...]:
    samples = []
    rng = np.random.default_rng(0)
    for w in config.model_warmup:
        batch = max(1, w.batch_size)
        arrays: dict[str, np.ndarray] = {}
        size = 0
        for name, inp in w.inputs.items():
            if name not in spec_inputs:
                raise ConfigError(f"model '{config.name}': model_warmup '{w.name}' names unknown input '{name}'")
            _, dtype = _wire_dtype(config.name, inp.data_type, f"model_warmup '{w.name}' input '{name}'")
            if dtype != dtypes.numpy_dtype(spec_inputs[name].datatype):
                raise ConfigError(f"model '{config.name}': model_warmup '{w.name}' gives input '{name}' "
                                  f"{mc.DataType.Name(inp.data_type)}, but the input is "
                                  f"{dtypes.to_config(spec_inputs[name].datatype)}")
            if any(d < 1 for d in inp.dims):
                raise ConfigError(f"model '{config.name}': model_warmup '{w.name}' input '{name}' dims "
                                  f"{list(inp.dims)} must all be positive (a warmup sample has a fixed shape)")
            if config.max_batch_size > 0 and batch > config.max_batch_size:
                raise ConfigError(f"model '{config.name}': model_warmup '{w.name}' batch_size {batch} is larger "
                                  f"than max_batch_size {config.max_batch_size}")
            shape = ((batch,) if config.max_batch_size > 0 else ()) + tuple(inp.dims)
            size += math.prod(shape) * dtype.itemsize
            if size > MAX_WARMUP_SAMPLE_BYTES:
                raise ConfigError(f"model '{config.name}': model_warmup '{w.name}' needs {size} bytes, more than "
                                  f"the {MAX_WARMUP_SAMPLE_BYTES} a warmup sample may use; make it smaller")
            source = inp.WhichOneof("input_data_type")
            if source == "random_data":
                arrays[name] = (rng.random(shape) * 10).astype(dtype)
            elif source == "input_data_file":
                try:
                    file = inside(model_dir / "warmup", inp.input_data_file,
                                  what=f"model_warmup '{w.name}' input '{name}' input_data_file")
                except InvalidInput as exc:
                    raise ConfigError(f"model '{config.name}': {exc.message}") from None
                expected = math.prod(shape) * dtype.itemsize
                if not file.is_file():
                    raise ConfigError(f"model '{config.name}': model_warmup '{w.name}' input '{name}': "
                                      f"input_data_file {file} is missing (it is read from {model_dir / 'warmup'})")
                if file.stat().st_size != expected:
                    raise ConfigError(f"model '{config.name}': model_warmup '{w.name}' input '{name}': "
                                      f"{file} holds {file.stat().st_size} bytes; shape {list(shape)} of "
                                      f"{dtypes.to_config(spec_inputs[name].datatype)} needs {expected}")
                arrays[name] = np.frombuffer(file.read_bytes(), dtype=dtype).reshape(shape)
            else:
                arrays[name] = np.zeros(shape, dtype=dtype)
        if w.count > MAX_WARMUP_COUNT:
            raise ConfigError(f"model '{config.name}': model_warmup '{w.name}' count {w.count} is more than "
                              f"{MAX_WARMUP_COUNT}")
        samples.append(WarmupSample(w.name, batch, arrays, max(1, w.count)))
    return tuple(samples)


def spec_from_config(config: mc.ModelConfig, model_dir: Path) -> ModelSpec:
    """Validate ``config`` (filling Triton's defaults in place) and return the model's spec.

    Raises ConfigError naming the model and the offending field.
    """
    name = model_dir.name
    if not config.name:
        config.name = name
    elif config.name != name:
        raise ConfigError(f"model '{name}': config.pbtxt name '{config.name}' must match its directory name '{name}'")
    platform = _infer_platform(config, model_dir)
    config.platform = platform
    if config.max_batch_size < 0:
        raise ConfigError(f"model '{name}': max_batch_size must be >= 0 (0 disables batching)")
    if config.HasField("sequence_batching") or config.HasField("ensemble_scheduling"):
        raise ConfigError(f"model '{name}': sequence batching and ensembles are not supported by swapserve")
    if not config.input or not config.output:
        raise ConfigError(f"model '{name}': config.pbtxt must declare at least one input and one output")
    inputs = tuple(
        _tensor(name, "input", i.name, i.data_type, list(i.dims), list(i.reshape.shape) if i.HasField("reshape") else None,
                i.optional)
        for i in config.input
    )
    outputs = tuple(
        _tensor(name, "output", o.name, o.data_type, list(o.dims), list(o.reshape.shape) if o.HasField("reshape") else None,
                False)
        for o in config.output
    )
    for kind, tensors in (("input", inputs), ("output", outputs)):
        seen = [t.name for t in tensors]
        dup = {n for n in seen if seen.count(n) > 1}
        if dup:
            raise ConfigError(f"model '{name}': duplicate {kind} name(s) {sorted(dup)}")
    batching = None
    if config.HasField("dynamic_batching"):
        db = config.dynamic_batching
        if config.max_batch_size == 0:
            raise ConfigError(f"model '{name}': dynamic_batching needs max_batch_size > 0")
        bad = [p for p in db.preferred_batch_size if p < 1 or p > config.max_batch_size]
        if bad:
            raise ConfigError(
                f"model '{name}': preferred_batch_size {bad} must lie between 1 and max_batch_size {config.max_batch_size}"
            )
        if db.max_queue_delay_microseconds > MAX_QUEUE_DELAY_US:
            raise ConfigError(f"model '{name}': dynamic_batching max_queue_delay_microseconds "
                              f"{db.max_queue_delay_microseconds} is more than {MAX_QUEUE_DELAY_US} (one minute); "
                              "a request waits at most that long for a batch to fill")
        batching = DynamicBatching(
            preferred_batch_sizes=tuple(sorted(set(db.preferred_batch_size))),
            max_queue_delay_us=int(db.max_queue_delay_microseconds),
            max_queue_size=int(db.default_queue_policy.max_queue_size),
        )
    negative = [g.count for g in config.instance_group if g.count < 0]
    if negative:
        raise ConfigError(f"model '{name}': instance_group count {negative[0]} is negative; give a count >= 1 "
                          "(or leave it out for one instance)")
    count = sum(g.count or 1 for g in config.instance_group) or 1
    if count > MAX_INSTANCE_COUNT:
        raise ConfigError(f"model '{name}': instance_group asks for {count} instances; at most {MAX_INSTANCE_COUNT} "
                          "(each is a runtime worker thread)")
    kinds = {_enum_name(name, mc.ModelInstanceGroup.Kind, g.kind, "instance_group kind") for g in config.instance_group}
    filename = config.default_model_filename or DEFAULT_FILENAMES[platform]
    try:  # where it resolves is checked again in each version directory, when the file is opened
        inside(model_dir, filename, what="default_model_filename")
    except InvalidInput as exc:
        raise ConfigError(f"model '{name}': {exc.message}") from None
    if not config.instance_group:
        config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_AUTO)
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    max_queue_bytes = _max_queue_bytes(name, parameters.get(MAX_QUEUE_BYTES_PARAMETER))
    spec_inputs = {t.name: t for t in inputs}
    return ModelSpec(
        name=name,
        platform=platform,
        max_batch_size=int(config.max_batch_size),
        inputs=inputs,
        outputs=outputs,
        version_policy=_version_policy(config),
        dynamic_batching=batching,
        instance_count=count,
        instance_kind=kinds.pop() if len(kinds) == 1 else "KIND_AUTO",
        default_model_filename=filename,
        parameters=parameters,
        warmup=_warmup(config, spec_inputs, model_dir),
        max_queue_bytes=max_queue_bytes,
    )


def _max_queue_bytes(model: str, text: str | None) -> int:
    """The model's own bound on queued input bytes (parameter ``swapserve.max_queue_bytes``), 0 for
    the server's (``--max-queue-bytes``)."""
    if text is None:
        return 0
    try:
        value = parse_bytes(text)
    except ValueError as exc:
        raise ConfigError(f"model '{model}': parameter {MAX_QUEUE_BYTES_PARAMETER}: {exc}") from None
    if value < 1:
        raise ConfigError(f"model '{model}': parameter {MAX_QUEUE_BYTES_PARAMETER} must be at least 1 byte "
                          "(leave it out for the server's --max-queue-bytes)")
    return value
