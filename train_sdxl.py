"""Train an SDXL LoRA from a folder of captioned images.

Not implemented yet: this script arrives with issue #3. It exists now so that the layout is
complete; it says so and exits with status 2 rather than pretend to work.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_known_args(argv)
    print("train_sdxl.py is not implemented yet (planned in issue #3); see README.md for what works today",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
