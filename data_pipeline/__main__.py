"""``python -m data_pipeline <command>``: see :mod:`data_pipeline.cli`."""

from data_pipeline.cli import main

raise SystemExit(main())
