"""`python -m pipeline_sketch_guided` is the `sketch-guided` command."""

from .cli import main

raise SystemExit(main())
