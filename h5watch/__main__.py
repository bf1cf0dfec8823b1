"""``python -m h5watch``: the same as the ``h5watch`` command."""

from h5watch.cli import main

raise SystemExit(main())
