"""The compiled parts of the Python package: the capture's hot path
(``sdeefs/fs/_capturec.c``) and a replica's common records (``sdeefs/replication/
_applyc.c``).  Optional: where they cannot be built, sdeefs.fs.capture, sdeefs.fs.reconcile
and sdeefs.replication.applier use their pure-Python paths (same results, slower)."""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]
setup(ext_modules=[Extension("sdeefs.fs._capturec", ["sdeefs/fs/_capturec.c"],
                             extra_compile_args=FLAGS, optional=True),
                   Extension("sdeefs.replication._applyc", ["sdeefs/replication/_applyc.c"],
                             extra_compile_args=FLAGS, optional=True)])
