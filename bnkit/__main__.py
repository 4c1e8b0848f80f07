"""``python -m bnkit ...`` is the ``bnkit`` command."""
from .cli import main

raise SystemExit(main())
