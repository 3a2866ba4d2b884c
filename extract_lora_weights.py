"""Extract a weights-only LoRA file from a training checkpoint, or convert a LoRA between formats.

Not implemented yet: this script arrives with issue #4. It exists now so that the layout is
complete; it says so and exits with status 2 rather than pretend to work.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_known_args(argv)
    print("extract_lora_weights.py is not implemented yet (planned in issue #4); see README.md for what works today",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
