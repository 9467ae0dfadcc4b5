"""The `momoe` command line: a thin layer over the library."""
import argparse
import os
from typing import List, Optional


def cmd_demo(args: argparse.Namespace) -> None:
    from momoe import demo

    demo.main(tokens=args.tokens, top_k=args.top_k)


def cmd_ops(args: argparse.Namespace) -> None:
    import torch

    import momoe

    print(f"momoe {momoe.__version__}, torch {torch.__version__}, backend: {momoe.get_backend()}, "
          f"extension built: {momoe.extension_available()}")
    if momoe.extension_available():
        for name in sorted(torch.ops.momoe._dir):
            print(f"  torch.ops.momoe.{name}: {getattr(torch.ops.momoe, name).default._schema}")


def cmd_convert(args: argparse.Namespace) -> None:
    from momoe.models import from_pretrained
    from momoe.models.mamba.convert_mamba import EXPORTERS

    if os.path.realpath(args.src) == os.path.realpath(args.dst):
        raise SystemExit("momoe convert: SRC and DST must be different folders")
    try:
        model = from_pretrained(args.src)
        if args.to == "momoe":
            model.save_pretrained(args.dst)
        else:
            EXPORTERS[args.to](model, args.dst)
    except (ValueError, TypeError) as error:  # CheckpointError is a ValueError
        raise SystemExit(f"momoe convert: {error}") from None
    print(f"momoe: wrote {args.dst} ({args.to} layout, {model.num_parameters():,} parameters)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="momoe", description="momoe: modality-aware sparse model zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a modality-split MoE layer through the ops and check it")
    demo.add_argument("--tokens", type=int, default=2048)
    demo.add_argument("--top-k", type=int, default=1)
    demo.set_defaults(func=cmd_demo)
    ops = sub.add_parser("ops", help="list the registered torch.ops.momoe ops")
    ops.set_defaults(func=cmd_ops)
    convert = sub.add_parser("convert", help="convert a checkpoint (momoe, mamba-ssm, Hugging Face Mamba) to a layout")
    convert.add_argument("src", metavar="SRC", help="checkpoint folder in any supported layout (detected)")
    convert.add_argument("dst", metavar="DST", help="output folder")
    convert.add_argument("--to", required=True, choices=["momoe", "mamba-ssm", "hf"], help="layout to write")
    convert.set_defaults(func=cmd_convert)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
