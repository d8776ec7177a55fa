"""``python -m timm_sadistill <subcommand> ...`` (also what ``torchrun -m timm_sadistill train`` runs)."""
import sys

from .cli import main

if __name__ == '__main__':
    sys.exit(main())
