"""``python -m sdeefs``: the ``sdeefs`` command (assembled by the launcher, sdeefs.launcher.cli).

An entry point, not a module of the core: nothing imports it.
"""

from sdeefs.launcher.cli import main

raise SystemExit(main())
