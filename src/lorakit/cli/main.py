"""`lorakit` command line: demo, train, eval, generate, chat; combine, export, compress, inspect; score; serve;
sweep.

Every command prints what it did and where its outputs are; errors the user can fix are printed
as one line (``error: ...``) with exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import LorakitError
from ..tasks import task_names
from .arith_commands import add_arith_parsers
from .options import add_train_options
from .score_command import add_score_parser
from .serve_command import add_serve_parser
from .sweep_command import add_sweep_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning: train, evaluate and use adapters.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show lorakit's info logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="fine-tune the embedded model on a generated task and show before/after")
    demo.add_argument(
        "--output-dir", default=None, help="where the dataset, adapter, metrics and plot go (default: runs/demo)"
    )
    demo.add_argument(
        "--rlhf",
        action="store_true",
        help="the preference pipeline instead: SFT adapter, reward model, DPO with the SFT adapter as reference, "
        "judged on held-out requests by a program (default folder: runs/demo-rlhf)",
    )
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's tuned value)")
    demo.add_argument("--n-test", type=int, default=None, help="number of held-out test requests")
    demo.add_argument("--model", default="smollm2-135m", help="base model (default: the embedded smollm2-135m)")

    train = sub.add_parser(
        "train", help="fine-tune a LoRA adapter on your data", usage="%(prog)s [--config FILE] [OPTIONS]"
    )
    train.add_argument("--config", help="YAML or JSON file with training options (flags override it)")
    add_train_options(train)

    evaluate = sub.add_parser(
        "eval", help="loss, perplexity and exact match of a model/adapter on a data file (or --task's metrics)"
    )
    evaluate.add_argument(
        "--data", required=True, help="JSONL/CSV/Parquet file, `datasets` folder or cached dataset name to evaluate on"
    )
    evaluate.add_argument("--data-split", default=None, help="split of a DatasetDict (default: train)")
    evaluate.add_argument(
        "--data-columns", default=None, help="column mapping, e.g. prompt=question,completion=answer (as for train)"
    )
    evaluate.add_argument(
        "--task",
        default="causal-lm",
        choices=task_names(),
        help="what the adapter was trained for, as train's --task (default: causal-lm). classify: accuracy and "
        "macro-F1 of {text, label} lines; token-classify: token accuracy and entity F1 of {tokens, tags} lines "
        "(the label order from the run's labels.json beside the adapter, else the model's id2label); reward: pair "
        "accuracy of preference pairs; dpo: DPO loss and reward accuracy against the base model",
    )
    _add_model_options(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--max-length", type=int, default=512)
    evaluate.add_argument("--max-examples", type=int, default=None)
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--no-generate", action="store_true", help="loss and perplexity only (no exact match)")
    evaluate.add_argument(
        "--ranks",
        help="comma-separated ranks: evaluate the adapter truncated to each "
        "(DyLoRA adapters work at every rank), printing a table of loss per rank",
    )
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")

    for name, helptext in (("generate", "answer one prompt (streams tokens)"), ("chat", "interactive chat")):
        cmd = sub.add_parser(name, help=helptext)
        if name == "generate":
            cmd.add_argument("prompt", help="the user message")
            cmd.add_argument("--raw", action="store_true", help="do not apply the chat template")
        _add_model_options(cmd)
        cmd.add_argument("--max-new-tokens", type=int, default=256)
        cmd.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
        cmd.add_argument("--temperature", type=float, default=0.7)
        cmd.add_argument("--top-p", type=float, default=0.9)
        cmd.add_argument(
            "--repetition-penalty",
            type=float,
            default=1.0,
            help="penalise tokens already in the text: 1 none (default), above 1 repeat less (e.g. 1.1 to 1.3); "
            "applies to greedy decoding too",
        )
        if name == "chat":
            cmd.add_argument(
                "--system",
                default=None,
                metavar="TEXT",
                help="system message at the start of the conversation (through the chat template; kept by /reset)",
            )
        cmd.add_argument("--seed", type=int, default=0)
    add_arith_parsers(sub)
    add_score_parser(sub)
    add_serve_parser(sub)
    add_sweep_parser(sub)
    return parser


def _add_model_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--model", default="smollm2-135m", help="base model (alias, directory, .gguf or hub id)")
    cmd.add_argument("--adapter", action="append", default=[], help="adapter directory (repeatable: adapters add up)")
    cmd.add_argument("--device", default=None)
    cmd.add_argument("--dtype", default="auto")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    _quiet_transformers(args.verbose)
    if args.command == "merge":  # the old name of combine (argparse keeps the alias it was called by)
        print("note: `lorakit merge` is now `lorakit combine` (the old name still works)", file=sys.stderr)
        args.command = "combine"
    from . import arith_commands, commands, score_command, serve_command, sweep_command

    modules = (commands, arith_commands, score_command, serve_command, sweep_command)
    handler = next(getattr(m, f"cmd_{args.command}") for m in modules if hasattr(m, f"cmd_{args.command}"))
    try:
        return handler(args) or 0
    except LorakitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _quiet_transformers(verbose: bool) -> None:
    """transformers' own weight-loading bars and advice would drown lorakit's output."""
    if verbose:
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
