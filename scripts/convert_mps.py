"""Convert MPS's official pickled checkpoint to safetensors once, without running any of its code.

python scripts/convert_mps.py MPS_overall_checkpoint.pth mps.safetensors
"""

import sys

from alignprop import cli
from alignprop.rewards import mps

if __name__ == "__main__":
    sys.exit(cli.run(lambda argv: mps.main(["convert", *argv]), sys.argv[1:]))
