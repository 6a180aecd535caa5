"""Transitional: ``launcher/job.py`` (the launcher room's) imports ``control_request`` from
here.  The replication daemon is ``sdeefs.replication.daemon``; remove this module once
job.py imports it from there."""

from .replication.daemon import control_request

__all__ = ["control_request"]
