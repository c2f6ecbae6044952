"""The CLI commands (argparse namespaces in, printed results out)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .adapter_loading import load_with_adapters, source_names  # noqa: F401 (source_names: the CLI's API too)
from .options import train_overrides


def cmd_train(args: argparse.Namespace) -> int:
    from ..training import train

    # The data summary as soon as the data is read: before the training bar, not after the run.
    result = train(
        args.config, on_data=lambda stats: print(f"data: {stats.summary()}", flush=True), **train_overrides(args)
    )
    if not result.main_process:  # a DDP run's other processes: the main one reports, once
        return 130 if result.interrupted else 0
    print(f"\ntrained {result.steps} steps")
    if result.interrupted:
        if result.steps:
            print(f"interrupted: checkpoint in {result.output_dir / 'checkpoints'}; continue with --resume")
        else:
            print("interrupted before the first step finished: nothing to resume")
        return 130
    if result.final_eval:
        print("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in result.final_eval.items() if isinstance(v, float)))
    for note in result.notes:  # what the adapter's variant reports (AdaLoRA: the ranks left)
        print(note)
    if result.memory is not None:
        print(f"memory after the first step:\n{result.memory}")
    if getattr(result, "method", "lora") == "lora":
        print(f"adapter:  {result.adapter_dir}")
    else:  # lorakit.methods: full fine-tuning's model/, BitFit's trained/, PEFT's adapter/, or nothing
        print(f"saved:    {result.saved or f'nothing (method {result.method} trains nothing)'}")
    print(f"metrics:  {result.output_dir / 'metrics.jsonl'}")
    print(f"plot:     {result.output_dir / 'loss.png'}")
    if result.memory is not None:
        print(f"memory:   {result.output_dir / 'memory.json'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data import Collator, eval_pairs, read_records, tokenize_records
    from ..data.readers import parse_columns
    from ..training.evaluate import evaluate

    check_adapter_task(args.adapter, args.task)
    if args.task != "causal-lm":  # a task with its own data and metrics: the Task evaluates
        return _eval_task(args)
    # The data first: a wrong file, split or column is reported before the model loads.
    records = read_records(args.data, split=args.data_split, columns=parse_columns(args.data_columns))
    model, tokenizer, names = load_with_adapters(args.model, args.adapter, args.device, args.dtype)
    examples, _ = tokenize_records(records, tokenizer, max_length=args.max_length)
    if args.ranks:
        return _eval_per_rank(args, model, names, examples, Collator(tokenizer))
    pairs = None if args.no_generate else eval_pairs(records, tokenizer)
    result = evaluate(
        model,
        tokenizer,
        examples,
        Collator(tokenizer),
        batch_size=args.batch_size,
        pairs=pairs,
        max_examples=args.max_examples,
        max_new_tokens=args.max_new_tokens,
        progress=True,  # tens of seconds on a CPU: a bar per phase (loss, answers) on stderr
    )
    predictions = result.pop("predictions", None)
    if args.json:
        print(json.dumps({**result, "predictions": predictions} if predictions else result, indent=2))
        return 0
    print(f"loss        {result['loss']:.4f}")
    print(f"perplexity  {result['perplexity']:.3f}")
    if "exact_match" in result:
        print(f"exact match {100 * result['exact_match']:.1f}% of {len(predictions)}")
    return 0


def check_adapter_task(adapter_dirs: list[str], task: str) -> None:
    """Refuse an adapter saved for another task (its adapter_config.json's task_type) before any
    model loads: a classifier's head evaluated as a causal LM, or the reverse, gives numbers that
    mean nothing."""
    from ..errors import ConfigError
    from ..io.load import read_config_data
    from ..tasks import TASKS

    for adapter in adapter_dirs:
        saved = read_config_data(Path(adapter)).get("task_type") if Path(adapter).is_dir() else None
        if saved and saved != TASKS[task].peft_task_type:
            fits = [name for name, kind in TASKS.items() if kind.peft_task_type == saved]
            hint = f"evaluate it with --task {fits[0]}" if fits else "lorakit eval has no task for it"
            raise ConfigError(f"adapter {adapter} was trained with task_type {saved}, not for --task {task}: {hint}")


def _eval_task(args: argparse.Namespace) -> int:
    """``lorakit eval --task classify|token-classify|reward|dpo``: the task reads the data (a
    classifier's checked against the run's label order before the model loads), loads the model as
    its task needs and evaluates with its own metrics (``Task.evaluate``, as at the end of training;
    DPO against the base model with the adapters off)."""
    from ..errors import ConfigError
    from ..tasks import TASKS, make_task
    from ..training.config import TrainConfig

    for flag, value in (
        ("--ranks", args.ranks),
        ("--data-split", args.data_split),
        ("--data-columns", args.data_columns),
        ("--no-generate", args.no_generate),
    ):
        if value:
            raise ConfigError(f"{flag} applies to --task causal-lm only: drop it for --task {args.task}")
    cfg = TrainConfig(
        task=args.task,
        data=args.data,
        labels=eval_labels(args.adapter, args.model) if TASKS[args.task].uses_labels else None,
        max_length=args.max_length,
        batch_size=args.batch_size,
    )
    task = make_task(cfg)
    model, tokenizer, _ = load_with_adapters(args.model, args.adapter, args.device, args.dtype, **task.load_kwargs())
    task.prepare_model(model, tokenizer)
    data = task.prepare_data(tokenizer)
    examples = data.train[: args.max_examples] if args.max_examples else data.train
    device = next(model.parameters()).device
    result = task.evaluate(model, tokenizer, examples, data.collate, [], cfg, device, None, True)
    result["examples"] = len(examples)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for key, value in result.items():
        print(f"{key:<17} {value:.4f}" if isinstance(value, float) else f"{key:<17} {value}")
    return 0


def eval_labels(adapter_dirs: list[str], model_name: str) -> list[str]:
    """The label order a classifier was trained with: its run's labels.json (beside the adapter),
    else the model's own id2label when the model is a trained classifier."""
    from ..errors import ConfigError
    from ..tasks.classify import config_labels, saved_labels

    labels = saved_labels(adapter_dirs)
    if labels is None:
        from transformers import AutoConfig

        from ..models.loader import resolve_source

        try:
            labels = config_labels(AutoConfig.from_pretrained(resolve_source(model_name)[0], local_files_only=True))
        except OSError:
            labels = None
    if labels is None:
        where = ", ".join(adapter_dirs) or model_name
        raise ConfigError(
            f"no label order found for {where}: put the training run's labels.json beside the adapter "
            "(lorakit train writes it into --output-dir)"
        )
    return labels


def _eval_per_rank(args: argparse.Namespace, model, names: list[str], examples, collate) -> int:
    """Loss of the (first) adapter truncated to each rank: the DyLoRA rank table."""
    from ..errors import ConfigError
    from ..training.evaluate import eval_loss, perplexity
    from ..variants.dylora import nested_rank

    if len(args.adapter) != 1:
        raise ConfigError("--ranks needs exactly one --adapter")
    try:
        ranks = sorted({int(r) for r in args.ranks.split(",") if r.strip()})
    except ValueError:
        raise ConfigError(f"--ranks must be comma-separated integers, got {args.ranks!r}") from None
    rows = []
    for rank in ranks:
        with nested_rank(model, rank, names[0]):
            loss = eval_loss(
                model,
                examples[: args.max_examples] if args.max_examples else examples,
                collate,
                args.batch_size,
                progress=True,
            )
        rows.append({"rank": rank, "loss": loss, "perplexity": perplexity(loss)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| rank | loss | perplexity |\n|---|---|---|")
    for row in rows:
        print(f"| {row['rank']} | {row['loss']:.4f} | {row['perplexity']:.3f} |")
    return 0


def _generation_kwargs(args: argparse.Namespace) -> dict:
    """The generation settings of ``generate``/``chat``, checked (before any model is loaded)."""
    from ..generate import check_generation_settings

    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
    )
    check_generation_settings(**kwargs, flags=True)
    return kwargs


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from ..generate import render_prompt, stream_generate

    settings = _generation_kwargs(args)
    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_with_adapters(args.model, args.adapter, args.device, args.dtype)
    prompt = args.prompt if args.raw else render_prompt(tokenizer, args.prompt)
    for piece in stream_generate(model, tokenizer, prompt, **settings):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import torch

    from ..generate import stream_generate

    settings = _generation_kwargs(args)
    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_with_adapters(args.model, args.adapter, args.device, args.dtype)
    from ..data.render import Renderer
    from ..errors import ConfigError

    renderer = Renderer(tokenizer)
    if args.system is not None and not renderer.chat:
        raise ConfigError(
            "--system needs a tokenizer with a chat template (the system message is a turn of it), "
            "and this model's has none"
        )
    start = [{"role": "system", "content": args.system}] if args.system is not None else []
    history: list[dict] = list(start)
    editing = _line_editing()
    print("lorakit chat — empty line or Ctrl-D to quit, /reset to clear the conversation")
    if not renderer.chat:
        print("(the tokenizer has no chat template: each message is answered on its own, without the earlier turns)")
    if not editing:
        print("(no line editing: Python's readline module is not available here)")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not text:
            return 0
        if text == "/reset":  # the system message stays
            history[:] = start
            continue
        history.append({"role": "user", "content": text})
        prompt = renderer.conversation_prompt(history)
        print("model> ", end="", flush=True)
        answer = []
        for piece in stream_generate(model, tokenizer, prompt, **settings):
            answer.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(answer).strip()})


def _line_editing() -> bool:
    """Line editing and history (arrow keys, Ctrl-R) for ``input()``: importing ``readline`` turns
    them on. False where the module is missing (Windows, some minimal Python builds)."""
    try:
        import readline  # noqa: F401 - imported for its effect on input()
    except ImportError:
        return False
    return True


def cmd_demo(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from .demo import run_demo

    if args.rlhf:
        from .demo_rlhf import run_rlhf_demo

        if args.steps is not None or args.n_test is not None:
            raise ConfigError("--steps and --n-test belong to the plain demo: drop them with --rlhf")
        return run_rlhf_demo(output_dir=args.output_dir or "runs/demo-rlhf", model_name=args.model, out=sys.stdout)
    return run_demo(
        output_dir=args.output_dir or "runs/demo",
        steps=args.steps,
        n_test=args.n_test,
        model_name=args.model,
        out=sys.stdout,
    )
