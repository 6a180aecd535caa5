"""Types of the C extension sdeefs/replication/_gmacc.c (its comment documents matches)."""

def matches(derived_key: bytes, field: bytes | bytearray | memoryview,
            header: bytes | bytearray | memoryview,
            payload: bytes | bytearray | memoryview) -> bool: ...
