"""gRPC front ends. Only this package (and repository/, for config.pbtxt) touches generated protobuf code.

Why swapserve compiles its own copy of the ``inference`` protos instead of reusing
tritonclient's generated modules: the server must not depend on a client library,
and protobuf's process-wide descriptor pool refuses a second definition of the same
symbols (SeldonIO/MLServer#1730). So the server and every tritonclient user (tests,
the bench harness' tritonclient mode) live in different processes; the protos are
kept wire-identical, which tests/e2e/test_wire_compat.py checks field by field.
"""
