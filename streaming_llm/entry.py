"""The `streaming-llm` console script: the command line (streaming_llm.cli) imported inside the interrupt guard.

Importing the CLI is light (a command loads torch and transformers when it runs, inside the CLI's own Ctrl-C handling);
a Ctrl-C while it imports all the same exits with status 130 like a Ctrl-C during the command, without a traceback.
"""

import sys


def main() -> int:
    try:
        from streaming_llm.cli import main as cli_main
    except KeyboardInterrupt:
        print(file=sys.stderr, flush=True)
        return 130
    return cli_main()
