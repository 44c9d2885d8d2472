"""The one request validator: a decoded request against the configuration of the version that will run it.

Every check of a request against config.pbtxt happens here, once, before the request is
queued; the batcher and the backends trust the result (``server/converters.py`` only decodes
the wire format: known datatypes, byte counts). Every message names the model, the input and
what was expected, so a person can fix the client without reading server code.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from swapserve import dtypes
from swapserve.errors import InvalidInput
from swapserve.types import InferRequest, ModelSpec


def _dims_match(expected: tuple[int, ...], got: tuple[int, ...]) -> bool:
    return len(expected) == len(got) and all(e == -1 or e == g for e, g in zip(expected, got))


def validate(spec: ModelSpec, version: int, req: InferRequest, *,
             materialize: bool = True) -> tuple[list[np.ndarray | None], int]:
    """Return the request's arrays in config input order and its batch size (1 when not batching).

    ``materialize=False`` checks only (the arrays list comes back empty): the tensors' data may then
    be stand-ins that carry only a dtype and an element count (``np.broadcast_to``), so a request can
    be checked before its data is decoded (typed contents, see ``DataPlane.check``).

    Guarantees, which the batcher and the backends rely on instead of checking again: every
    array is C-contiguous, has its input's configured dtype (``swapserve.dtypes``) and shape
    ``[batch, *dims]`` (``dims`` when the model does not batch) with variable dims filled in,
    1 <= batch <= max_batch_size and the same batch for every input; an entry is None only
    for an input config.pbtxt marks ``optional`` that the request leaves out (as in Triton).
    Requested outputs exist and each is named once (a response holds every requested output
    once: repeating a name would multiply the response's size, not its information).

    Raises InvalidInput for unknown, missing (required) or duplicate inputs, wrong datatypes,
    shapes or element counts, a batch over max_batch_size, and unknown or repeated requested outputs.
    """
    where = f"model '{spec.name}' version {version}"
    by_name = {}
    for t in req.inputs:
        if t.name in by_name:
            raise InvalidInput(f"{where}: input '{t.name}' appears twice in the request")
        if spec.input(t.name) is None:
            raise InvalidInput(f"{where}: unexpected input '{t.name}'; the model's inputs are "
                               f"{[t.name for t in spec.inputs]}")
        by_name[t.name] = t
    if len(by_name) != len(spec.inputs):
        missing = [ts.name for ts in spec.inputs if ts.name not in by_name and not ts.optional]
        if missing:
            raise InvalidInput(f"{where}: missing input(s) {missing}; the model's inputs are "
                               f"{[t.name for t in spec.inputs]}")
    arrays: list[np.ndarray | None] = []
    batch: int | None = None
    for ts in spec.inputs:
        t = by_name.get(ts.name)
        if t is None:
            arrays.append(None)  # an optional input left out (checked above)
            continue
        if t.datatype != ts.datatype:
            raise InvalidInput(f"{where}: input '{t.name}' has datatype {t.datatype}, expected {ts.datatype}")
        if t.data.dtype != dtypes.NUMPY[ts.datatype]:
            raise InvalidInput(f"{where}: input '{t.name}' holds {t.data.dtype} data, but {ts.datatype} is "
                               f"{dtypes.NUMPY[ts.datatype]}; send the data in the declared datatype")
        shape = tuple(t.shape)
        if spec.batching:
            full = (-1, *ts.dims)
            if not shape or not _dims_match(full, shape):
                raise InvalidInput(f"{where}: input '{t.name}' has shape {list(shape)}, expected "
                                   f"[batch, {', '.join(map(str, ts.dims))}] with batch <= {spec.max_batch_size}")
            if shape[0] < 1 or shape[0] > spec.max_batch_size:
                raise InvalidInput(f"{where}: input '{t.name}' has batch size {shape[0]}, which exceeds "
                                   f"max_batch_size {spec.max_batch_size}; split the request" if shape[0] > 1 else
                                   f"{where}: input '{t.name}' has batch size {shape[0]}; it must be at least 1")
            if batch is None:
                batch = shape[0]
            elif shape[0] != batch:
                raise InvalidInput(f"{where}: inputs disagree on the batch size ({batch} vs {shape[0]} for "
                                   f"'{t.name}'); every input needs the same leading dimension")
        elif not _dims_match(ts.dims, shape):
            raise InvalidInput(f"{where}: input '{t.name}' has shape {list(shape)}, expected {list(ts.dims)}")
        if t.data.size != math.prod(shape):
            raise InvalidInput(f"{where}: input '{t.name}' carries {t.data.size} elements but shape {list(shape)} "
                               f"needs {math.prod(shape)}")
        if materialize:
            arrays.append(np.ascontiguousarray(t.data).reshape(shape))
    if req.outputs is not None:
        names = [o.name for o in spec.outputs]
        unknown = [o for o in req.outputs if o not in names]
        if unknown:
            raise InvalidInput(f"{where}: unknown requested output(s) {unknown}; the model's outputs are {names}")
        if len(set(req.outputs)) != len(req.outputs):
            repeated = sorted(o for o, n in Counter(req.outputs).items() if n > 1)
            raise InvalidInput(f"{where}: requested output(s) {repeated} appear more than once; "
                               "request each output once")
    return arrays, (batch if batch is not None else 1)
