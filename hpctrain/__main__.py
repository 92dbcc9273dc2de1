"""`python -m hpctrain ...`: what `torchrun -m hpctrain train ...` runs."""
import sys

from hpctrain.cli import main

sys.exit(main())
