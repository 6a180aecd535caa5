"""The replication wire: frames, their authentication, and every payload that travels.

Both ends of a link and every relay between them speak what this module defines, and
nothing else writes or parses a frame: one encoder (:meth:`Frame.encode`, and
:func:`encode_write_frames`, which builds the same bytes around file data read straight
into the frame buffer) and one decoder (:class:`FrameReader` over :meth:`Frame.decode`).

Wire format (version 9)
=======================

Every frame::

    header   FRAME_HEADER, 24 bytes, little endian
             magic    4s   b"SDRP"
             version  u8   9 (see "Versions" below)
             type     u8   HELLO RECORD ACK ERROR HEAD REDIRECT SNAPSHOT SNAPSHOT_END
             flags    u16  RECORD/SNAPSHOT: MORE (1) = more chunks of this seq follow;
                           RECORD: SKIP (2) = the seqs between the previous frame and
                           this one were markers (Done/Sync/Abort: nothing to apply);
                           RECORD: RUN (4) = the payload is a run of records (below),
                           never with MORE or SKIP
             length   u32  payload bytes (at most MAX_FRAME_PAYLOAD)
             seq      u64  see below
             crc32    u32  of the header alone (crc field zero): a damaged header (a
                           wrong length) is refused before its payload is read
    payload  ``length`` bytes
    mac      32 bytes: the nonce (12), the AES-256-GMAC tag of header + payload under
             the key and that nonce (16), 4 zero bytes (``mac``: why GMAC).  Under a
             session key the nonce is the frame's place on the link: direction (DOWN
             from the upstream, UP from the replica: 4 bytes) and its number in that
             direction on this connection (u64, from 0); the receiver expects exactly
             the next one (:class:`LinkKey`).  Under a HELLO key (the HELLOs, a
             REDIRECT, a refusal before the session): 12 random bytes

The MAC is what protects the payload: every byte of it is covered, and nothing of a
frame is used (decoded, applied, relayed) before its MAC was checked.  It also binds
the frame to its place: a frame dropped, replayed, reordered or reflected on the path
fails where it arrives ("out of sequence on the link"), whatever its type; the seq
checks below need not see every frame to be sound.  (Up to version 7
it was HMAC-SHA256(key, header + payload): 4x the CPU of GMAC here, a fifth of a cold
stream's.)  (Up to version 6
the CRC covered the payload too: a second pass over every byte on both ends, which
found nothing the MAC does not; it cost about as much as the MAC itself.)

A stream never stops short of the position it has reached (a replica's barrier
depends on it): markers (Done/Sync/Abort, nothing to apply) are left out only when
a later frame of the same batch follows them and carries SKIP; a batch that ends in
markers ends with the last of them as a RECORD frame of its own (applying it only
moves the replica's applied seq).  A relay forwards every RECORD frame it applied,
its SKIP flag included, and holds back only an incomplete record (MORE), so its
followers reach exactly its position.  The upstream never needs a later record to
say how far a follower is.

The two HELLOs are authenticated with the HELLO key K: the shared key (``auth =
"key"``), or 32 random bytes the replica sends inside a MUNGE credential that only
uid 0 of the realm can decode (``auth = "munge"``, :mod:`.auth`); every later frame
with the session key HMAC-SHA256(K, b"sdeefs-replication" + replica nonce + upstream
nonce), so a frame recorded in one session is worthless in another, and within a
session (version 9) anywhere but at its place.

==============  =========  ==========================================================
frame           direction  seq / payload
==============  =========  ==========================================================
HELLO           replica →  seq: first seq wanted.  credential (u16 + bytes: the
                           MUNGE credential carrying K; empty with a shared key),
                           nonce 16s, journal id 16s (zero: none held), flags u16
                           (QUERY: answer the head, stream nothing; RESYNC: a
                           snapshot first, from the login node itself, never
                           redirected), port u16 (where this replica relays; 0: it
                           does not), user (u16 + bytes), node (u16 + bytes).  Its
                           MAC is checked with the K that the credential yields
                           (the credential is read first)
HELLO           ← upstream seq: upstream's head.  nonce 16s, journal id 16s.  This
                           answer (or a REDIRECT, or an ERROR refusing a HELLO
                           that decoded) is authenticated with ``answer_key(K,
                           replica nonce)``: it answers this HELLO and no other
REDIRECT        ← upstream "host:port" of another upstream to ask (tree fan-out)
RECORD          ← upstream seq: journal seq.  rtype u16, record length u32, record
                           (``sdeefs.records``), then data for Write records; big
                           writes are chunks of one seq with MORE on all but the last.
                           With RUN: seq is the last record's; the payload is one
                           or more entries (RUN_ENTRY): seq u64, flags u16 (SKIP
                           only, as a frame's), length u32, then ``length`` bytes
                           of a RECORD payload as above (a whole record: no
                           chunks); seqs strictly increasing
SNAPSHOT        ← upstream seq: the snapshot's position.  A RECORD-style payload
SNAPSHOT_END    ← upstream seq: as SNAPSHOT.  32 bytes: digest of the tree
                           (``snapshot.tree_digest``)
HEAD            ← upstream seq: upstream's head (sent when idle: lag, liveness)
ACK             replica →  seq: last applied.  Empty payload: the subtree report
                           is as last sent.  Otherwise the subtree report: u32
                           count, then per replica below this one (all of them, at
                           any depth): node (u16 + bytes), applied u64.  Sent when
                           it changed, at most every REPORT_INTERVAL; bounded only
                           by MAX_FRAME_PAYLOAD (over 100,000 nodes of short names;
                           a longer one is cut to what fits)
ERROR           either     code u16 (ErrorCode), then a UTF-8 message of at most
                           MAX_ERROR_MESSAGE bytes; the connection ends
==============  =========  ==========================================================

The code of an ERROR is what the receiver acts on (a replica told DIVERGED starts
over; a barrier that only ever heard NO_LAYER tells the SLURM prolog so); the
message is for people and never parsed.

A run carries many small records under one MAC (``RunEncoder``: the origin gathers
records and Writes of at most RUN_WRITE bytes into frames of about RUN_BYTES; a
bigger Write keeps frames of its own, read straight into the frame buffer).  A cold
stream is mostly such records: one frame and one MAC per record cost more than the
records (``bench/RESULTS.md``, issue 16, branch coldfast).  The receiver checks a run's
structure whole (:func:`split_run`) before it applies any of it, then applies its records
in order, each as if it had come in a frame of its own.  A run may begin with records
a replica already holds (a relay forwards the frames it received, cut where its own
upstream cut them): those are passed over; a run with nothing new (its last seq at or
below the replica's) is out of sequence, as a plain frame replayed is.

Versions: 9 numbers every frame under a session key in its nonce (:class:`LinkKey`), which
a version-8 node would take for a random nonce and so accept a frame moved on the path:
it is refused by version (the ERROR telling it so carries the GMAC with a random nonce
it checks).  8 carries runs of records (RUN) and authenticates frames with AES-GMAC, which
a version-7 node would refuse as damaged: it is refused by version instead (the ERROR
telling it so carries the HMAC it checks).  7 has the CRC cover the header
only (the MAC alone covers the payload), so a version-6 node would reject every frame
with a payload as damaged: it is refused by version instead, with the ERROR in its own
version.  6 carries records in encoding
version 3 of ``sdeefs.records`` (record type 21,
``Create``: a new file with its attributes, xattrs and data in one record), which a
version-5 node would refuse mid-stream as unknown.  5 put a credential in front of the
replica's HELLO (MUNGE authentication) and carries record types 19 (Fallocate) and 20
(Mkdev), which a version-4 node would refuse mid-stream as unknown; a version-4 peer is
refused by version, with an ERROR it reads (a code, then the message).  4 put the code
before an ERROR's message (3 sent the message alone, so a replica had to recognise
"history diverged" by its text).  3 carries records in
encoding version 2 of ``sdeefs.records`` (path fields with a u32 length, up to
``records.MAX_PATH``: trees deeper than PATH_MAX) and ACK subtree reports with a u32
count, sent only when they change; 2 carried encoding 1 (u16, at most 4096 bytes) and
u16 report counts.  Frames of all of them have the same header, so a peer of another
version is recognised from its first frame and refused with one clear error
(``VersionMismatch``: "the peer speaks replication protocol version 6, this node
version 7: run the same sdeefs release on both"), never misparsed.  A new upstream
answers an old replica's HELLO with that ERROR in the replica's own version (a message
alone, as versions 2 and 3 read it), which the old replica can read and shows; a new
replica says it of the old upstream's first frame.  Both ends must run the same release.

Every byte from a peer is hostile: a frame with a bad magic, version, CRC, MAC or
length is rejected; until a peer's first frame authenticated, a frame may not be
larger than MAX_HANDSHAKE_PAYLOAD (:class:`FrameReader`), so a stranger costs a few
KiB (and ``sdeefs-replicad`` keeps at most MAX_STRANGERS of them waiting); records
are decoded strictly (``sdeefs.records``: no unsafe path, no device node) and made
safe (:func:`sanitize`): set-user/group-ID bits are stripped from every mode.  What a
replica then carries out is the one rule of ``sdeefs.replicable`` (the login node's
door applies it too): a record it refuses, or one that does not decode, arrived in an
authenticated frame and is the user's problem, not the link's (:class:`Refused`): the
replica skips it, records the error and goes on.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import itertools
import os
import re
import secrets
import struct
import sys
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import ClassVar

import attrs
import trio

from .. import records as rec
from ..errors import BadRecord
from . import mac
from .auth import CredentialRefused, HelloAuth

try:  # a received frame's MAC checked in C (sdeefs/replication/_gmacc.c); optional
    from . import _gmacc
except ImportError:  # pragma: no cover
    _gmacc = None  # type: ignore[assignment]

MAGIC = b"SDRP"
VERSION = 9  # 8 with every frame under a session key bound to its place (``LinkKey``)
OLD_VERSIONS = (2, 3, 4, 5, 6, 7, 8)  # same frame header: told in their own version why refused
HEADER_CRC = 7  # the first version whose CRC covers the header alone
GMAC = 8  # the first version whose frames carry an AES-GMAC (``mac``), not an HMAC
COUNTED = 9  # the first version whose session frames' nonce is their place on the link
DOWN = b"SDdn"  # the nonce label of frames from an upstream to a replica (``LinkKey``)
UP = b"SDup"  # ... and of frames from a replica to its upstream
CODED_ERRORS = 4  # the first version whose ERROR frames carry a code
HELLO, RECORD, ACK, ERROR, HEAD, REDIRECT, SNAPSHOT, SNAPSHOT_END = range(1, 9)
FRAME_TYPES = range(1, 9)
MORE = 1
SKIP = 2  # the seqs before this frame's were markers, not sent (a third of a journal)
RUN = 4  # RECORD: the payload is a run of whole records (version 8)
QUERY = 1  # HELLO flag: only tell me your head (the SLURM prolog's barrier), then close
RESYNC = 2  # HELLO flag: send me a snapshot first, whatever I hold (``sdeefs replica resync``)
FRAME_HEADER = struct.Struct("<4sBBHIQI")
assert FRAME_HEADER.size == 24
CRC = struct.Struct("<I")  # the header's last field, filled in once the frame is complete
MAC_SIZE = 32
assert MAC_SIZE == mac.FIELD
mac_field_matches = mac.matches
_frame_number = mac.number
NONCE_SIZE_MAC = mac.NONCE_SIZE  # the nonce at the start of a frame's MAC field
MAX_FRAME_PAYLOAD = 2 << 20
RECORD_HEAD = struct.Struct("<HI")  # a RECORD/SNAPSHOT payload: rtype, record length
CHUNK = 1 << 20  # data bytes per RECORD frame
# the least a sender's pooled frame buffer is made (``BufferPool.size``): a data chunk's
# frame with a record head of up to 8 KiB (a path, a handle, an Extent's sums)
POOL_BUFFER = CHUNK + (8 << 10)
RUN_ENTRY = struct.Struct("<QHI")  # a record in a RUN frame: seq, flags (SKIP), length
assert RUN_ENTRY.size == 14
RUN_BYTES = 256 << 10  # payload bytes after which an origin closes a RUN frame
RUN_WRITE = 64 << 10  # a Write of at most this many bytes travels inside a run
# A Write record (path, handle, range) and a chunk of data fit in one frame:
assert RECORD_HEAD.size + 4 + rec.MAX_PATH + 4 + rec.MAX_HANDLE + 16 + CHUNK \
    <= MAX_FRAME_PAYLOAD
NONCE_SIZE = 16
ID_SIZE = 16
# Until a peer's first frame is authenticated, a frame may carry at most this much (a HELLO,
# its answer, a REDIRECT or an ERROR all fit), and the reader asks the socket for at most
# HANDSHAKE_READ bytes at a time: a peer that cannot authenticate makes the daemon hold a
# few KiB, not a 2 MiB frame (issue 14: 200 such peers cost 480 MiB before).
MAX_HANDSHAKE_PAYLOAD = 8192
HANDSHAKE_READ = 16384
NO_ID = bytes(ID_SIZE)
HELLO_FIXED = struct.Struct("<HH")  # after nonce and journal id: flags, relay port
CREDENTIAL_LENGTH = struct.Struct("<H")  # a HELLO's credential: u16 length + bytes
NAME_LENGTH = struct.Struct("<H")  # user and node names: u16 length + bytes
REPORT_COUNT = struct.Struct("<I")
REPORT_ENTRY = struct.Struct("<Q")  # after the node's name
REPORT_INTERVAL = 1.0  # seconds: at most one subtree report per link this often
ERROR_CODE = struct.Struct("<H")
MAX_ERROR_MESSAGE = 4096  # bytes of an ERROR's message
DEFAULT_PORT = 7077
_NAME = re.compile(rb"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}\Z")


class ErrorCode(enum.IntEnum):
    """Why a peer ends a link: the u16 that starts an ERROR frame's payload."""

    REFUSED = 0  # anything below not: a bad frame or record, a busy peer; reconnect
    VERSION = 1  # the peer speaks another protocol version
    DIVERGED = 2  # the replica holds records the login node's journal does not: start over
    NO_LAYER = 3  # the node holds nothing of the user (no journal, no replica)


class ProtocolError(Exception):
    """A frame or a record that must not be applied, or a peer's refusal; nothing was
    changed.  ``code`` is what an ERROR frame about it carries."""

    code: ClassVar[ErrorCode] = ErrorCode.REFUSED


class VersionMismatch(ProtocolError):
    """The peer speaks another version of the protocol (``peer_version``)."""

    code = ErrorCode.VERSION

    def __init__(self, peer_version: int) -> None:
        super().__init__(f"the peer speaks replication protocol version {peer_version}, this "
                         f"node version {VERSION}: run the same sdeefs release on both")
        self.peer_version = peer_version


class HistoryDiverged(ProtocolError):
    """The replica holds records the login node's journal does not have (the journal lost
    its unsynced tail in a crash of the login node): the replica must start over."""

    code = ErrorCode.DIVERGED


class Refused(ProtocolError):
    """A record from an authenticated frame that a replica must not carry out (it does not
    decode, ``sdeefs.replicable`` refuses it, or this copy cannot apply it): the user's
    problem, not the link's.  A replica skips it and records the error; a snapshot that
    holds one changes nothing (as any ProtocolError)."""


class NoLayer(ProtocolError):
    """The node holds nothing of the user: no journal on the login node, no replica on a
    relay (the user never had an sdeefs environment, or not yet)."""

    code = ErrorCode.NO_LAYER


_REFUSALS: dict[int, type[ProtocolError]] = {cls.code: cls for cls in (HistoryDiverged, NoLayer)}


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """(host, port) of "HOST:PORT" ("[V6]:PORT", or HOST alone: the default port), as
    command lines and REDIRECT frames give it; ValueError if the port is not a number."""
    host, _, port = text.rpartition(":")
    if not host:
        return text, default_port
    return host.strip("[]"), int(port)


class Redirected(Exception):
    """The upstream has enough followers for this user: ask ``address`` ("host:port",
    parse_address accepts it) instead."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.address = address


@contextlib.asynccontextmanager
async def open_link_tasks() -> AsyncIterator[trio.Nursery]:
    """A nursery for a link's tasks that raises its first real error itself, not wrapped
    in an ExceptionGroup.

    A link has a few tasks (reader, applier, ACK receiver); when one fails the others
    are cancelled, and callers want to catch *that* error (ProtocolError, OSError) to
    log it and reconnect, not an ExceptionGroup they would have to unpack everywhere.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        raise _first_error(group) from None


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = _first_error(exc)
        if not isinstance(exc, trio.Cancelled):
            return exc
    return group.exceptions[0]


# -- frames ----------------------------------------------------------------------------------


def session_key(hello_key: bytes, replica_nonce: bytes, upstream_nonce: bytes) -> bytes:
    return hmac.new(hello_key, b"sdeefs-replication" + replica_nonce + upstream_nonce,
                    hashlib.sha256).digest()


def answer_key(hello_key: bytes, replica_nonce: bytes) -> bytes:
    """The key of the upstream's answer to a HELLO (its HELLO, a REDIRECT, a refusal):
    bound to the replica's nonce, so an answer recorded once (a shared key is long-lived)
    never passes as the answer to another HELLO (an old head to a barrier's query)."""
    return hmac.new(hello_key, b"sdeefs-answer" + replica_nonce, hashlib.sha256).digest()


@attrs.define(eq=False)
class LinkKey:
    """One end's session key of a link, and the place of every frame under it (version 9).

    A frame under the session key is sealed with the nonce (direction, number)
    (``mac.counted``): ``DOWN`` for what the upstream sends, ``UP`` for what the replica
    sends, and the frame's number in that direction on this connection, from 0.  Each
    end seals what it sends in the order it sends it and verifies what arrives in the
    order it arrives (:meth:`Frame.decode`), so a frame dropped, replayed, reordered or
    reflected on the path fails where it arrives ("out of sequence on the link"),
    whatever it is: a RECORD before a SKIP frame, a chunk of a big write, a run, a HEAD,
    an ACK.  A relay re-seals what it forwards, with the key and numbers of each
    downstream link; every hop is checked by its own receiver.

    An ERROR ends the link and may follow frames that were sealed and never sent (the
    sender failed with a batch encoded ahead): its number may be ahead of the one due,
    never behind.  Numbers come from an ``itertools.count`` (atomic under the GIL): no
    nonce is ever used twice, even by a worker thread abandoned mid-batch.

    Attributes:
        key: the session key (``session_key``).
        sends: the label of the frames this end sends (DOWN or UP).
        received: the number of the next frame due from the peer.
    """

    key: bytes
    sends: bytes
    received: int = 0
    _numbers: Iterator[int] = attrs.field(init=False, factory=itertools.count)

    @property
    def receives(self) -> bytes:
        return UP if self.sends == DOWN else DOWN

    def next_nonce(self) -> bytes:
        """The nonce of the next frame this end seals."""
        return mac.counted(self.sends, next(self._numbers))

    def arrived(self, ftype: int, nonce: bytes) -> None:
        """A frame of type ``ftype`` that authenticated with ``nonce`` arrived: is it the
        one due?  ProtocolError (out of sequence) otherwise."""
        number = _frame_number(nonce, self.receives)
        if number != self.received and not (ftype == ERROR and number is not None
                                            and number > self.received):
            where = f"frame {number}" if number is not None else "a frame not numbered for it"
            raise ProtocolError(f"out of sequence on the link: {where} arrived where frame "
                                f"{self.received} was due (a frame dropped, replayed or "
                                "reordered on the path)")
        self.received = number + 1


Key = bytes | LinkKey  # a HELLO key (random nonces), or a session key with its frame numbers


def _seal(buf: bytearray | memoryview, ftype: int, flags: int, length: int, seq: int,
          key: Key | None,
          version: int = VERSION) -> None:
    """Header, CRC and MAC of the frame in ``buf``, whose ``length`` payload bytes are in
    place after the header: the one place a frame is made.  ``key`` None: header and CRC
    only, the MAC left for :func:`seal_frame` (a frame made before it is known to be sent
    takes a place on the link only once it is: an origin's Extent, checked after its data
    is read, may be held back)."""
    end = FRAME_HEADER.size + length
    assert len(buf) == end + MAC_SIZE
    FRAME_HEADER.pack_into(buf, 0, MAGIC, version, ftype, flags, length, seq, 0)
    with memoryview(buf) as view:
        covered = view[:FRAME_HEADER.size if version >= HEADER_CRC else end]
        CRC.pack_into(buf, FRAME_HEADER.size - CRC.size, zlib.crc32(covered))
        covered.release()
    if key is not None:
        _mac_into(buf, end, key, version)


def _mac_into(buf: bytearray | memoryview, end: int, key: Key, version: int) -> None:
    """The MAC of ``buf[:end]`` into ``buf[end:]`` (under a LinkKey: the next nonce)."""
    nonce = key.next_nonce() if isinstance(key, LinkKey) and version >= COUNTED else None
    raw = key.key if isinstance(key, LinkKey) else key
    if version >= GMAC and _gmacc is not None:
        # in one C call (``_gmacc.seal``): the same field as ``mac.seal``, without its
        # seven ctypes calls per frame (bench/RESULTS.md, branch originlean)
        _gmacc.seal(mac.derived(bytes(raw)), os.urandom(mac.NONCE_SIZE) if nonce is None
                    else nonce, buf, end)
        return
    with memoryview(buf) as view:
        if version >= GMAC:
            view[end:] = mac.seal(raw, view[:end], nonce=nonce)  # nonce None: random
        else:  # an ERROR to a peer of an old version: the MAC it checks
            view[end:] = hmac.new(raw, view[:end], hashlib.sha256).digest()


def seal_frame(buf: bytearray | memoryview, key: Key) -> None:
    """The MAC of a frame made with no key (``encode_write_frames(..., None)``), sealed
    now: under a LinkKey it takes the next place on the link, so call it in send order."""
    length = FRAME_HEADER.unpack_from(buf)[4]
    _mac_into(buf, FRAME_HEADER.size + length, key, VERSION)


def _decode_header(header: bytes, max_payload: int = MAX_FRAME_PAYLOAD
                   ) -> tuple[int, int, int, int, int]:
    """(type, flags, length, seq, crc) of a frame header; ProtocolError if malformed."""
    if len(header) != FRAME_HEADER.size:
        raise ProtocolError("truncated frame header")
    magic, version, ftype, flags, length, seq, crc = FRAME_HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError("not an sdeefs replication frame (bad magic)")
    if version != VERSION:
        raise VersionMismatch(version)
    if zlib.crc32(header[:-CRC.size] + bytes(CRC.size)) != crc:
        raise ProtocolError("frame header checksum mismatch")
    if ftype not in FRAME_TYPES or flags & ~(MORE | SKIP | RUN) or flags & RUN and (
            ftype != RECORD or flags & (MORE | SKIP)):
        raise ProtocolError(f"bad frame type {ftype} or flags {flags:#x}")
    if length > max_payload:
        raise ProtocolError(f"frame of {length} bytes is too large" if max_payload ==
                            MAX_FRAME_PAYLOAD else f"a first frame of {length} bytes (at most "
                            f"{max_payload} before authentication)")
    return ftype, flags, length, seq, crc


decode_header = _decode_header  # the receiving end's (``receiver.ThreadReader``) name for it


Payload = bytes | memoryview  # a frame's payload: a received RECORD's may be a view


def _field_matches(key: bytes, field: bytes, header: bytes, payload: Payload) -> bool:
    """``mac.matches``: in one call to ``_gmacc`` where it is built (not seven through
    ctypes), the same check."""
    if _gmacc is None:
        return mac_field_matches(key, field, header, payload)
    return _gmacc.matches(mac.derived(bytes(key)), field, header, payload)
Encoded = bytes | bytearray | memoryview  # an encoded frame (a view: of a ``BufferPool``'s)
Out = list[bytes | bytearray] | list[Encoded]  # where a RunEncoder puts the frames it closes


@attrs.frozen
class Frame:
    type: int
    seq: int
    payload: Payload = b""
    flags: int = 0

    @property
    def body(self) -> bytes:
        """The payload of a frame other than RECORD and SNAPSHOT (``decode`` makes it bytes;
        only those two may carry a view)."""
        return self.payload if isinstance(self.payload, bytes) else bytes(self.payload)

    def encode(self, key: Key, version: int = VERSION) -> bytearray:
        """The frame on the wire.  ``version`` other than VERSION only for an ERROR frame
        telling a peer of an old version (OLD_VERSIONS: same header) why it is refused."""
        if len(self.payload) > MAX_FRAME_PAYLOAD:
            raise ValueError("frame payload too large")
        buf = bytearray(FRAME_HEADER.size + len(self.payload) + MAC_SIZE)
        buf[FRAME_HEADER.size:FRAME_HEADER.size + len(self.payload)] = self.payload
        _seal(buf, self.type, self.flags, len(self.payload), self.seq, key, version)
        return buf

    @classmethod
    def decode(cls, header: bytes, payload: Payload, mac: bytes, key: Key) -> Frame:
        """A received frame, its header's CRC and the MAC of all of it verified, and under a
        session key (``LinkKey``) its place on the link; ProtocolError otherwise.
        ``payload`` may be a view of the reader's buffer (the bulk of a stream, not
        copied): it stays one for RECORD and SNAPSHOT frames, the payload of any other is
        made bytes."""
        ftype, flags, length, seq, _ = _decode_header(header)
        if len(payload) != length or len(mac) != MAC_SIZE:
            raise ProtocolError("frame truncated")
        raw = key.key if isinstance(key, LinkKey) else key
        if not _field_matches(raw, mac, header, payload):
            raise ProtocolError("frame authentication failed")
        if isinstance(key, LinkKey):
            key.arrived(ftype, mac[:NONCE_SIZE_MAC])
        if ftype not in (RECORD, SNAPSHOT) and not isinstance(payload, bytes):
            payload = bytes(payload)
        return cls(ftype, seq, payload, flags)


@attrs.define(eq=False)
class BufferPool:
    """Buffers for big frames, each used again once nothing refers to it any more.

    A new ``bytearray`` per frame is zeroed (a memset) and faulted in page by page, only
    to be overwritten by file data: a few % of a cold stream's CPU (bench/RESULTS.md,
    branch coldorigin).  A buffer is free when the pool holds the only reference to it
    (``sys.getrefcount``, against the count of a buffer known free: interpreters
    differ): every memoryview of it, every slice of those and every ctypes view keeps
    one, so a frame still queued or being sent keeps its buffer.  At most ``keep``
    buffers are kept (about the frames in flight); beyond that a buffer of its own, as
    before.

    A buffer for a frame of at least half of ``size`` is made ``size`` bytes (the
    sender's: a whole data chunk's frame), so the short last frame of a big file does
    not leave a buffer too small for the next full one (each replaced by a new one:
    faulted in again, bench/RESULTS.md, branch originlean); a smaller frame's (a small
    file's) is made its own size, so a window of those does not hold a chunk each.  Of
    the free buffers the one freed last is handed out (the warmest in the CPU's cache:
    the copy into it is cheaper), so the pool holds about the buffers in flight at
    once, not ``keep``.
    """

    keep: int = 64
    size: int = 0  # the least a new buffer is made (0: what ``take`` asks)
    # in the order they were last handed out, the oldest first.  Frames are sent in
    # that order, so the free buffers are (nearly always) a run at the front, and the
    # last of that run is the one freed last: not a scan of every buffer in flight per
    # frame (96 of them at a sender's full window: ~9 % of an origin's Python in a cold
    # stream, bench/RESULTS.md, branch coldcpu)
    _buffers: list[bytearray] = attrs.field(factory=list)
    _free_refs: int = 0

    def __attrs_post_init__(self) -> None:
        self._buffers.append(bytearray(1))
        buf = self._buffers[0]
        self._free_refs = self._refs(buf)
        del buf
        self._buffers.clear()

    @staticmethod
    def _refs(buf: bytearray) -> int:
        return sys.getrefcount(buf)

    def take(self, length: int) -> memoryview:
        """A writable view of ``length`` bytes, contents undefined."""
        buffers, free_refs = self._buffers, self._free_refs
        pick = smaller = -1  # smaller: a free buffer too small, replaced by the new one
        for index in range(len(buffers)):  # (not enumerate: its tuple holds a reference)
            buf = buffers[index]
            if self._refs(buf) > free_refs:  # in flight
                if pick >= 0:
                    break  # the run of free buffers ended: its last fitting one is picked
                continue
            if len(buf) >= length:
                pick = index
            else:
                smaller = index
        if pick >= 0:
            buf = buffers.pop(pick)
            buffers.append(buf)
            return memoryview(buf)[:length]
        if smaller < 0 and len(buffers) >= self.keep:
            return memoryview(bytearray(length))  # a buffer of its own: just its size
        # a frame of at least half a chunk gets a whole chunk's buffer (the next full
        # frame fits it); a smaller one (a small file's Extent) just its size: a
        # window of those must not hold a chunk each
        buf = bytearray(self.size if length * 2 >= self.size > length else length)
        if smaller >= 0:
            del buffers[smaller]
        buffers.append(buf)
        return memoryview(buf)[:length]

    def clear(self) -> None:
        """Let the buffers go (an idle link keeps none)."""
        self._buffers.clear()


class FrameReader:
    """Frames from a stream, read with as few copies and calls as it allows.

    Small frames (a stream of metadata records) come through one buffer: one receive per
    READ_SIZE bytes, not three awaits per frame, and one copy of each payload out of it.
    A frame of BIG_FRAME bytes or more (file data: the bulk of a cold stream) is read
    into a buffer of its own, straight from the socket where the stream is a
    ``trio.SocketStream`` (``recv_into``), and its payload is a view of that buffer:
    nothing copies those bytes between the kernel and the ``pwrite`` that applies them
    (it was three copies).  The reader may read ahead of the frames asked for, so once a
    stream has a reader every frame comes through it.

    A new reader trusts nothing: frames of at most MAX_HANDSHAKE_PAYLOAD, reads of at most
    HANDSHAKE_READ (its buffer is that big), until :meth:`trust` (called once the peer's
    HELLO authenticated)."""

    READ_SIZE = 1 << 16  # a big frame's head read with the frames before it is copied once
    BIG_FRAME = 1 << 16

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray(HANDSHAKE_READ)
        self.start = self.end = 0  # the bytes read and not taken: buf[start:end]
        self.max_payload = MAX_HANDSHAKE_PAYLOAD
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None

    @property
    def socket(self) -> trio.socket.SocketType | None:
        """The socket of the stream (None: it is not a ``trio.SocketStream``)."""
        return self._socket

    def trust(self) -> None:
        """The peer authenticated: frames and reads of full size from now on."""
        self.max_payload = MAX_FRAME_PAYLOAD
        if len(self.buf) < self.READ_SIZE:
            bigger = bytearray(self.READ_SIZE)
            bigger[:self.end - self.start] = self.buf[self.start:self.end]
            self.buf, self.start, self.end = bigger, 0, self.end - self.start

    async def _receive_into(self, view: memoryview) -> int:
        """Receive at most ``len(view)`` bytes into ``view``; how many (0: end of stream)."""
        if self._socket is not None:
            try:
                return await self._socket.recv_into(view)
            except OSError as exc:  # as trio.SocketStream.receive_some says it
                raise trio.BrokenResourceError(str(exc)) from exc
        chunk = await self.stream.receive_some(len(view))
        view[:len(chunk)] = chunk
        return len(chunk)

    async def _fill(self, need: int, started: bool) -> None:
        """At least ``need`` bytes (at most the buffer's size) in ``buf[start:end]``."""
        while self.end - self.start < need:
            if self.start and len(self.buf) - self.start < need:
                held = self.end - self.start  # move what is held to the front
                self.buf[:held] = self.buf[self.start:self.end]
                self.start, self.end = 0, held
            with memoryview(self.buf) as view:
                got = await self._receive_into(view[self.end:])
            if not got:
                if started or self.end > self.start:
                    raise ProtocolError("connection closed in the middle of a frame")
                raise EOFError("connection closed")
            self.end += got
        if self.start == self.end:
            self.start = self.end = 0

    async def _big(self, total: int) -> memoryview:
        """The next ``total`` bytes in a buffer of their own (a big frame)."""
        frame = bytearray(total)
        view = memoryview(frame)
        have = min(self.end - self.start, total)
        view[:have] = self.buf[self.start:self.start + have]
        self.start += have
        if self.start == self.end:
            self.start = self.end = 0
        while have < total:
            got = await self._receive_into(view[have:])
            if not got:
                raise ProtocolError("connection closed in the middle of a frame")
            have += got
        return view

    async def frame(self, key: Key) -> Frame:
        """The next verified frame; EOFError at a clean end of stream."""
        return Frame.decode(*await self._raw_frame(), key)

    async def hello_frame(self, auth: HelloAuth) -> tuple[Frame, bytes]:
        """A peer's first frame, a HELLO verified with the K its credential yields: (the
        frame, K).  ProtocolError if it is not a HELLO or does not authenticate."""
        header, payload, mac = await self._raw_frame()
        if FRAME_HEADER.unpack(header)[2] != HELLO:
            raise ProtocolError("expected HELLO")
        credential = _take_credential(bytes(payload))[0]
        try:
            k = await auth.accept(credential)
        except CredentialRefused as exc:
            raise ProtocolError(f"HELLO not authenticated: {exc}") from None
        return Frame.decode(header, payload, mac, k), k

    async def _raw_frame(self) -> tuple[bytes, Payload, bytes]:
        """(header, payload, mac) of the next frame, its header checked, nothing verified."""
        await self._fill(FRAME_HEADER.size, False)
        header = bytes(self.buf[self.start:self.start + FRAME_HEADER.size])
        try:
            length = _decode_header(header, self.max_payload)[2]
        except VersionMismatch:
            # Take in the rest of the peer's frame (the header is the same in every
            # version): closing on unread bytes would reset the connection, and the
            # ERROR telling the peer why could be lost with it.
            length = FRAME_HEADER.unpack(header)[4]
            if length <= self.max_payload:
                with contextlib.suppress(EOFError, ProtocolError):
                    await self._take(FRAME_HEADER.size + length + MAC_SIZE)
            raise
        total = FRAME_HEADER.size + length + MAC_SIZE
        view = await self._take(total)
        payload: Payload = view[FRAME_HEADER.size:total - MAC_SIZE]
        if total < self.BIG_FRAME:  # out of the shared buffer: a copy of its own
            payload = bytes(payload)
        return header, payload, bytes(view[total - MAC_SIZE:])

    async def _take(self, total: int) -> memoryview:
        """The next ``total`` bytes (a whole frame): a view of the shared buffer, valid
        until the next read, or of a buffer of their own for a big frame."""
        if total >= self.BIG_FRAME:
            return await self._big(total)
        await self._fill(total, True)
        start, self.start = self.start, self.start + total
        return memoryview(self.buf)[start:start + total]


# -- ERROR -----------------------------------------------------------------------------------


def encode_error(exc: BaseException, key: Key, seq: int = 0, version: int = VERSION
                 ) -> bytearray:
    """The ERROR frame telling the peer why the link ends (``exc``'s code and message).

    To a peer of an old version (OLD_VERSIONS) the message alone, as it reads ERRORs."""
    message = str(exc).encode()[:MAX_ERROR_MESSAGE]
    if version >= CODED_ERRORS:
        code = exc.code if isinstance(exc, ProtocolError) else ErrorCode.REFUSED
        message = ERROR_CODE.pack(code) + message
    return Frame(ERROR, seq, message).encode(key, version)


def decode_error(frame: Frame, prefix: str) -> ProtocolError:
    """What a peer's ERROR frame says, as the error type of its code (message after
    ``prefix``); a plain ProtocolError for REFUSED, VERSION or a malformed ERROR."""
    if len(frame.payload) < ERROR_CODE.size:
        return ProtocolError(f"{prefix}malformed ERROR frame")
    (code,) = ERROR_CODE.unpack_from(frame.payload)
    message = prefix + frame.body[ERROR_CODE.size:].decode(errors="replace")
    try:
        kind = ErrorCode(code)
    except ValueError:
        return ProtocolError(f"{message} (unknown error code {code})")
    return _REFUSALS.get(kind, ProtocolError)(message)


# -- HELLO and ACK payloads --------------------------------------------------------------------


@attrs.frozen
class Hello:
    """What a replica asks for: ``user``'s records from ``want`` on (see the module docstring)."""

    nonce: bytes
    journal_id: bytes
    user: str
    node: str
    want: int
    flags: int = 0
    port: int = 0


def _name_field(value: str) -> bytes:
    raw = value.encode()
    return NAME_LENGTH.pack(len(raw)) + raw


def _take_name(payload: bytes, offset: int, what: str) -> tuple[str, int]:
    if offset + NAME_LENGTH.size > len(payload):
        raise ProtocolError(f"{what} missing")
    (length,) = NAME_LENGTH.unpack_from(payload, offset)
    raw = payload[offset + NAME_LENGTH.size:offset + NAME_LENGTH.size + length]
    if len(raw) != length or not _NAME.match(raw):
        raise ProtocolError(f"bad {what} {raw[:64]!r}")
    return raw.decode(), offset + NAME_LENGTH.size + length


def encode_hello(hello: Hello, credential: bytes = b"") -> Frame:
    payload = (CREDENTIAL_LENGTH.pack(len(credential)) + credential + hello.nonce
               + hello.journal_id + HELLO_FIXED.pack(hello.flags, hello.port)
               + _name_field(hello.user) + _name_field(hello.node))
    return Frame(HELLO, hello.want, payload)


def _take_credential(payload: bytes) -> tuple[bytes, int]:
    """A HELLO payload's credential, and where the rest begins."""
    if len(payload) < CREDENTIAL_LENGTH.size:
        raise ProtocolError("malformed HELLO")
    (length,) = CREDENTIAL_LENGTH.unpack_from(payload)
    end = CREDENTIAL_LENGTH.size + length
    if end > len(payload):
        raise ProtocolError("malformed HELLO")
    return payload[CREDENTIAL_LENGTH.size:end], end


def decode_hello(frame: Frame) -> Hello:
    if frame.type != HELLO:
        raise ProtocolError("expected HELLO")
    start = _take_credential(frame.body)[1]
    payload = frame.body[start:]
    if len(payload) < NONCE_SIZE + ID_SIZE + HELLO_FIXED.size:
        raise ProtocolError("malformed HELLO")
    nonce, jid = payload[:NONCE_SIZE], payload[NONCE_SIZE:NONCE_SIZE + ID_SIZE]
    flags, port = HELLO_FIXED.unpack_from(payload, NONCE_SIZE + ID_SIZE)
    user, offset = _take_name(payload, NONCE_SIZE + ID_SIZE + HELLO_FIXED.size, "user name")
    node, offset = _take_name(payload, offset, "node name")
    if offset != len(payload) or flags & ~(QUERY | RESYNC) or frame.seq < 1:
        raise ProtocolError("malformed HELLO")
    return Hello(nonce, jid, user, node, frame.seq, flags, port)


@attrs.frozen
class Session:
    """An upstream's answer to a HELLO: its head, its journal id, the session key."""

    head: int
    journal_id: bytes
    key: LinkKey


async def send_hello(stream: trio.abc.SendStream, reader: FrameReader, auth: HelloAuth,
                     hello: Hello) -> Session:
    """The replica's side of the handshake.  Raises Redirected, or the upstream's refusal
    as its type (``decode_error``), or ProtocolError."""
    credential, k = await auth.credential()
    await stream.send_all(encode_hello(hello, credential).encode(k))
    answer = await reader.frame(answer_key(k, hello.nonce))
    if answer.type == REDIRECT:
        address = answer.body.decode(errors="replace")
        try:
            parse_address(address)
        except ValueError:
            raise ProtocolError(f"bad REDIRECT {address[:64]!r}") from None
        raise Redirected(address)
    if answer.type == ERROR:
        raise decode_error(answer, "upstream refused: ")
    if answer.type != HELLO or len(answer.payload) != NONCE_SIZE + ID_SIZE:
        raise ProtocolError("the upstream did not answer HELLO")
    reader.trust()
    return Session(answer.seq, answer.body[NONCE_SIZE:],
                   LinkKey(session_key(k, hello.nonce, answer.body[:NONCE_SIZE]), UP))


async def answer_hello(stream: trio.abc.SendStream, hello_key: bytes, hello: Hello, head: int,
                       journal_id: bytes) -> LinkKey:
    """The upstream's side of the handshake: answer ``hello`` (authenticated with
    ``hello_key``, its K; the answer with ``answer_key``); return the session key."""
    nonce = secrets.token_bytes(NONCE_SIZE)
    await stream.send_all(Frame(HELLO, head, nonce + journal_id).encode(
        answer_key(hello_key, hello.nonce)))
    return LinkKey(session_key(hello_key, hello.nonce, nonce), DOWN)


def encode_report(report: list[tuple[str, int]]) -> bytes:
    """A subtree report for an ACK: every entry that fits in one frame."""
    parts, size = [], REPORT_COUNT.size
    for node, seq in report:
        part = _name_field(node) + REPORT_ENTRY.pack(seq)
        if size + len(part) > MAX_FRAME_PAYLOAD:
            break
        parts.append(part)
        size += len(part)
    return REPORT_COUNT.pack(len(parts)) + b"".join(parts)


def decode_report(payload: bytes) -> list[tuple[str, int]]:
    if len(payload) < REPORT_COUNT.size:
        raise ProtocolError("ACK report truncated")
    (count,) = REPORT_COUNT.unpack_from(payload)
    # no count a payload cannot hold (a name is at least one byte)
    if count > len(payload) // (NAME_LENGTH.size + 1 + REPORT_ENTRY.size):
        raise ProtocolError("ACK report too long for its frame")
    offset, report = REPORT_COUNT.size, []
    for _ in range(count):
        node, offset = _take_name(payload, offset, "node name")
        if offset + REPORT_ENTRY.size > len(payload):
            raise ProtocolError("ACK report truncated")
        (seq,) = REPORT_ENTRY.unpack_from(payload, offset)
        offset += REPORT_ENTRY.size
        report.append((node, seq))
    if offset != len(payload):
        raise ProtocolError("trailing bytes in ACK report")
    return report


# -- record payloads -------------------------------------------------------------------------


def encode_record_payload(record: rec.Record, data: bytes = b"") -> bytes:
    rtype, body = rec.encode_record(record)
    return RECORD_HEAD.pack(rtype, len(body)) + body + data


def decode_record_payload(payload: Payload) -> tuple[rec.Record, Payload]:
    """(record, data) from a RECORD payload, made safe to apply; ProtocolError otherwise.
    The data is a view of ``payload`` (not a copy: it is most of a stream's bytes)."""
    if len(payload) < RECORD_HEAD.size:
        raise Refused("record frame too short")
    rtype, length = RECORD_HEAD.unpack_from(payload)
    end = RECORD_HEAD.size + length
    if end > len(payload):
        raise Refused("record runs past the frame")
    view = memoryview(payload)
    try:
        record = rec.decode_record(rtype, bytes(view[RECORD_HEAD.size:end]))
    except BadRecord as exc:
        raise Refused(f"bad record: {exc}") from None
    data = view[end:]
    if isinstance(record, rec.Write):
        if len(data) > record.length:
            raise Refused("more data than the write record covers")
    elif data:
        raise Refused("data attached to a record that takes none")
    return sanitize(record), data


def sanitize(record: rec.Record) -> rec.Record:
    """What a replica applies: no set-ID bits (whether it applies it at all is
    ``sdeefs.replicable``'s rule)."""
    if isinstance(record, rec.Mkdir | rec.Mknod | rec.Mkdev | rec.Setattr | rec.Create) and \
            record.mode & 0o6000:
        record = attrs.evolve(record, mode=record.mode & ~0o6000)
    return record


def record_frames(seq: int, record: rec.Record, data: bytes | None,
                  ftype: int = RECORD) -> list[Frame]:
    """The frames of one record; a Write's data split into MORE-chained chunks."""
    if not isinstance(record, rec.Write):
        return [Frame(ftype, seq, encode_record_payload(record))]
    data = data or b""
    frames = []
    for start in range(0, max(len(data), 1), CHUNK):
        chunk = data[start:start + CHUNK]
        part = attrs.evolve(record, offset=record.offset + start, length=len(chunk))
        more = MORE if start + CHUNK < len(data) else 0
        frames.append(Frame(ftype, seq, encode_record_payload(part, chunk), more))
    return frames


def encode_write_frames(seq: int, record: rec.Write, fd: int | None, key: Key | None,
                        first_flags: int = 0, pool: BufferPool | None = None
                        ) -> list[bytearray | memoryview]:
    """The encoded RECORD frames of a Write record, its data read from ``fd`` straight into
    the frame buffers (no copy of the data: this is the bulk of a stream).

    Byte for byte what ``Frame.encode`` of ``record_frames(...)`` gives (the same
    ``_seal``; tests/replication compare them); ``fd`` None (the file is gone) or a
    short file gives a shorter write, as ``read_write_data`` would.  ``first_flags``
    (SKIP) goes on the first frame only; ``key`` None: not sealed yet (``seal_frame``).
    With a ``pool`` the frames are views of its buffers (none zeroed first), valid until
    dropped.
    """
    out: list[bytearray | memoryview] = []
    start = 0
    while True:
        want = min(CHUNK, record.length - start)
        part = attrs.evolve(record, offset=record.offset + start, length=want)
        rtype, body = rec.encode_record(part)
        head = FRAME_HEADER.size + RECORD_HEAD.size + len(body)
        buf: bytearray | memoryview = bytearray(head + want + MAC_SIZE) if pool is None \
            else pool.take(head + want + MAC_SIZE)
        got = 0
        if fd is not None and want:
            with memoryview(buf) as view:
                got = os.preadv(fd, [view[head:head + want]], record.offset + start)
        if got < want:  # the file is shorter now: send what it holds, as read_write_data
            rtype, body = rec.encode_record(attrs.evolve(part, length=got))  # same size
            buf = buf[:head + got + MAC_SIZE]
        more = MORE if got == want and start + want < record.length else 0
        RECORD_HEAD.pack_into(buf, FRAME_HEADER.size, rtype, len(body))
        buf[FRAME_HEADER.size + RECORD_HEAD.size:head] = body
        _seal(buf, RECORD, more | (first_flags if not out else 0),
              head - FRAME_HEADER.size + got, seq, key)
        out.append(buf)
        start += got
        if not more:
            return out


# -- runs of records (RUN frames) ------------------------------------------------------------


def write_record_payload(record: rec.Write, fd: int | None) -> bytes:
    """The RECORD payload of a Write of at most CHUNK bytes, its data read from ``fd`` now:
    what the one frame ``encode_write_frames`` makes of it carries (``fd`` None, the file
    gone, or a file shorter now: the write shrinks to what it holds)."""
    data = os.pread(fd, record.length, record.offset) if fd is not None and record.length \
        else b""
    if len(data) != record.length:
        record = attrs.evolve(record, length=len(data))
    return encode_record_payload(record, data)


RUN_RECORD = struct.Struct("<QHIHI")  # RUN_ENTRY and RECORD_HEAD of a record in a run
assert RUN_RECORD.size == RUN_ENTRY.size + RECORD_HEAD.size
_HEADER_SPACE = bytes(FRAME_HEADER.size)
_MAC_SPACE = bytes(MAC_SIZE)


@attrs.define(eq=False)
class RunEncoder:
    """Records gathered into RUN frames of about RUN_BYTES (an origin's small records).

    :meth:`add` a record's payload with its seq and flags (or :meth:`add_record` its
    type and body: no payload made); encoded frames are appended to the ``out`` list
    given.  A run of one record is sent as a plain RECORD frame."""

    key: Key
    _parts: list[bytes] = attrs.field(factory=list)
    _single: tuple[int, int, int, bytes, bytes] | None = None  # seq, flags, type, body, data
    _count: int = 0
    _size: int = 0
    _last: int = 0

    def add(self, seq: int, flags: int, payload: bytes, out: Out) -> None:
        """Add a RECORD payload (``encode_record_payload``)."""
        if self._size + RUN_ENTRY.size + len(payload) > MAX_FRAME_PAYLOAD:
            self.flush(out)
        if not self._count:
            self._single = (seq, flags, -1, payload, b"")
        self._parts += (RUN_ENTRY.pack(seq, flags, len(payload)), payload)
        self._added(seq, RUN_ENTRY.size + len(payload), out)

    def add_record(self, seq: int, flags: int, rtype: int, body: bytes,
                   out: Out, data: bytes = b"") -> int:
        """Add the record of type ``rtype`` whose encoding (``sdeefs.records``) is
        ``body``, then ``data`` (a Write's): what ``add`` of ``encode_record_payload`` of
        it does, byte for byte.  The bytes it counts for a sender's batch (64 + payload)."""
        length = RECORD_HEAD.size + len(body) + len(data)
        if self._size + RUN_ENTRY.size + length > MAX_FRAME_PAYLOAD:
            self.flush(out)
        if not self._count:
            self._single = (seq, flags, rtype, body, data)
        self._parts += (RUN_RECORD.pack(seq, flags, length, rtype, len(body)), body)
        if data:
            self._parts.append(data)
        self._added(seq, RUN_ENTRY.size + length, out)
        return 64 + length

    def _added(self, seq: int, size: int, out: Out) -> None:
        self._count += 1
        self._size += size
        self._last = seq
        if self._size >= RUN_BYTES:
            self.flush(out)

    def flush(self, out: Out) -> None:
        """Close the run being gathered (if any) into a frame on ``out``."""
        if self._count == 1 and self._single is not None:
            seq, flags, rtype, body, data = self._single
            payload = body if rtype < 0 else RECORD_HEAD.pack(rtype, len(body)) + body + data
            out.append(Frame(RECORD, seq, payload, flags).encode(self.key))
        elif self._count:
            # header and MAC space around the parts in one join: one copy, no zeroing
            buf = bytearray().join([_HEADER_SPACE, *self._parts, _MAC_SPACE])
            _seal(buf, RECORD, RUN, self._size, self._last, self.key)
            out.append(buf)
        self._parts, self._single, self._count, self._size = [], None, 0, 0


def split_run(payload: Payload, seq: int) -> list[tuple[int, int, memoryview]]:
    """The records of a RUN frame's payload as (seq, flags, RECORD payload: a view),
    checked whole: ProtocolError (nothing of the frame may be applied) unless it is one
    or more complete entries, flags SKIP at most, seqs strictly increasing, the last the
    frame's ``seq``.  The records themselves are judged one by one when applied
    (``decode_record_payload``: a bad one is the user's problem, not the link's)."""
    view = memoryview(payload)
    entries: list[tuple[int, int, memoryview]] = []
    pos, last, size = 0, 0, len(view)
    while pos < size:
        if pos + RUN_ENTRY.size > size:
            raise ProtocolError("a run of records is cut short")
        entry_seq, flags, length = RUN_ENTRY.unpack_from(view, pos)
        pos += RUN_ENTRY.size
        if pos + length > size:
            raise ProtocolError("a run of records is cut short")
        if flags & ~SKIP or entry_seq <= last:
            raise ProtocolError(f"a run of records with flags {flags:#x} or seq {entry_seq} "
                                f"after {last}")
        entries.append((entry_seq, flags, view[pos:pos + length]))
        pos += length
        last = entry_seq
    if not entries or last != seq:
        raise ProtocolError(f"a run of records ends at seq {last}, its frame says {seq}")
    return entries
