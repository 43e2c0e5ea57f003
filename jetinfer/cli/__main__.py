"""`python -m jetinfer.cli`: the `jetinfer` command."""

import sys

from jetinfer.cli import main

sys.exit(main())
