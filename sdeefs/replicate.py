"""Streaming a user's journal to replicas: the wire format, the sender and the replica.

Wire format (version 1)
=======================

Every frame::

    header   FRAME_HEADER, 24 bytes, little endian
             magic    4s   b"SDRP"
             version  u8   1
             type     u8   HELLO / RECORD / ACK / ERROR
             flags    u16  RECORD: MORE (1) = more chunks of this seq follow
             length   u32  payload bytes (at most MAX_FRAME_PAYLOAD)
             seq      u64  RECORD: journal seq; ACK: last applied seq; HELLO: resume point
             crc32    u32  of the header (crc field zero) and the payload
    payload  ``length`` bytes
    mac      32 bytes: HMAC-SHA256(session key, header + payload)

The session key is HMAC-SHA256(shared key, b"sdeefs-replication" + replica nonce + sender
nonce): the replica's HELLO carries a fresh 16-byte nonce, the sender answers with its own, so
a frame recorded in one session is worthless in another (no replay).  MUNGE credentials can
replace the shared key where MUNGE runs (SLURM's standard); the frame format does not change.

Payloads:

* HELLO: nonce 16s, user (u16 length + bytes); ``seq`` = first seq the replica wants.
* RECORD: rtype u16, record length u32, record payload (``sdeefs.records`` encoding), then
  data bytes for Write records (a chunk of the written range: the record's offset/length
  describe the chunk).  Big writes travel as several RECORD frames of one seq with MORE set
  on all but the last; the replica's applied seq moves only with the last.
* ACK: empty; ``seq`` = the replica's applied seq (durable).
* ERROR: a UTF-8 message; the sender stops and reports it.

Replica rules (every byte from a peer is hostile): a frame with a bad magic, version, CRC,
MAC or length is rejected; a RECORD whose seq is neither the applied seq + 1 nor a MORE
continuation of the seq being applied is rejected ("out of sequence", the sender must
resync); records are decoded strictly (``sdeefs.records``: no unsafe path, no device node)
and then made safe: set-user/group-ID bits are stripped from every mode, and xattrs other
than ``user.*`` and the overlay's own ``trusted.overlay.*``/``user.overlay.*`` are refused
(no ``security.capability``, no other ``trusted.*``).  Paths are resolved under the
replica's layer root with ``openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)`` (``sdeefs.apply``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import stat
import struct
import zlib

import attrs
import trio

from . import records as rec
from .apply import apply_record, read_write_data
from .cow import LayerRoot
from .errors import BadRecord
from .journal import Journal, NullJournal
from .sysio import write_file_atomic

log = logging.getLogger(__name__)

MAGIC = b"SDRP"
VERSION = 1
HELLO, RECORD, ACK, ERROR = 1, 2, 3, 4
MORE = 1
FRAME_HEADER = struct.Struct("<4sBBHIQI")
assert FRAME_HEADER.size == 24
MAC_SIZE = 32
MAX_FRAME_PAYLOAD = 2 << 20
CHUNK = 1 << 20  # data bytes per RECORD frame
NONCE_SIZE = 16
ALLOWED_XATTR_PREFIXES = (b"user.", b"trusted.overlay.")


class ProtocolError(Exception):
    """A frame or a record that must not be applied; nothing was changed."""


@attrs.frozen
class Frame:
    type: int
    seq: int
    payload: bytes = b""
    flags: int = 0


def session_key(shared_key: bytes, replica_nonce: bytes, sender_nonce: bytes) -> bytes:
    return hmac.new(shared_key, b"sdeefs-replication" + replica_nonce + sender_nonce,
                    hashlib.sha256).digest()


def encode_frame(frame: Frame, key: bytes) -> bytes:
    if len(frame.payload) > MAX_FRAME_PAYLOAD:
        raise ValueError("frame payload too large")
    header = FRAME_HEADER.pack(MAGIC, VERSION, frame.type, frame.flags, len(frame.payload),
                               frame.seq, 0)
    crc = zlib.crc32(header + frame.payload)
    header = header[:-4] + struct.pack("<I", crc)
    body = header + frame.payload
    return body + hmac.new(key, body, hashlib.sha256).digest()


def decode_header(data: bytes) -> tuple[int, int, int, int, int]:
    """(type, flags, length, seq, crc) of a frame header; ProtocolError if malformed."""
    if len(data) != FRAME_HEADER.size:
        raise ProtocolError("truncated frame header")
    magic, version, ftype, flags, length, seq, crc = FRAME_HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError("not an sdeefs replication frame (bad magic)")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    if ftype not in (HELLO, RECORD, ACK, ERROR) or flags & ~MORE:
        raise ProtocolError(f"bad frame type {ftype} or flags {flags:#x}")
    if length > MAX_FRAME_PAYLOAD:
        raise ProtocolError(f"frame of {length} bytes is too large")
    return ftype, flags, length, seq, crc


def check_frame(header: bytes, payload: bytes, mac: bytes, key: bytes) -> Frame:
    """Verify CRC and MAC of a received frame; return it or raise ProtocolError."""
    ftype, flags, length, seq, crc = decode_header(header)
    if len(payload) != length or len(mac) != MAC_SIZE:
        raise ProtocolError("frame truncated")
    if zlib.crc32(header[:-4] + b"\0\0\0\0" + payload) != crc:
        raise ProtocolError("frame checksum mismatch")
    if not hmac.compare_digest(hmac.new(key, header + payload, hashlib.sha256).digest(), mac):
        raise ProtocolError("frame authentication failed")
    return Frame(ftype, seq, payload, flags)


async def _receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise ProtocolError("connection closed in the middle of a frame")
        data += chunk
    return bytes(data)


async def receive_frame(stream: trio.abc.ReceiveStream, key: bytes) -> Frame:
    header = await _receive_exactly(stream, FRAME_HEADER.size)
    _, _, length, _, _ = decode_header(header)
    payload = await _receive_exactly(stream, length)
    mac = await _receive_exactly(stream, MAC_SIZE)
    return check_frame(header, payload, mac, key)


# -- record payloads -------------------------------------------------------------------------


def encode_record_payload(record: rec.Record, data: bytes = b"") -> bytes:
    rtype, body = rec.encode_record(record)
    return struct.pack("<HI", rtype, len(body)) + body + data


def decode_record_payload(payload: bytes) -> tuple[rec.Record, bytes]:
    """(record, data) from a RECORD payload, made safe to apply; ProtocolError otherwise."""
    if len(payload) < 6:
        raise ProtocolError("record frame too short")
    rtype, length = struct.unpack_from("<HI", payload)
    if 6 + length > len(payload):
        raise ProtocolError("record runs past the frame")
    try:
        record = rec.decode_record(rtype, payload[6:6 + length])
    except BadRecord as exc:
        raise ProtocolError(f"bad record: {exc}") from None
    data = payload[6 + length:]
    if isinstance(record, rec.Write):
        if len(data) > record.length:
            raise ProtocolError("more data than the write record covers")
    elif data:
        raise ProtocolError("data attached to a record that takes none")
    return sanitize(record), data


def sanitize(record: rec.Record) -> rec.Record:
    """What a replica applies: no set-ID bits, only the xattrs an upper legitimately has."""
    if isinstance(record, rec.Mkdir | rec.Mknod | rec.Setattr) and record.mode & 0o6000:
        record = attrs.evolve(record, mode=record.mode & ~0o6000)
    if isinstance(record, rec.Setxattr | rec.Removexattr) and not record.name.startswith(
            ALLOWED_XATTR_PREFIXES):
        raise ProtocolError(f"xattr {record.name[:64]!r} is not replicated")
    if isinstance(record, rec.Mknod) and stat.S_ISCHR(record.mode) and record.mode & 0o7777:
        raise ProtocolError("a whiteout must have mode 0")
    return record


# -- the replica -----------------------------------------------------------------------------


@attrs.define(eq=False)
class Replica:
    """One user's copy of the layer root on a compute node.

    Attributes:
        root: ``<replica dir>/<user>``, holding ``upper/``, ``work/`` and ``applied``.
        applied: the last journal seq fully applied (persisted in ``applied``).
        pending: the seq whose chunks are being applied (0 if none).
    """

    root: str
    applied: int = 0
    pending: int = 0

    @classmethod
    def open(cls, root: str) -> Replica:
        for sub in ("upper", "work"):
            os.makedirs(os.path.join(root, sub), mode=0o755, exist_ok=True)
        try:
            with open(os.path.join(root, "applied")) as f:
                applied = int(f.read().strip() or 0)
        except FileNotFoundError:
            applied = 0
        return cls(root, applied)

    def _layers(self) -> LayerRoot:
        fds = [os.open(os.path.join(self.root, sub), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
               for sub in ("upper", "work")]
        return LayerRoot(fds[0], fds[1], NullJournal())

    def accept(self, frame: Frame) -> bool:
        """Apply one RECORD frame; True when its seq is complete (then ACK it)."""
        if frame.type != RECORD:
            raise ProtocolError(f"unexpected frame type {frame.type}")
        if self.pending:
            if frame.seq != self.pending:
                raise ProtocolError(f"out of sequence: seq {frame.seq} while {self.pending} "
                                    "is incomplete")
        elif frame.seq != self.applied + 1:
            raise ProtocolError(f"out of sequence: seq {frame.seq} after {self.applied}")
        record, data = decode_record_payload(frame.payload)
        layers = self._layers()
        try:
            apply_record(layers, record, data if isinstance(record, rec.Write) else None)
        except OSError as exc:
            raise ProtocolError(f"record {frame.seq} cannot be applied: {exc}") from None
        finally:
            layers.close()
        if frame.flags & MORE:
            self.pending = frame.seq
            return False
        self.pending = 0
        self.applied = frame.seq
        write_file_atomic(os.path.join(self.root, "applied"), f"{self.applied}\n".encode())
        return True


async def serve_replica(stream: trio.abc.Stream, replica_dir: str, shared_key: bytes,
                        user: str) -> int:
    """The replica side of one connection: HELLO, then apply and ACK until the peer closes.

    Returns the applied seq.  A bad frame is logged, answered with ERROR, and ends the
    connection without applying anything of it.
    """
    replica = Replica.open(os.path.join(replica_dir, user))
    nonce = secrets.token_bytes(NONCE_SIZE)
    hello = Frame(HELLO, replica.applied + 1,
                  nonce + struct.pack("<H", len(user)) + user.encode())
    await stream.send_all(encode_frame(hello, shared_key))
    answer = await receive_frame(stream, shared_key)
    if answer.type != HELLO or len(answer.payload) != NONCE_SIZE:
        raise ProtocolError("the sender did not answer HELLO")
    key = session_key(shared_key, nonce, answer.payload)
    try:
        while True:
            try:
                frame = await receive_frame(stream, key)
            except ProtocolError as exc:
                if "closed" in str(exc):
                    return replica.applied
                raise
            if replica.accept(frame):
                try:
                    await stream.send_all(encode_frame(Frame(ACK, replica.applied), key))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return replica.applied  # the sender went away; it resumes from here
    except ProtocolError as exc:
        log.error("replica %s: rejected: %s", user, exc)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(encode_frame(Frame(ERROR, replica.applied,
                                                     str(exc).encode()[:4096]), key))
        raise


# -- the sender ------------------------------------------------------------------------------


async def send_journal(stream: trio.abc.Stream, journal: Journal, source: LayerRoot,
                       shared_key: bytes, upto: int | None = None) -> int:
    """Stream records from the replica's resume point to ``upto`` (default: the head).

    Returns the seq the replica acknowledged last.  Aborted records and records whose
    file is gone still travel (as empty writes), so the replica's sequence has no gaps.
    """
    hello = await receive_frame(stream, shared_key)
    if hello.type != HELLO or len(hello.payload) < NONCE_SIZE + 2:
        raise ProtocolError("the replica did not say HELLO")
    nonce = secrets.token_bytes(NONCE_SIZE)
    await stream.send_all(encode_frame(Frame(HELLO, 0, nonce), shared_key))
    key = session_key(shared_key, hello.payload[:NONCE_SIZE], nonce)
    if hello.seq < journal.first_seq():
        raise ProtocolError(f"the replica needs seq {hello.seq}, trimmed from the journal: "
                            "it must be resynced from a snapshot")
    acked = hello.seq - 1
    last = hello.seq - 1
    entries = list(journal.read(hello.seq))
    aborted = {e.record.seq for e in entries if isinstance(e.record, rec.Abort)}
    for entry in entries:
        if upto is not None and entry.seq > upto:
            break
        record = entry.record
        if entry.seq in aborted:
            record = rec.Sync(0)  # keeps the sequence without applying what did not happen
        for payload, more in _record_frames(record, source):
            await stream.send_all(encode_frame(Frame(RECORD, entry.seq, payload,
                                                     MORE if more else 0), key))
        last = entry.seq
    while acked < last:
        frame = await receive_frame(stream, key)
        if frame.type == ERROR:
            raise ProtocolError("replica refused: " + frame.payload.decode(errors="replace"))
        if frame.type == ACK:
            acked = frame.seq
    return acked


def _record_frames(record: rec.Record, source: LayerRoot) -> list[tuple[bytes, bool]]:
    if not isinstance(record, rec.Write):
        return [(encode_record_payload(record), False)]
    data = read_write_data(source, record) or b""
    frames = []
    for start in range(0, max(len(data), 1), CHUNK):
        chunk = data[start:start + CHUNK]
        part = attrs.evolve(record, offset=record.offset + start, length=len(chunk))
        frames.append((encode_record_payload(part, chunk), start + CHUNK < len(data)))
    return frames
