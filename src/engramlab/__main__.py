"""`python -m engramlab ...` (also under `torchrun --nproc_per_node N -m engramlab ...`)."""

from engramlab.cli import main

if __name__ == "__main__":
    main()
