#!/usr/bin/env python3
"""Independent recomputation of dealledger chain hashes.

Reads tests/vectors/chain.json and recomputes, from the rules in docs/FORMAT.md
alone (no Rust code), every genesis hash, every entry hash and every stored
entry encoding (version 1). Exits non-zero on any mismatch.

Usage:  python3 tests/format/recompute.py [path/to/chain.json]
Needs:  pip install blake3
"""

import json
import struct
import sys
from pathlib import Path

try:
    from blake3 import blake3
except ImportError:  # pragma: no cover - environment problem, not a test result
    sys.exit("recompute.py needs the PyPI blake3 package: pip install blake3")

# docs/FORMAT.md, "Context strings".
GENESIS_CONTEXT = "dealledger 2026-11 genesis v1"
ENTRY_CONTEXT = "dealledger 2026-11 entry v1"
ENTRY_FORMAT_VERSION = 1

# docs/FORMAT.md, "Timestamp type codes".
TIMESTAMP_TYPE_CODES = {"NotAvailable": 0, "CreateTime": 1, "LogAppendTime": 2}


def u8(n):
    return struct.pack(">B", n)


def u32(n):
    return struct.pack(">I", n)


def i32(n):
    return struct.pack(">i", n)


def u64(n):
    return struct.pack(">Q", n)


def i64(n):
    return struct.pack(">q", n)


def length_prefixed(data):
    return u32(len(data)) + data


def optional(hex_or_null):
    """Presence byte 0 for null; 1, u32 BE length and bytes otherwise."""
    if hex_or_null is None:
        return u8(0)
    return u8(1) + length_prefixed(bytes.fromhex(hex_or_null))


def genesis_input(topic, partition):
    return length_prefixed(topic.encode("utf-8")) + i32(partition)


def entry_body(prev_hex, seq, record):
    """The canonical entry body: the entry-hash input, and stored bytes 1..n-32."""
    out = bytearray()
    out += bytes.fromhex(prev_hex)
    out += u64(seq)
    out += length_prefixed(record["topic"].encode("utf-8"))
    out += i32(record["partition"])
    out += i64(record["offset"])
    out += u8(TIMESTAMP_TYPE_CODES[record["timestamp_type"]])
    out += i64(record["timestamp_ms"])
    out += optional(record["key"])
    out += optional(record["value"])
    out += u32(len(record["headers"]))
    for header in record["headers"]:
        out += length_prefixed(header["name"].encode("utf-8"))
        out += optional(header["value"])
    return bytes(out)


def derive(context, data):
    return blake3(data, derive_key_context=context).hexdigest()


def main():
    default = Path(__file__).resolve().parent.parent / "vectors" / "chain.json"
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    vectors = json.loads(path.read_text(encoding="utf-8"))

    passed = 0
    failed = 0

    def check(what, expected, found):
        nonlocal passed, failed
        if expected == found:
            passed += 1
        else:
            failed += 1
            if isinstance(expected, str) and isinstance(found, str) and len(expected) > 64:
                at = next(
                    (i for i, (a, b) in enumerate(zip(expected, found)) if a != b),
                    min(len(expected), len(found)),
                ) // 2 * 2
                print(
                    f"FAIL {what}: hex differs from byte {at // 2} "
                    f"(vector {len(expected) // 2} bytes, recomputed {len(found) // 2}): "
                    f"vector ...{expected[at:at + 32]}..., recomputed ...{found[at:at + 32]}..."
                )
            else:
                print(f"FAIL {what}: vector says {expected}, recomputed {found}")

    check("genesis_context", vectors["genesis_context"], GENESIS_CONTEXT)
    check("entry_context", vectors["entry_context"], ENTRY_CONTEXT)
    check("entry_format_version", vectors["entry_format_version"], ENTRY_FORMAT_VERSION)

    for chain in vectors["chains"]:
        topic = chain["stream"]["topic"]
        partition = chain["stream"]["partition"]
        name = f"{topic}/{partition}"
        head = derive(GENESIS_CONTEXT, genesis_input(topic, partition))
        check(f"{name} genesis", chain["genesis"], head)
        last_offset = None
        for expected_seq, entry in enumerate(chain["entries"]):
            where = f"{name} seq {entry['seq']}"
            record = entry["record"]
            check(f"{where} seq", expected_seq, entry["seq"])
            check(f"{where} prev", entry["prev"], head)
            check(f"{where} stream", name, f"{record['topic']}/{record['partition']}")
            if last_offset is not None and record["offset"] <= last_offset:
                check(f"{where} offset increases", f"> {last_offset}", record["offset"])
            last_offset = record["offset"]
            body = entry_body(head, entry["seq"], record)
            digest = derive(ENTRY_CONTEXT, body)
            check(f"{where} hash", entry["hash"], digest)
            stored = u8(ENTRY_FORMAT_VERSION) + body + bytes.fromhex(digest)
            check(f"{where} encoded", entry["encoded"], stored.hex())
            head = digest

    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
