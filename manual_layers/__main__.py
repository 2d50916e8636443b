"""The command line of manual_layers: python -m manual_layers {info,demo} (-h for help)."""

import argparse
import sys

DESCRIPTION = """\
manual_layers: fused Linear(+activation) and logistic-regression layers for PyTorch whose
forward and backward passes are hand-written C++ (CPU) and CUDA kernels."""

EPILOG = """\
commands:
  info   print what this installation was built with: torch version it was built against,
         CPU instruction set of the kernels, whether CUDA kernels were compiled (and for which
         GPU architectures), and the GPUs visible now.
  demo   the showcase, on the CPU in well under a minute: an MLP trained on scikit-learn's
         digits with manual_layers.Linear(activation="gelu") next to nn.Linear + nn.GELU, then
         logistic regression fitted with manual_layers next to scikit-learn and plain PyTorch,
         with test accuracy and fit times (what each time includes is printed with it).

examples:
  python -m manual_layers info
  python -m manual_layers demo
"""


def parser():
    p = argparse.ArgumentParser(prog="python -m manual_layers", description=DESCRIPTION,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["info", "demo"], nargs="?", help="what to run (see below)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    args = p.parse_args(argv)  # -h / --help: prints the help and exits 0
    if args.command is None:  # no command: say what there is, and succeed
        p.print_help()
        return 0
    if args.command == "demo":
        from manual_layers import demo
        return demo.main() or 0
    import manual_layers
    for k, v in manual_layers.utils.info().items():
        print(f"{k:24s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
