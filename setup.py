"""The one compiled part of the Python package: the capture's hot path
(``sdeefs/fs/_capturec.c``).  Optional: where it cannot be built, sdeefs.fs.capture
and sdeefs.fs.reconcile use their pure-Python paths (same results, slower)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("sdeefs.fs._capturec", ["sdeefs/fs/_capturec.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra",
                                                 "-Wno-unused-parameter"],
                             optional=True)])
