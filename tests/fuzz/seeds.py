"""(Re)write the committed seed corpus, tests/fuzz/corpus/<target>/, from each target's seeds().

    python -m tests.fuzz.seeds [TARGET...]

Files are named by content hash; inputs a fuzz run found worth keeping (regressions) can be
added beside them by hand, named ``regress-*``, and are never removed by this script.
"""
from __future__ import annotations

import hashlib
import sys

from tests.fuzz.targets import CORPUS, TARGETS, make_target


def write(name: str) -> int:
    d = CORPUS / name
    d.mkdir(parents=True, exist_ok=True)
    for p in d.glob("seed-*"):
        p.unlink()
    seeds = make_target(name).seeds()
    for data in seeds:
        (d / f"seed-{hashlib.sha1(data).hexdigest()[:12]}").write_bytes(data)
    return len(seeds)


def main(argv: list[str]) -> int:
    for name in argv or [*TARGETS, "net"]:
        print(f"{name}: {write(name)} seeds in {CORPUS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
