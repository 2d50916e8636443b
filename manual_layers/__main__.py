"""python -m manual_layers info : print what this installation was built with.
python -m manual_layers demo : the showcase (train and compare; see manual_layers/demo.py)."""

import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("info", "demo"):
        print("usage: python -m manual_layers {info,demo}", file=sys.stderr)
        return 2
    if argv[0] == "demo":
        from manual_layers import demo
        return demo.main() or 0
    import manual_layers
    for k, v in manual_layers.info().items():
        print(f"{k:24s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
