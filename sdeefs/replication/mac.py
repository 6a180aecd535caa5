"""The frame MAC of wire versions 8 and 9: AES-256-GMAC, through OpenSSL's libcrypto.

Every frame of a link is authenticated (``wire``); a cold stream authenticates every
byte of the user's upper twice (the sender, then the receiver).  HMAC-SHA256 (versions
up to 7) ran at 1.4 GB/s of CPU here, a sixth to a fifth of a cold stream's CPU;
AES-256-GMAC at 4.8-6 GB/s (``bench/deploy/macspeed.py``, bench/RESULTS.md, branch
coldfast).  Python's standard library has no GMAC, so it is OpenSSL's (``libcrypto``,
which Python's own ``hashlib`` and ``ssl`` are built on: present wherever sdeefs runs),
called through ``ctypes`` (the call costs a few microseconds; the GIL is released
while OpenSSL hashes, as ``hashlib`` does).

The 32-byte MAC field of a frame holds::

    nonce  12 bytes  see below
    tag    16 bytes  GMAC(key', nonce, header + payload): AES-256-GCM with the frame as
                     additional data and nothing encrypted
    zero    4 bytes

``key'`` = SHA-256(b"sdeefs-gmac" + key), key the HELLO key or the session key of the
link (``wire``).  The nonce of a frame under a session key (version 9) is its place on
the link (:func:`counted`): 4 bytes naming the direction (``wire.DOWN``: upstream to
replica, ``wire.UP``: replica to upstream), then the frame's number in that direction
on this connection (u64, from 0).  The receiver computes the nonce it expects next, so a
frame dropped, replayed or reordered on the path does not authenticate where it arrives
(``wire.LinkKey``).  That is also NIST SP 800-38D's deterministic construction: no nonce
repeats under a key (a session key lives for one connection and each direction has its
own label), with no bound on the number of frames.  The HELLOs and what answers them
before a session key exists (REDIRECT, an ERROR) are under the HELLO key (the answers
under one bound to the HELLO's nonce, ``wire.answer_key``), which a shared key makes
long-lived: they keep a random nonce (``os.urandom``, as every frame of
version 8; 2^32 frames per key), :func:`seal`.  Nothing of a frame is used before its
tag matched (``hmac.compare_digest``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import hmac
import os
import struct

NONCE_SIZE = 12
TAG_SIZE = 16
FIELD = NONCE_SIZE + TAG_SIZE + 4  # the MAC field of a frame (wire.MAC_SIZE)
_EVP_CTRL_AEAD_GET_TAG = 0x10
LABEL_SIZE = 4  # a counted nonce: the direction's label, then the frame's number
COUNT = struct.Struct("<Q")
assert LABEL_SIZE + COUNT.size == NONCE_SIZE
_Buffer = bytes | bytearray | memoryview


class MacUnavailable(Exception):
    """libcrypto (OpenSSL 1.1 or 3) cannot be loaded: this node cannot speak the wire."""


@functools.cache
def _crypto() -> tuple[ctypes.CDLL, int]:
    """libcrypto and its AES-256-GCM cipher, loaded once."""
    names = [n for n in (ctypes.util.find_library("crypto"), "libcrypto.so.3",
                         "libcrypto.so.1.1") if n]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.EVP_aes_256_gcm.restype = ctypes.c_void_p
        lib.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
        lib.EVP_CIPHER_CTX_free.argtypes = [ctypes.c_void_p]
        lib.EVP_EncryptInit_ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_char_p, ctypes.c_char_p]
        lib.EVP_EncryptUpdate.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.POINTER(ctypes.c_int), ctypes.c_void_p,
                                          ctypes.c_int]
        lib.EVP_EncryptFinal_ex.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                            ctypes.POINTER(ctypes.c_int)]
        lib.EVP_CIPHER_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                            ctypes.c_char_p]
        cipher = lib.EVP_aes_256_gcm()
        if cipher:
            return lib, cipher
    raise MacUnavailable("libcrypto (OpenSSL) cannot be loaded: replication needs it for "
                         "AES-GMAC")


@functools.lru_cache(maxsize=256)
def _derived(key: bytes) -> bytes:
    return hashlib.sha256(b"sdeefs-gmac" + key).digest()


derived = _derived  # key' of the module docstring (``wire``'s check in C takes it)


def _pointer(buf: _Buffer) -> object:
    """Something ctypes passes as a pointer to ``buf``'s bytes, without copying them
    (a read-only view is copied: not on a hot path)."""
    if isinstance(buf, bytes):
        return buf
    if isinstance(buf, memoryview) and buf.readonly:
        return bytes(buf)
    return (ctypes.c_char * len(buf)).from_buffer(buf)


def tag(key: bytes, nonce: bytes, *parts: _Buffer) -> bytes:
    """GMAC of ``parts`` (concatenated) under ``key`` and a 12-byte ``nonce``."""
    lib, cipher = _crypto()
    ctx = lib.EVP_CIPHER_CTX_new()
    if not ctx:
        raise MemoryError("EVP_CIPHER_CTX_new")
    try:
        length = ctypes.c_int()
        ok = lib.EVP_EncryptInit_ex(ctx, cipher, None, _derived(bytes(key)),
                                    bytes(nonce)) == 1
        for part in parts:
            if len(part):
                ok = ok and lib.EVP_EncryptUpdate(ctx, None, ctypes.byref(length),
                                                  _pointer(part), len(part)) == 1
        out = ctypes.create_string_buffer(TAG_SIZE)
        ok = ok and lib.EVP_EncryptFinal_ex(ctx, out, ctypes.byref(length)) == 1
        ok = ok and lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_AEAD_GET_TAG, TAG_SIZE, out) == 1
        if not ok:
            raise MacUnavailable("libcrypto failed to compute an AES-GMAC")
        return out.raw
    finally:
        lib.EVP_CIPHER_CTX_free(ctx)


def counted(label: bytes, number: int) -> bytes:
    """The nonce of frame ``number`` of a direction (``label``) of a link."""
    return label + COUNT.pack(number)


def number(nonce: bytes, label: bytes) -> int | None:
    """The frame number a counted nonce of direction ``label`` says (None: not one)."""
    if len(nonce) != NONCE_SIZE or nonce[:LABEL_SIZE] != label:
        return None
    return int(COUNT.unpack_from(nonce, LABEL_SIZE)[0])


def seal(key: bytes, *parts: _Buffer, nonce: bytes | None = None) -> bytes:
    """The MAC field (FIELD bytes) of a frame made of ``parts``, under ``nonce`` (a
    counted one, :func:`counted`) or a random one."""
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    return nonce + tag(key, nonce, *parts) + bytes(4)


def matches(key: bytes, field: _Buffer, *parts: _Buffer) -> bool:
    """Does ``field`` (a frame's MAC field) authenticate ``parts`` under ``key``, with the
    nonce it carries?  (A frame under a session key must carry the nonce its receiver
    expects: ``wire.LinkKey`` checks that first.)"""
    field = bytes(field)
    if len(field) != FIELD or field[NONCE_SIZE + TAG_SIZE:] != bytes(4):
        return False
    want = tag(key, field[:NONCE_SIZE], *parts)
    return hmac.compare_digest(want, field[NONCE_SIZE:NONCE_SIZE + TAG_SIZE])
