"""python -m manual_layers info : print what this installation was built with."""

import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("info",):
        print("usage: python -m manual_layers info", file=sys.stderr)
        return 2
    import manual_layers
    for k, v in manual_layers.info().items():
        print(f"{k:24s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
