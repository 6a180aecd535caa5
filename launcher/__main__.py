"""``python -m sdeefs.launcher``: the ``sdeefs`` command."""

from .cli import main

raise SystemExit(main())
