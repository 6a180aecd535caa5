"""How two replicads know each other: a MUNGE credential in the HELLO, or a shared key.

SLURM sites run ``munged`` on every node with one realm key; ``auth = "munge"`` uses it,
so no replication key has to be distributed.  The replica's HELLO carries a credential
whose payload is::

    HELLO_LABEL (24 bytes) + K (32 random bytes)

encoded by its munged for decoding by uid 0 only (MUNGE_OPT_UID_RESTRICTION: a user who
captures a HELLO cannot read K with their own munged).  The upstream has its munged
decode it and accepts only a credential that

* decodes (same realm: a foreign realm's key fails, EMUNGE_CRED_INVALID),
* was not decoded before (munged's replay cache: EMUNGE_CRED_REPLAYED), nor expired,
* was made by uid 0 (a replicad; a user's credential says their own uid),
* carries the label and a 32-byte K.

K then plays the role the shared key plays with ``auth = "key"``: both HELLOs are
MAC'd with it and the session key is derived from it (``wire.session_key``), so the
upstream's answer proves it could decode the credential.  With ``auth = "key"`` the
credential is empty and K is the shared key.  ``sdeefs.config`` says which a node uses
(``auto``: the key when the key file exists, MUNGE otherwise); both ends of a link must
agree, which ``sdeefs doctor`` checks.

libmunge is called through ctypes (``libmunge.so.2``, Debian's libmunge2): encode and
decode block on munged's socket, so callers run them through their Offload.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import secrets
from typing import Protocol

import attrs

from ..errors import ExitCode, QuietError
from ..offload import Offload

HELLO_LABEL = b"sdeefs-replication-hello"
assert len(HELLO_LABEL) == 24
K_SIZE = 32
MAX_CREDENTIAL = 4096  # bytes of a credential in a HELLO (ours are ~200)
CREDENTIAL_TTL = 60  # seconds a HELLO's credential stays valid

# munge.h (libmunge-dev 0.5.15), pinned: option and error numbers of the stable ABI.
MUNGE_OPT_TTL = 4
MUNGE_OPT_SOCKET = 8
MUNGE_OPT_UID_RESTRICTION = 9
EMUNGE_SUCCESS = 0


class MungeUnavailable(QuietError):
    """libmunge or munged cannot be used on this node."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.UNAVAILABLE)


class CredentialRefused(Exception):
    """A peer's credential does not authenticate it (the reason is munged's or ours)."""


class HelloAuth(Protocol):
    """What a link needs to authenticate HELLOs, either way."""

    async def credential(self) -> tuple[bytes, bytes]:
        """(credential to send in our HELLO, K)."""
        ...

    async def accept(self, credential: bytes) -> bytes:
        """K for a peer's HELLO credential; CredentialRefused if it does not authenticate."""
        ...


@attrs.frozen
class SharedKey:
    """``auth = "key"``: every node holds the same key; HELLOs carry no credential."""

    key: bytes

    async def credential(self) -> tuple[bytes, bytes]:
        return b"", self.key

    async def accept(self, credential: bytes) -> bytes:
        if credential:
            raise CredentialRefused("a MUNGE credential, but this node uses the shared key "
                                    "(replication.auth differs between the nodes)")
        return self.key


@attrs.define(eq=False)
class Munge:
    """``auth = "munge"``: credentials from and for this node's munged (``socket``)."""

    socket: str
    offload: Offload
    _lib: ctypes.CDLL = attrs.field(init=False)
    _libc: ctypes.CDLL = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        name = ctypes.util.find_library("munge") or "libmunge.so.2"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            raise MungeUnavailable("libmunge is not installed (apt-get install munge), "
                                   "or set replication.auth = \"key\"") from None
        lib.munge_ctx_create.restype = ctypes.c_void_p
        lib.munge_ctx_destroy.argtypes = [ctypes.c_void_p]
        lib.munge_ctx_strerror.restype = ctypes.c_char_p
        lib.munge_ctx_strerror.argtypes = [ctypes.c_void_p]
        lib.munge_encode.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_int]
        lib.munge_decode.argtypes = [ctypes.c_char_p, ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_void_p),
                                     ctypes.POINTER(ctypes.c_int),
                                     ctypes.POINTER(ctypes.c_uint),
                                     ctypes.POINTER(ctypes.c_uint)]
        self._lib = lib
        self._libc = ctypes.CDLL(None)

    def _context(self) -> int:
        lib = self._lib
        ctx = lib.munge_ctx_create()
        if not ctx:
            raise MungeUnavailable("munge_ctx_create failed (out of memory)")
        if lib.munge_ctx_set(ctypes.c_void_p(ctx), ctypes.c_int(MUNGE_OPT_SOCKET),
                             ctypes.c_char_p(self.socket.encode())) != EMUNGE_SUCCESS:
            lib.munge_ctx_destroy(ctx)
            raise MungeUnavailable(f"munge socket {self.socket}: rejected")
        return int(ctx)

    def encode(self, payload: bytes) -> bytes:
        """A credential of ``payload`` for uid 0 only (blocking: munged)."""
        lib, ctx = self._lib, self._context()
        try:
            lib.munge_ctx_set(ctypes.c_void_p(ctx), ctypes.c_int(MUNGE_OPT_UID_RESTRICTION),
                              ctypes.c_uint(0))
            lib.munge_ctx_set(ctypes.c_void_p(ctx), ctypes.c_int(MUNGE_OPT_TTL),
                              ctypes.c_int(CREDENTIAL_TTL))
            out = ctypes.c_char_p()
            buf = ctypes.create_string_buffer(payload, len(payload))
            err = lib.munge_encode(ctypes.byref(out), ctypes.c_void_p(ctx), buf, len(payload))
            if err != EMUNGE_SUCCESS:
                raise MungeUnavailable(f"munge: {self._message(ctx)} (is munged running on "
                                       f"{self.socket}?)")
            assert out.value is not None
            credential = out.value
            self._libc.free(out)
            return credential
        finally:
            lib.munge_ctx_destroy(ctx)

    def decode(self, credential: bytes) -> tuple[bytes, int]:
        """(payload, uid of its maker) of a peer's credential (blocking: munged)."""
        lib, ctx = self._lib, self._context()
        payload = ctypes.c_void_p()
        length, uid, gid = ctypes.c_int(), ctypes.c_uint(), ctypes.c_uint()
        try:
            err = lib.munge_decode(credential, ctypes.c_void_p(ctx), ctypes.byref(payload),
                                   ctypes.byref(length), ctypes.byref(uid), ctypes.byref(gid))
            data = ctypes.string_at(payload, length.value) if payload.value else b""
            if payload.value:
                self._libc.free(payload)
            if err != EMUNGE_SUCCESS:
                raise CredentialRefused(f"munge: {self._message(ctx)}")
            return data, uid.value
        finally:
            lib.munge_ctx_destroy(ctx)

    def _message(self, ctx: int) -> str:
        text = self._lib.munge_ctx_strerror(ctypes.c_void_p(ctx))
        return text.decode(errors="replace") if text else "unknown error"

    async def credential(self) -> tuple[bytes, bytes]:
        k = secrets.token_bytes(K_SIZE)
        return await self.offload.run(self.encode, HELLO_LABEL + k), k

    async def accept(self, credential: bytes) -> bytes:
        if not credential:
            raise CredentialRefused("no MUNGE credential (replication.auth differs between "
                                    "the nodes?)")
        if len(credential) > MAX_CREDENTIAL:
            raise CredentialRefused("credential too long")
        payload, uid = await self.offload.run(self.decode, credential)
        if uid != 0:
            raise CredentialRefused(f"credential made by uid {uid}, not by a replicad (root)")
        if len(payload) != len(HELLO_LABEL) + K_SIZE or not payload.startswith(HELLO_LABEL):
            raise CredentialRefused("credential of something else than a replication HELLO")
        return payload[len(HELLO_LABEL):]
