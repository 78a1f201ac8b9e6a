"""`python -m engramlab ...` (also under `torchrun --nproc_per_node N -m engramlab ...`) and the `engramlab` script.

The heavy libraries (torch, transformers) load while `engramlab.cli` is imported; a Ctrl-C then ends with one line,
not a traceback through the import machinery.
"""

import sys


def run() -> None:
    try:
        from engramlab.cli import main
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C) while starting.", file=sys.stderr)
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
