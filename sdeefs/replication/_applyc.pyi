"""Types of the C extension sdeefs/replication/_applyc.c (its comment documents apply)."""

Ranges = tuple[tuple[int, int], ...] | None
WRITE_PIECE: int  # bytes per pwrite of a record's data (see the source's comment)

def apply(payload: bytes | bytearray | memoryview, dirs: dict[bytes, int],
          files: dict[bytes, int], applier: object, uids: Ranges, gids: Ranges) -> bool: ...

def apply_run(entries: list[tuple[int, int, memoryview]], index: int, applied: int,
              dirs: dict[bytes, int], files: dict[bytes, int], applier: object,
              uids: Ranges, gids: Ranges) -> tuple[int, int, OSError | None]: ...
