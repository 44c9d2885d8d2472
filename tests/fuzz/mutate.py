"""Mutators shared by the fuzz targets: a plain byte mutator (what libFuzzer does, in miniature,
for runs without atheris) and token-level text mutation for YAML and protobuf text format.

Every mutator is a pure function of its input and a ``random.Random``: a run is reproducible
from its seed, and the same functions serve atheris' custom mutator and the CI pass.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

#: Byte values and integers that tend to sit on boundaries.
_INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x22, 0x5B, 0x7B)
INTERESTING_INTS = (0, 1, -1, 2, 7, 8, 9, 16, 63, 64, 65, 127, 128, 255, 256, 1023, 1 << 16, (1 << 31) - 1, 1 << 31,
                    -(1 << 31), (1 << 32) - 1, 1 << 32, (1 << 53) + 1, (1 << 62), (1 << 63) - 1, -(1 << 63),
                    (1 << 64) - 1)

ByteMutator = Callable[[bytes, int], bytes]


def mutate_bytes(data: bytes, max_size: int, rng: random.Random, others: Sequence[bytes] = ()) -> bytes:
    """One to four random byte edits (flip, set, insert, erase, duplicate, splice), at most ``max_size`` long."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        n = len(buf)
        if op == 0 and n:
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.choice(_INTERESTING_BYTES) if rng.random() < 0.5 else rng.randrange(256)
        elif op == 2:
            i = rng.randint(0, n)
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and n:
            i = rng.randrange(n)
            del buf[i:i + rng.randint(1, 16)]
        elif op == 4 and n:
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 64))
            k = rng.randint(0, n)
            buf[k:k] = buf[i:j]
        elif op == 5 and others:
            other = rng.choice(others)
            if other:
                i = rng.randrange(len(other))
                cut = rng.randint(0, len(buf))
                buf = buf[:cut] + other[i:i + rng.randint(1, 128)]
        elif op == 6 and n >= 2:
            i, j = rng.randrange(n), rng.randrange(n)
            buf[i], buf[j] = buf[j], buf[i]
        elif op == 7 and n:
            # a varint-ish edit: protobuf lengths and tags are varints
            i = rng.randrange(n)
            buf[i:i + 1] = bytes([rng.choice((0x80, 0xFF, 0x01, 0x00))]) * rng.randint(1, 10)
    return bytes(buf[:max_size])


_TOKEN = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|\"(?:[^\"\\\n]|\\.)*\"|'[^'\n]*'|[A-Za-z_][A-Za-z0-9_.]*|\S")


def mutate_text(text: str, rng: random.Random, values: Sequence[str], keys: Sequence[str],
                snippets: Sequence[str]) -> str:
    """One to three token edits: a token replaced by an interesting value or key, a snippet inserted,
    a line duplicated, dropped or moved. Good at reaching validation code past the parser."""
    for _ in range(rng.randint(1, 3)):
        lines = text.split("\n")
        op = rng.randrange(7)
        if op <= 2:
            tokens = list(_TOKEN.finditer(text))
            if not tokens:
                text = rng.choice(snippets) if snippets else text
                continue
            m = rng.choice(tokens)
            pool = values if op < 2 or not keys else keys
            text = text[:m.start()] + rng.choice(pool) + text[m.end():]
        elif op == 3 and snippets:
            i = rng.randint(0, len(lines))
            lines.insert(i, rng.choice(snippets))
            text = "\n".join(lines)
        elif op == 4 and lines:
            i = rng.randrange(len(lines))
            lines.insert(rng.randint(0, len(lines)), lines[i])
            text = "\n".join(lines)
        elif op == 5 and len(lines) > 1:
            del lines[rng.randrange(len(lines))]
            text = "\n".join(lines)
        elif op == 6 and lines:
            i = rng.randrange(len(lines))
            indent = rng.choice(("", " ", "  ", "    ", "\t"))
            lines[i] = indent + lines[i].lstrip()
            text = "\n".join(lines)
    return text
