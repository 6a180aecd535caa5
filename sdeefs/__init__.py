"""sdeefs: self-deployed execution environments for HPC.

A journaled copy-on-write FUSE overlay of the host root (``cow``, ``ops``),
its journal (``journal``, ``records``, ``apply``), and the tools around it.
"""

__version__ = "0.1.0"
