#!/usr/bin/env python3
"""Independent reference for Tidelock's block-hash chain rule.

This is how the golden vectors in crates/protocol/src/hash.rs were produced. It builds every
hashed byte string by hand (struct.pack('<I', t) for token ids) and uses the Python `blake3`
package, so it shares no code with the Rust implementation. Run it with:

    python3 -m pip install blake3
    python3 crates/protocol/tests/golden/gen_golden.py

Changing the rule (root string, separator, salt handling, byte order, truncation) is a contract
change: update DESIGN.md, regenerate with this script, and paste the new values deliberately.
"""

import struct

from blake3 import blake3


def root(model: str, salt: str) -> bytes:
    data = b"tidelock/v1" + model.encode("utf-8") + b"\x00" + salt.encode("utf-8")
    return blake3(data).digest()[:16]


def chain(parent: bytes, tokens) -> bytes:
    assert len(parent) == 16
    data = parent + b"".join(struct.pack("<I", t) for t in tokens)
    return blake3(data).digest()[:16]


def block_hashes(model: str, salt: str, tokens, block_tokens: int):
    out = []
    parent = root(model, salt)
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        parent = chain(parent, tokens[start:start + block_tokens])
        out.append(parent)
    return out


def main():
    model = "SmolLM2-135M-Instruct"
    r_shared = root(model, "")
    r_tenant = root(model, "tenant-a")
    print(f"root({model!r}, '')         = {r_shared.hex()}")
    print(f"root({model!r}, 'tenant-a') = {r_tenant.hex()}")
    print(f"chain(root shared, [1,2,3,4]) = {chain(r_shared, [1, 2, 3, 4]).hex()}")
    print(f"chain(root tenant-a, [1,2,3,4]) = {chain(r_tenant, [1, 2, 3, 4]).hex()}")

    print(f"root('m', 's') = {root('m', 's').hex()}")
    for i, h in enumerate(block_hashes("m", "s", list(range(130)), 64)):
        print(f"block_hashes('m', 's', 0..130, 64)[{i}] = {h.hex()}")

    wide = [0x01020304, 4294967295, 0, 1 << 24]
    print(f"block_hashes('m', 's', {[hex(t) for t in wide]}, 4)[0] = "
          f"{block_hashes('m', 's', wide, 4)[0].hex()}")

    print(f"root('ab', 'c') = {root('ab', 'c').hex()}")
    print(f"root('a', 'bc') = {root('a', 'bc').hex()}")

    # Stored form of an API key (TenantRecord::hash_api_key): full 32-byte BLAKE3, hex.
    print(f"hash_api_key('sk-test') = {blake3(b'sk-test').hexdigest()}")


if __name__ == "__main__":
    main()
