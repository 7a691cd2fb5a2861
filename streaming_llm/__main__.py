"""`python -m streaming_llm ...`: the `streaming-llm` command, for an environment whose scripts are not on PATH."""

import sys

from streaming_llm.entry import main

sys.exit(main())
