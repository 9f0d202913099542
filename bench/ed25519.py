"""Ed25519 verification: OpenSSL (``cryptography``) against libsodium (PyNaCl), on a
manifest-sized message, in one run. Decides which one ``schemas.signatures`` uses.

    .venv/bin/python -m bench.ed25519 [--rounds 20000]
"""

from __future__ import annotations

import argparse
import timeit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.signing import VerifyKey

MANIFEST_SIZED = b"m" * 900  # a signed manifest: ten digests and the event's names


def main(rounds: int) -> None:
    private = Ed25519PrivateKey.generate()
    public = private.public_key()
    signature = private.sign(MANIFEST_SIZED)
    sodium = VerifyKey(public.public_bytes_raw())
    if sodium.verify(MANIFEST_SIZED, signature) != MANIFEST_SIZED:
        raise SystemExit("FAILED: libsodium did not verify a good signature")
    openssl = timeit.timeit(lambda: public.verify(signature, MANIFEST_SIZED), number=rounds) / rounds
    nacl = timeit.timeit(lambda: sodium.verify(MANIFEST_SIZED, signature), number=rounds) / rounds
    print(f"Ed25519 verify, {len(MANIFEST_SIZED)}-byte message, {rounds} rounds each, one core")
    print(f"  cryptography (OpenSSL)  {openssl * 1e6:6.1f} µs  ({1 / openssl:8,.0f}/s)")
    print(f"  PyNaCl (libsodium)      {nacl * 1e6:6.1f} µs  ({1 / nacl:8,.0f}/s)")
    print(f"  ratio OpenSSL time / libsodium time: {openssl / nacl:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20_000)
    main(parser.parse_args().rounds)
