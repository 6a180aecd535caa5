"""CPU per byte of the MACs a replication frame could carry, measured here, in-process.

Usage: ``.venv/bin/python bench/deploy/macspeed.py [--size 262144] [--seconds 1]``

Each MAC authenticates frames of ``--size`` bytes (a run of records is ~256 KiB, a
data frame 1 MiB) for about ``--seconds`` of CPU (``time.thread_time``), reported as
GB/s of CPU.  HMAC-SHA256 is the wire's MAC (``hashlib``: OpenSSL, SHA-NI where the
CPU has it); keyed BLAKE2b is in ``hashlib`` too; AES-256-GMAC and ChaCha20-Poly1305
(the frame as additional data, nothing encrypted) go through OpenSSL's EVP interface
and Poly1305 through libsodium, both with ctypes (the call overhead is nothing next to a
256 KiB frame).  A candidate is skipped with a note where its library is missing.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import hmac
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import load_sodium  # noqa: E402

KEY = os.urandom(32)


def rate(mac: Callable[[bytes], bytes], frame: bytes, seconds: float) -> float:
    """GB/s of CPU of ``mac`` over ``frame``."""
    mac(frame)
    count, start = 0, time.thread_time()
    while time.thread_time() - start < seconds:
        for _ in range(16):
            mac(frame)
        count += 16
    return count * len(frame) / (time.thread_time() - start) / 1e9


def evp_aead(cipher_name: bytes) -> Callable[[bytes], bytes] | None:
    """A MAC of the frame as AEAD additional data (nothing encrypted): GMAC for AES-GCM."""
    path = ctypes.util.find_library("crypto")
    if path is None:
        return None
    lib = ctypes.CDLL(path)
    lib.EVP_get_cipherbyname.restype = ctypes.c_void_p
    lib.EVP_get_cipherbyname.argtypes = [ctypes.c_char_p]
    lib.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
    lib.EVP_EncryptInit_ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_char_p, ctypes.c_char_p]
    lib.EVP_EncryptUpdate.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.POINTER(ctypes.c_int), ctypes.c_char_p,
                                      ctypes.c_int]
    lib.EVP_EncryptFinal_ex.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                        ctypes.POINTER(ctypes.c_int)]
    lib.EVP_CIPHER_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_void_p]
    cipher = lib.EVP_get_cipherbyname(cipher_name)
    if not cipher:
        return None
    ctx = lib.EVP_CIPHER_CTX_new()
    out_len = ctypes.c_int()
    tag = ctypes.create_string_buffer(16)
    final = ctypes.create_string_buffer(32)
    counter = [0]

    def mac(frame: bytes) -> bytes:
        counter[0] += 1
        nonce = counter[0].to_bytes(12, "little")  # a nonce per frame: a frame counter
        lib.EVP_EncryptInit_ex(ctx, cipher, None, KEY, nonce)
        lib.EVP_EncryptUpdate(ctx, None, ctypes.byref(out_len), frame, len(frame))
        lib.EVP_EncryptFinal_ex(ctx, final, ctypes.byref(out_len))
        lib.EVP_CIPHER_CTX_ctrl(ctx, 0x10, 16, tag)  # EVP_CTRL_AEAD_GET_TAG
        return tag.raw

    return mac


def sodium_poly1305() -> Callable[[bytes], bytes] | None:
    lib = load_sodium()
    if lib is None:
        return None
    out = ctypes.create_string_buffer(16)
    lib.crypto_onetimeauth_poly1305.argtypes = [ctypes.c_char_p, ctypes.c_char_p,
                                                ctypes.c_ulonglong, ctypes.c_char_p]

    def mac(frame: bytes) -> bytes:  # (a real wire derives a one-time key per frame)
        lib.crypto_onetimeauth_poly1305(out, frame, len(frame), KEY)
        return out.raw

    return mac


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256 << 10)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    frame = os.urandom(args.size)
    candidates: dict[str, Callable[[bytes], bytes] | None] = {
        "hmac-sha256 (the wire's)": lambda f: hmac.new(KEY, f, hashlib.sha256).digest(),
        "blake2b keyed (hashlib)": lambda f: hashlib.blake2b(f, key=KEY).digest(),
        "aes-256-gmac (libcrypto)": evp_aead(b"aes-256-gcm"),
        "chacha20-poly1305 aad (libcrypto)": evp_aead(b"chacha20-poly1305"),
        "poly1305 (libsodium)": sodium_poly1305(),
    }
    for name, mac in candidates.items():
        result = {"mac": name, "frame_bytes": args.size}
        if mac is None:
            result["note"] = "library not found"
        else:
            result["gb_per_cpu_s"] = round(rate(mac, frame, args.seconds), 2)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
