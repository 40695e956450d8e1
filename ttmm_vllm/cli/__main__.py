"""`python -m ttmm_vllm.cli`: the `ttmm` command without its console script."""

import sys

from ttmm_vllm.cli import main

sys.exit(main())
