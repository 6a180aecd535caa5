"""Types of the C extension sdeefs/replication/_gmacc.c (its comment documents matches
and seal)."""

def matches(derived_key: bytes, field: bytes | bytearray | memoryview,
            header: bytes | bytearray | memoryview,
            payload: bytes | bytearray | memoryview) -> bool: ...
def seal(derived_key: bytes, nonce: bytes, frame: bytearray | memoryview, end: int) -> None: ...
