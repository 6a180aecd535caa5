"""Types of the C extension sdeefs/fs/_capturec.c (its comment documents the functions)."""

Unresolved = tuple[int, int, bytes | None, tuple[tuple[int, bytes, bytes], ...]]
Contents = tuple[bytes, int, int, int, int, int]  # data, before mode/ino/ctime, after m/ctime
Examined = tuple[int, int, int, int, int, int, int, int, bytes,
                 tuple[tuple[bytes, bytes], ...], bytes, Contents | bool | None]

def note_events(buf: bytes, dirs: dict[int, bytes], objects: dict[int, bytes],
                data: set[int], names: set[tuple[int, bytes]]
                ) -> tuple[int, int, list[Unresolved]]: ...
def examine(dir_fd: int, entries: list[tuple[bytes, int, int, int, int, bool]]
            ) -> list[Examined | None]: ...
