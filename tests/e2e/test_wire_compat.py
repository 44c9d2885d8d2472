"""swapserve's compiled protos are wire-identical to tritonclient's (names, numbers, types, methods).

The two copies cannot be imported into one process (protobuf's descriptor pool refuses
duplicate symbols), so each is dumped by its own subprocess and the dumps compared.
"""
from __future__ import annotations

import json
import subprocess
import sys

DUMP = r"""
import json, sys
def walk(fd):
    out = []
    def msg(m):
        for f in m.fields:
            out.append([m.full_name, f.name, f.number, f.type, f.is_repeated,
                        f.message_type.full_name if f.message_type else "", f.enum_type.full_name if f.enum_type else ""])
        for n in m.nested_types:
            msg(n)
    for m in fd.message_types_by_name.values():
        msg(m)
    for e in fd.enum_types_by_name.values():
        out += [[e.full_name, v.name, v.number] for v in e.values]
    for s in fd.services_by_name.values():
        out += [[s.full_name, x.name, x.input_type.full_name, x.output_type.full_name,
                 x.client_streaming, x.server_streaming] for x in s.methods]
    return sorted(json.dumps(o) for o in out)
if sys.argv[1] == "tritonclient":
    from tritonclient.grpc import service_pb2 as s, model_config_pb2 as c
else:
    from swapserve._proto import grpc_service_pb2 as s, model_config_pb2 as c
print(json.dumps(walk(s.DESCRIPTOR) + walk(c.DESCRIPTOR)))
"""


def dump(which: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", DUMP, which], check=True, capture_output=True, text=True).stdout
    return list(json.loads(out))


def test_protos_match_tritonclient_field_by_field() -> None:
    ours, theirs = dump("swapserve"), dump("tritonclient")
    assert len(theirs) > 300  # every message, field, enum value and method
    assert sorted(set(theirs) - set(ours)) == []
    assert sorted(set(ours) - set(theirs)) == []
