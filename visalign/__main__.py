"""``python -m visalign ...`` runs the command-line interface (see :mod:`visalign.cli`)."""

from visalign.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
