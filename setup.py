"""The compiled parts of the Python package: the capture's hot path
(``sdeefs/fs/_capturec.c``), a replica's common records (``sdeefs/replication/
_applyc.c``) and the MAC check of the frames it receives (``sdeefs/replication/_gmacc.c``,
OpenSSL's libcrypto).  Optional: where they cannot be built, sdeefs.fs.capture,
sdeefs.fs.reconcile, sdeefs.replication.applier and sdeefs.replication.wire use their
pure-Python paths (same results, slower)."""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]
setup(ext_modules=[Extension("sdeefs.fs._capturec", ["sdeefs/fs/_capturec.c"],
                             extra_compile_args=FLAGS, optional=True),
                   Extension("sdeefs.replication._applyc", ["sdeefs/replication/_applyc.c"],
                             extra_compile_args=FLAGS, optional=True),
                   Extension("sdeefs.replication._gmacc", ["sdeefs/replication/_gmacc.c"],
                             libraries=["crypto"], extra_compile_args=FLAGS, optional=True)])
