"""`deepspeed train.py --deepspeed ds_configs/zero3.json --config demo --stage 1 ...` (see `rsmoe train --help`)."""

import sys

from rsmoe.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
