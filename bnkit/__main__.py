"""``python -m bnkit ...`` is the ``bnkit`` command."""
from .cli import main

if __name__ == "__main__":  # pytest --doctest-modules imports this file too
    raise SystemExit(main())
