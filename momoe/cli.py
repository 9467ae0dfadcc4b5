"""The `momoe` command line: a thin layer over the library.

momoe demo | train | eval | generate | info | compare | merge | ops | convert | consolidate  (`momoe <command> -h`)

`momoe train` runs unchanged under `torchrun --nproc-per-node N -m momoe train ... [--parallel ddp|fsdp|ep]`
(docs/distributed.md).
"""
import argparse
import dataclasses
import json
import os
from typing import List, Optional

import torch

import momoe
from momoe import demo
from momoe.checkpoint import load_json
from momoe.data import load_dataset, load_tokenizer
from momoe.distributed import STRATEGIES, consolidate
from momoe.models import build_model, from_pretrained
from momoe.train import (
    TrainConfig,
    Trainer,
    continue_document,
    evaluate,
    linear_merge,
    load_checkpoints,
    mixture_search,
    parse_prompt,
    save_continuation,
)
from momoe.train.checkpointing import (STATE_JSON, is_distributed_checkpoint, latest_checkpoint, read_training_state,
                                       resolve_checkpoint, resolve_model)
from momoe.train.compare import compare_models, flops_per_step, format_comparison, modality_mix, save_comparison
from momoe.train.info import format_info, model_info
from momoe.train.merging import merged_model
from momoe.train.parallel import Parallel, start_parallel, stop_parallel
from momoe.train.specs import FAMILIES, family_config, fit_to_vocab, load_model_config
from momoe.train.table import format_table
from momoe.train.trainer import resumed_config

DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


# ---------------------------------------------------------------- shared argument groups
def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (a card, a config/checkpoint, or a family with sizes)")
    group.add_argument("--model", help="zoo card name (momoe.list_cards()), config JSON file or checkpoint folder")
    group.add_argument("--family", help="transformer, mot, moma, mamba, mom-mamba or mor, sized by the flags below")
    group.add_argument("--d-model", type=int, default=128)
    group.add_argument("--n-layer", type=int, default=4)
    group.add_argument("--n-heads", type=int, default=4)
    group.add_argument("--experts", type=int, default=2, help="experts per modality (moma)")
    group.add_argument("--d-ff", type=int, default=None, help="FFN hidden size (default: SwiGLU's 8/3 d_model)")
    group.add_argument("--fit-vocab", action="store_true",
                       help="set the model's vocab_size to the data's (e.g. to train a card's architecture)")


def add_data_args(parser: argparse.ArgumentParser, split: Optional[str] = None,
                  default: Optional[str] = "builtin") -> None:
    parser.add_argument("--dataset", default=default, help="'builtin' or a dataset root/folder (momoe.data)")
    if split is not None:
        parser.add_argument("--split", default=split, choices=["train", "validation"])


def add_batch_args(parser: argparse.ArgumentParser, default_none: bool = False) -> None:
    parser.add_argument("--batch-size", type=int, default=None if default_none else DEFAULTS["batch_size"])
    parser.add_argument("--seq-len", type=int, default=None if default_none else DEFAULTS["seq_len"])


def model_config(args: argparse.Namespace, vocab, spec: Optional[str] = None):
    """The config a command asks for: a family sized by the flags, or a card/config/checkpoint."""
    family = args.family if spec is None else (spec if spec in FAMILIES else None)
    if family is not None:
        return family_config(family, vocab, d_model=args.d_model, n_layer=args.n_layer, n_heads=args.n_heads,
                             experts=args.experts, d_ff=args.d_ff)
    spec = spec or args.model
    if spec is None:
        raise ValueError("momoe: give --model (card, config JSON, checkpoint) or --family (with sizes)")
    return fit_to_vocab(load_model_config(spec), vocab, resize=args.fit_vocab)


def checkpoint_dataset(folder: str) -> str:
    """The dataset a checkpoint was trained on (its training state's metadata), else 'builtin'."""
    path = os.path.join(folder, STATE_JSON)
    if os.path.isfile(path):
        return load_json(path).get("metadata", {}).get("dataset", "builtin")
    return "builtin"


def load_checkpoint(path: str, device: str):
    """(model folder, model on device) of a checkpoint or run folder."""
    folder = resolve_model(path)
    return folder, from_pretrained(folder).to(device)


# ---------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> None:
    demo.main(out_dir=args.out, steps=args.steps, generate=not args.no_generate)


def cmd_train(args: argparse.Namespace) -> None:
    parallel = start_parallel(args.parallel, args.ep_size, args.device)
    try:
        train_run(args, parallel)
    finally:  # a failing rank leaves the job at once (torchrun then stops the others)
        stop_parallel()


def train_run(args: argparse.Namespace, parallel: Parallel) -> None:
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    latest = latest_checkpoint(args.out) if args.resume else None
    if args.resume and latest is None:
        raise ValueError(f"momoe: --resume: {args.out} has no checkpoint to resume from")
    if latest is not None:
        state, _ = read_training_state(latest)
        config = resumed_config(state, given, parallel.world_size)
        dataset = args.dataset or state.get("metadata", {}).get("dataset", "builtin")
    else:
        config = TrainConfig(**given)
        dataset = args.dataset or "builtin"
    data = load_dataset(dataset, "train")
    torch.manual_seed(config.seed)
    if latest is not None:
        model = build_model(load_model_config(latest))  # the weights come with trainer.resume
    elif args.init:
        model = from_pretrained(resolve_model(args.init))
        data.vocab.check_model(model.config.vocab_size, model.config.modalities)
    else:
        model = build_model(model_config(args, data.vocab))
    model.to(parallel.device if parallel.strategy else args.device or "cpu")
    name = os.path.basename(os.path.normpath(args.out))
    trainer = Trainer(model, data, config, out_dir=args.out, name=name, progress=not args.quiet,
                      metadata={"dataset": dataset}, parallel=parallel)
    if latest is not None:
        resumed = trainer.resume(latest)
        if parallel.is_main:
            print(f"momoe: resuming from {resumed}")
    if parallel.is_main and parallel.strategy:
        processes = f"{parallel.world_size} process" + ("es" if parallel.world_size != 1 else "")
        ep_size = parallel.mesh["ep"].size() if parallel.mesh is not None else 1
        experts = f", MoMa's experts over groups of {ep_size} ranks" if ep_size > 1 else ""
        print(f"momoe: training on {processes} ({parallel.strategy}, {parallel.device.type}){experts}, "
              f"{config.batch_size} rows per process and micro-batch")
    records = trainer.fit()
    last = records[-1] if records else None
    if last is not None and parallel.is_main:
        per = ", ".join(f"{m} {v:.3f}" for m, v in last["loss_per_modality"].items())
        print(f"momoe: {trainer.step} updates, loss {last['loss']:.3f} ({per}); run folder {args.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    folder, model = load_checkpoint(args.checkpoint, args.device)
    data = load_dataset(args.dataset or checkpoint_dataset(folder), args.split)
    result = evaluate(model, data, args.batch_size, args.seq_len, max_batches=args.max_batches, bf16=args.bf16,
                      causal_routing=args.causal_routing)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    rows = [[m, result.tokens_per_modality[m], loss, result.perplexity_per_modality[m]]
            for m, loss in result.loss_per_modality.items()]
    rows.append(["all", sum(result.tokens_per_modality.values()), result.loss, result.perplexity])
    print(f"{folder} on {data.path}:")
    print(format_table(["modality", "targets", "loss", "perplexity"], rows))


def cmd_generate(args: argparse.Namespace) -> None:
    folder, model = load_checkpoint(args.checkpoint, args.device)
    tokenizer = load_tokenizer(args.dataset or checkpoint_dataset(folder))
    prompt = parse_prompt(args.prompt, tokenizer, then=args.then)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    ids = continue_document(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, generator=generator)
    transcript, files = save_continuation(ids, len(prompt), tokenizer, args.out)
    print(transcript)
    for path in files:
        print(f"momoe: wrote {path}")


def cmd_info(args: argparse.Namespace) -> None:
    spec = args.spec or args.model
    if args.family or spec in FAMILIES:
        config = model_config(args, load_dataset(args.dataset, "train", verify=False).vocab,
                              spec=spec if spec in FAMILIES else None)
    elif spec is not None:
        config = load_model_config(spec)
    else:
        raise ValueError("momoe: info needs a card name, a config JSON, a checkpoint or --family")
    info = model_info(config, args.seq_len)
    print(json.dumps(info, indent=2) if args.json else format_info(spec or args.family, info))


def cmd_compare(args: argparse.Namespace) -> None:
    train_data, validation = load_dataset(args.dataset, "train"), load_dataset(args.dataset, "validation")
    configs = {spec: model_config(args, train_data.vocab, spec=spec) for spec in args.models}
    dense = args.dense or args.models[0]
    base = TrainConfig(steps=1, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
                       warmup=0)
    if dense not in configs:
        raise ValueError(f"momoe: --dense {dense!r} is not one of --models {args.models}")
    budget = args.budget or args.dense_steps * flops_per_step(configs[dense], base, modality_mix(train_data))
    runs = compare_models(configs, train_data, validation, base, budget, dense=dense, evaluations=args.evaluations,
                          eval_batches=args.eval_batches, progress=not args.quiet)
    print(f"equal budget: {budget:.3e} training FLOPs; validation loss; 'vs {dense}': dense FLOPs to reach the "
          f"same loss / the model's FLOPs")
    print(format_comparison(runs, dense))
    plot = save_comparison(runs, args.out)
    print(f"momoe: wrote {os.path.join(args.out, 'compare.json')}" + (f" and {plot}" if plot else
                                                                          " (no plot: matplotlib is not installed)"))


def cmd_merge(args: argparse.Namespace) -> None:
    config, states = load_checkpoints(args.checkpoints)
    if not args.search:
        weights = args.weights or [1.0 / len(states)] * len(states)
        if args.out is None:
            raise ValueError("momoe: merge needs --out (or --search)")
        merged_model(config, linear_merge(states, weights)).save_pretrained(args.out)
        print(f"momoe: wrote {args.out} = " + " + ".join(f"{w:g} * {p}" for w, p in zip(weights, args.checkpoints)))
        return
    data = load_dataset(args.dataset, args.split)
    model = merged_model(config, states[0])

    def score(state):
        model.load_state_dict(state)
        result = evaluate(model, data, args.batch_size, args.seq_len, max_batches=args.max_batches)
        return result.loss, result.loss_per_modality

    results = mixture_search(states, score, resolution=args.resolution)
    names = [os.path.basename(os.path.normpath(p)) for p in args.checkpoints]
    modalities = list(results[0].details)
    rows = [[" ".join(f"{w:.2f}" for w in r.weights), r.score] + [r.details.get(m) for m in modalities]
            for r in results]
    print(f"mixture weights ({', '.join(names)}), merged models scored on {data.path}, best first:")
    print(format_table(["weights", "loss"] + [f"{m} loss" for m in modalities], rows))
    best = results[0]
    print("predicted best mixture: " + ", ".join(f"{n} {w:.2f}" for n, w in zip(names, best.weights)))
    if args.out:
        merged_model(config, linear_merge(states, best.weights)).save_pretrained(args.out)
        print(f"momoe: wrote the best merge to {args.out}")


def cmd_ops(args: argparse.Namespace) -> None:
    print(f"momoe {momoe.__version__}, torch {torch.__version__}, backend: {momoe.get_backend()}, "
          f"extension built: {momoe.extension_available()}")
    if momoe.extension_available():
        for name in sorted(torch.ops.momoe._dir):
            print(f"  torch.ops.momoe.{name}: {getattr(torch.ops.momoe, name).default._schema}")


def cmd_convert(args: argparse.Namespace) -> None:
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


def cmd_consolidate(args: argparse.Namespace) -> None:
    source = resolve_checkpoint(args.src)
    if not is_distributed_checkpoint(source):
        raise ValueError(f"momoe: {source} is not a distributed checkpoint; it loads with momoe.from_pretrained as is")
    consolidate(source, args.dst)
    print(f"momoe: wrote {args.dst} (config.json + model.safetensors) from {source}")


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="momoe", description="momoe: modality-aware sparse model zoo")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a tiny dense transformer, MoMa and Mixture-of-Mamba on the builtin data")
    demo.add_argument("--out", default=os.path.join("runs", "demo"))
    demo.add_argument("--steps", type=int, default=None, help="updates per model (default: the demo's own)")
    demo.add_argument("--no-generate", action="store_true", help="skip the generated image")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train a model on a dataset (checkpoints, JSONL log, loss plot)")
    add_model_args(train)
    train.add_argument("--init", help="start from this checkpoint's weights (and its architecture)")
    train.add_argument("--dataset", default=None, help="'builtin' (default) or a dataset root/folder")
    train.add_argument("--out", required=True, help="run folder: log.jsonl, loss.png, checkpoints/, latest.json")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add_batch_args(train, default_none=True)
    for flag, kind, text in (("--steps", int, "optimizer updates"), ("--grad-accum", int, "micro-batches per update"),
                             ("--lr", float, "peak learning rate"), ("--min-lr-ratio", float, "final lr / peak lr"),
                             ("--warmup", int, "warmup updates (default: 10%% of steps)"),
                             ("--weight-decay", float, None), ("--clip", float, "max gradient norm (0: off)"),
                             ("--seed", int, "data order (and initialisation)"),
                             ("--log-interval", int, "updates per JSONL record"),
                             ("--checkpoint-interval", int, "updates per checkpoint (0: at the end)"),
                             ("--keep-checkpoints", int, None)):
        train.add_argument(flag, type=kind, default=None, help=text)
    train.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast")
    train.add_argument("--train-aux-routers", action="store_true", default=None,
                       help="also train MoMa/MoD auxiliary routers (for causal decoding)")
    train.add_argument("--device", default=None,
                       help="cpu (default) or cuda; under torchrun: cuda:LOCAL_RANK with NCCL when CUDA is "
                            "available, else the CPU with gloo")
    train.add_argument("--parallel", choices=STRATEGIES, default=None,
                       help="strategy over torchrun's processes (default ddp when WORLD_SIZE > 1): ddp, fsdp (FSDP2) "
                            "or ep (MoMa expert parallelism); fsdp/ep write distributed checkpoints")
    train.add_argument("--ep-size", type=int, default=1,
                       help="processes per expert-parallel group, MoMa's experts sharded over them (--parallel ep; "
                            "or fsdp, the other parameters then sharded over all processes)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="loss and perplexity per modality of a checkpoint on a dataset split")
    evaluate.add_argument("checkpoint", help="checkpoint folder or run folder (its latest checkpoint)")
    add_data_args(evaluate, split="validation", default=None)
    add_batch_args(evaluate)
    evaluate.add_argument("--max-batches", type=int, default=None)
    evaluate.add_argument("--bf16", action="store_true")
    evaluate.add_argument("--causal-routing", action="store_true", help="route as decoding does (aux routers)")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_eval)

    generate = sub.add_parser("generate", help="continue a mixed-modal prompt: text printed, images PNG, speech WAV")
    generate.add_argument("checkpoint", help="checkpoint folder or run folder (its latest checkpoint)")
    generate.add_argument("--prompt", nargs="*", default=[], metavar="SPAN",
                          help="spans in order: 'text:<words>', 'image:<file.png>', 'speech:<file.wav>'")
    generate.add_argument("--then", default=None, help="open a span of this modality after the prompt (e.g. image)")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--out", default="generated", help="folder for the PNG/WAV files and the transcript")
    add_data_args(generate, default=None)
    generate.add_argument("--device", default="cpu")
    generate.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="total/active parameters and FLOPs per token per modality")
    info.add_argument("spec", nargs="?", help="card name, config JSON, checkpoint or run folder, or a family")
    add_model_args(info)
    add_data_args(info)
    info.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"])
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    compare = sub.add_parser("compare", help="train models at equal FLOPs: per-modality loss, dense-FLOPs efficiency")
    compare.add_argument("--models", nargs="+", default=["transformer", "moma", "mom-mamba"],
                         help="families (sized by the model flags) or cards/config files")
    compare.add_argument("--dense", default=None, help="the dense baseline among --models (default: the first)")
    add_model_args(compare)
    add_data_args(compare)
    add_batch_args(compare)
    compare.add_argument("--dense-steps", type=int, default=60, help="budget = this many updates of the dense model")
    compare.add_argument("--budget", type=float, default=None, help="training FLOPs per model (replaces --dense-steps)")
    compare.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--evaluations", type=int, default=6)
    compare.add_argument("--eval-batches", type=int, default=4)
    compare.add_argument("--out", default=os.path.join("runs", "compare"))
    compare.add_argument("--quiet", action="store_true")
    compare.set_defaults(func=cmd_compare)

    merge = sub.add_parser("merge", help="linear merge of checkpoints, or the data-mixture search over merges")
    merge.add_argument("checkpoints", nargs="+", help="checkpoint or run folders of one architecture")
    merge.add_argument("--weights", type=float, nargs="+", help="one per checkpoint (default: equal)")
    merge.add_argument("--out", help="folder for the merged model (with --search: the best merge)")
    merge.add_argument("--search", action="store_true",
                       help="score merges over a simplex grid of weights on a validation set (one model per domain)")
    merge.add_argument("--resolution", type=int, default=4, help="grid step 1/resolution")
    add_data_args(merge, split="validation")
    add_batch_args(merge)
    merge.add_argument("--max-batches", type=int, default=4)
    merge.set_defaults(func=cmd_merge)

    ops = sub.add_parser("ops", help="list the registered torch.ops.momoe ops")
    ops.set_defaults(func=cmd_ops)
    convert = sub.add_parser("convert", help="convert a checkpoint (momoe, mamba-ssm, Hugging Face Mamba) to a layout")
    convert.add_argument("src", metavar="SRC", help="checkpoint folder in any supported layout (detected)")
    convert.add_argument("dst", metavar="DST", help="output folder")
    convert.add_argument("--to", required=True, choices=["momoe", "mamba-ssm", "hf"], help="layout to write")
    convert.set_defaults(func=cmd_convert)
    consolidation = sub.add_parser("consolidate", help="a distributed checkpoint (momoe train --parallel fsdp|ep) "
                                                       "-> config.json + model.safetensors")
    consolidation.add_argument("src", metavar="DCP_DIR",
                               help="distributed checkpoint folder, or a run folder (its latest checkpoint)")
    consolidation.add_argument("dst", metavar="OUT_DIR", help="output folder, loadable by momoe.from_pretrained")
    consolidation.set_defaults(func=cmd_consolidate)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as error:  # bad input (CheckpointError included): the message says what is wrong
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
