"""Decoding ModelInferRequest: typed contents are size-checked before any value is decoded."""
from __future__ import annotations

import numpy as np
import pytest

from swapserve._proto import grpc_service_pb2 as pb
from swapserve.errors import InvalidInput, ResourceExhausted
from swapserve.server import converters


def typed(datatype: str, field: str, shape: list[int], values: list[int] | list[float]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    getattr(req.inputs.add(name="x", datatype=datatype, shape=shape).contents, field).extend(values)
    return req


def test_typed_contents_decode_in_steps_to_the_same_values() -> None:
    values = list(range(-20_000, 20_001))  # more than one decode step
    req = typed("INT64", "int64_contents", [len(values)], values)
    stubs = converters.infer_request_from_pb(req, decode=False).inputs
    assert stubs[0].data.size == len(values) and stubs[0].data.dtype == np.int64
    assert converters.typed_contents_bytes(stubs) == 8 * len(values)
    decoded = converters.decode_typed_inputs(req, stubs)
    np.testing.assert_array_equal(decoded[0].data, np.array(values, np.int64))
    np.testing.assert_array_equal(converters.infer_request_from_pb(req).inputs[0].data, decoded[0].data)


def test_typed_contents_over_the_limit_are_refused_before_decoding() -> None:
    n = converters.MAX_TYPED_CONTENTS_BYTES // 4 + 1
    req = typed("FP32", "fp32_contents", [n], [0.0] * n)
    with pytest.raises(ResourceExhausted, match="raw_input_contents"):
        converters.infer_request_from_pb(req, decode=False)


def test_a_typed_value_out_of_range_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="input .x. has a value that does not fit INT8"):
        converters.infer_request_from_pb(typed("INT8", "int_contents", [2], [1, 300]))
