"""Generate a COCO-style image dataset from prompts with a trained LoRA.

Not implemented yet: this script arrives with issue #5. It exists now so that the layout is
complete; it says so and exits with status 2 rather than pretend to work.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_known_args(argv)
    print("generate_images.py is not implemented yet (planned in issue #5); see README.md for what works today",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
