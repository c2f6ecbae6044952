"""The adapter-arithmetic commands: combine (alias merge), export, compress, inspect (see docs/arithmetic.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..arithmetic.options import METHODS
from ..errors import ConfigError
from ..safe_files.directory_export import require_new_directory, save_directory

# Method options as flags: flag dest -> option name of lorakit.combine. Unset flags are not passed,
# so a flag the chosen method does not take is reported instead of silently ignored.
EXPORT_FORMATS = ["safetensors", "gguf", "gguf-adapter", "vllm", "sglang"]
ENGINE_FORMATS = ("vllm", "sglang")

METHOD_FLAGS = {
    "density": "density",
    "rank": "rank",
    "lambda_": "lambda_",
    "normalize": "normalize",
    "rescale": "rescale",
    "consensus": "consensus",
    "seed": "seed",
    "t": "t",
}


def add_arith_parsers(sub) -> None:
    """The combine (alias: merge), export, compress and inspect subcommands."""
    # Named after the Python call (lorakit.combine); "merge", its old name, still works with a
    # notice: Python's lorakit.merge is what the CLI calls export.
    combine = sub.add_parser(
        "combine",
        aliases=["merge"],
        help="combine adapters into one adapter (linear, svd, ties, dare, slerp, ...); alias: merge",
    )
    _add_sources(combine)
    combine.add_argument("--out", required=True, help="directory for the combined adapter")
    combine.add_argument("--json", action="store_true", help="print the report as JSON")

    export = sub.add_parser(
        "export",
        help="merge adapter(s) into the base and save a plain transformers model (or GGUF); --format vllm|sglang: "
        "the (combined) adapter as a directory those engines serve exactly",
    )
    _add_sources(export, method_default="linear")
    export.add_argument("--out", required=True, help="directory for the merged model and its tokenizer")
    export.add_argument(
        "--format",
        default="safetensors",
        choices=EXPORT_FORMATS,
        help="safetensors: a transformers model folder; gguf: model.gguf for llama.cpp and Ollama (Llama "
        "architecture); gguf-adapter: the (combined) LoRA adapter alone as llama.cpp's adapter.gguf; vllm, sglang: "
        "the (combined) adapter as plain LoRA those engines load and compute as lorakit does (refused otherwise)",
    )
    export.add_argument(
        "--max-lora-rank", type=int, help="vllm/sglang: the server's --max-lora-rank; a higher rank is refused"
    )
    export.add_argument(
        "--refactor-dora",
        action="store_true",
        help="vllm/sglang: write a DoRA adapter as the best plain LoRA at its rank (error reported), not refuse it",
    )
    export.add_argument(
        "--gguf-dtype", choices=["f16", "f32"], help="gguf: dtype of the weights (default f16; norms are f32)"
    )
    export.add_argument(
        "--quantize",
        choices=["nf4", "fp4", "int8"],
        help="the quantization the adapter was trained on (QLoRA; default: the run's train_config.yaml next to "
        "the adapter, else none): the base is quantized so, dequantized into --dtype, and the adapter merged there",
    )
    export.add_argument(
        "--double-quant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --quantize: 4-bit scales quantized again (default: the run's choice, else on)",
    )
    export.add_argument(
        "--base",
        choices=["quantized", "original"],
        default="quantized",
        help="with --quantize: merge into the dequantized weights the adapter was trained on (quantized, the "
        "default: the export computes what the trained model did) or into the original full-precision weights",
    )

    compress = sub.add_parser("compress", help="shrink an adapter's rank by SVD of its update")
    compress.add_argument("--model", default="smollm2-135m", help="base model (alias, directory, .gguf or hub id)")
    compress.add_argument("--adapter", required=True, help="adapter directory")
    compress.add_argument("--rank", type=int, required=True, help="largest rank kept per module")
    compress.add_argument("--out", required=True, help="directory for the compressed adapter")
    compress.add_argument("--device", default="cpu")
    compress.add_argument("--json", action="store_true", help="print the report as JSON")

    inspect = sub.add_parser("inspect", help="ranks, parameters, update norms and singular values of an adapter")
    inspect.add_argument("adapter", help="adapter directory (no base model needed, except for VeRA's spectra)")
    inspect.add_argument("--model", help="base model, for VeRA adapters' spectra (alias, directory, .gguf or hub id)")
    inspect.add_argument("--device", default="cpu")
    inspect.add_argument("--plot", help="write the spectra and norms as a PNG here")
    inspect.add_argument("--json", action="store_true", help="print everything as JSON")


def _add_sources(cmd: argparse.ArgumentParser, method_default: str = "linear") -> None:
    cmd.add_argument("--model", default="smollm2-135m", help="base model (alias, directory, .gguf or hub id)")
    cmd.add_argument("--adapter", action="append", required=True, help="adapter directory (repeat for each source)")
    cmd.add_argument(
        "--weights", type=float, nargs="+", help="one weight per adapter (default 1 each; may be negative)"
    )
    cmd.add_argument("--method", default=method_default, choices=list(METHODS), help="combination method")
    cmd.add_argument(
        "--density", type=float, nargs="+", help="ties/dare/magnitude_prune: fraction kept (one, or one per adapter)"
    )
    cmd.add_argument("--rank", type=int, help="rank to re-factorise non-exact results to (svd and dense methods)")
    cmd.add_argument("--lambda", dest="lambda_", type=float, help="scale of the combined update (default 1)")
    cmd.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="divide by the sum of the contributing weights",
    )
    cmd.add_argument("--rescale", help="after dropping: true (=l1), l1, l2, linf, density or false")
    cmd.add_argument("--consensus", help="ties/dare_ties majority sign: sum (total) or count (frequency)")
    cmd.add_argument("--seed", type=int, help="dare: seed of the random drop (default 0)")
    cmd.add_argument("--t", type=float, help="slerp: position between the two adapters in [0, 1]")
    cmd.add_argument("--device", default="cpu")
    cmd.add_argument(
        "--dtype",
        default="auto",
        help="dtype the base is loaded in (export: computed in float32, "
        "saved in this dtype; auto = float32 on CPU, bfloat16 on GPU)",
    )


def _method_options(args: argparse.Namespace) -> dict:
    options = {
        name: getattr(args, dest) for dest, name in METHOD_FLAGS.items() if getattr(args, dest, None) is not None
    }
    if isinstance(options.get("density"), list) and len(options["density"]) == 1:
        options["density"] = options["density"][0]
    if "rescale" in options:
        options["rescale"] = {"true": True, "false": False}.get(options["rescale"].lower(), options["rescale"].lower())
    return options


def _load_sources(args: argparse.Namespace, dtype: str | None = None):
    """The base model with each --adapter loaded (named after its directory), none of them active."""
    from .commands import load_with_adapters

    return load_with_adapters(args.model, args.adapter, args.device, dtype or args.dtype, activate=False)


def _require_new_out(args: argparse.Namespace) -> None:
    """Refuse an --out that holds files (a source adapter's folder above all), before the loading:
    a command never writes over a folder the user has."""

    out = Path(args.out)
    sources = args.adapter if isinstance(args.adapter, list) else [args.adapter]
    if any(out.resolve() == Path(source).resolve() for source in sources):
        raise ConfigError(f"--out {out} is a source adapter's folder: choose a new folder for the result")
    require_new_directory(out)


def cmd_combine(args: argparse.Namespace) -> int:
    from .. import combine, save_adapter

    _require_new_out(args)
    model, _, names = _load_sources(args)
    report = combine(model, names, args.weights, args.method, "combined", **_method_options(args))
    return _print_report(report, save_adapter(model, args.out, "combined"), args.json)


def _print_report(report, out: Path, as_json: bool) -> int:
    if as_json:
        print(json.dumps({**report.to_dict(), "adapter": str(out)}, indent=2))
    else:
        print(report.table())
        print(f"\nadapter: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .. import combine, set_adapter, unload
    from ..models import resolve_device, resolve_dtype

    fmt = getattr(args, "format", "safetensors")
    if getattr(args, "gguf_dtype", None) and fmt != "gguf":
        raise ConfigError("--gguf-dtype is for --format gguf")
    if fmt not in ENGINE_FORMATS and (getattr(args, "max_lora_rank", None) or getattr(args, "refactor_dora", False)):
        raise ConfigError("--max-lora-rank and --refactor-dora are for --format vllm or sglang")
    if fmt != "safetensors" and args.dtype != "auto":
        raise ConfigError(f"--dtype is for --format safetensors; --format {fmt} is written with --gguf-dtype or f32")
    _require_new_out(args)  # before the minutes of loading and merging
    target = resolve_dtype(args.dtype, resolve_device(args.device))
    # Base and adapters in float32, merged, then cast once: a bf16 export gets one rounding of
    # W0 + ΔW, not a rounding of W0, of the adapter's factors and of the sum.
    quantization = _run_quantization(args)
    if quantization and args.base == "quantized":
        from .. import dequantize
        from .commands import load_with_adapters

        model, tokenizer, names = load_with_adapters(
            args.model, args.adapter, args.device, "float32", activate=False, compute_dtype="fp32", **quantization
        )
        dequantize(model, torch.float32)  # W0 as the adapter saw it, dense: the merge below is exact
        print(f"base quantized to {quantization['quantize']} as in training, dequantized, then merged")
    else:
        model, tokenizer, names = _load_sources(args, dtype="float32")
        if quantization:
            print(_original_base_note(model, names, quantization))
    options = _method_options(args)
    as_is = len(names) == 1 and args.method == "linear" and args.weights in (None, [1.0]) and not options
    if fmt in ENGINE_FORMATS:
        return _export_engine_adapter(args, model, names, as_is, options)
    if fmt == "gguf-adapter":
        return _export_gguf_adapter(args, model, names, as_is, options)
    if as_is:
        # One adapter as it is: the layers' own merge (also keeps modules_to_save, merges DoRA).
        set_adapter(model, names)
        unload(model, merge=True)
        print(f"merged {args.adapter[0]} into {args.model}")
    else:
        report = combine(model, names, args.weights, args.method, into_base=True, **options)
        unload(model, merge=False)  # the result is in the base weights already: drop the LoRA layers
        print(report.table())
    if fmt == "gguf":
        from ..models.gguf_export import write_model_gguf

        dtype = args.gguf_dtype or "f16"
        name = Path(args.out).resolve().name
        out = save_directory(
            Path(args.out), lambda tmp: write_model_gguf(model, tokenizer, tmp / GGUF_MODEL, dtype, name=name)
        )
        print(f"\nmodel: {out / GGUF_MODEL}  ({dtype}; llama.cpp: llama-cli -m FILE; Ollama: FROM ./{GGUF_MODEL})")
        return 0
    model.to(target)
    out = save_directory(Path(args.out), lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    print(f"\nmodel: {out}  (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def _run_quantization(args: argparse.Namespace) -> dict | None:
    """{"quantize": method, "double_quant": bool} the adapter was trained with: --quantize, else
    the ``quantize`` option of the run's train_config.yaml beside the adapter; None without."""
    method, double_quant = getattr(args, "quantize", None), getattr(args, "double_quant", None)
    if method is None:
        for adapter in args.adapter:
            config = Path(adapter).resolve().parent / "train_config.yaml"
            if config.is_file():
                import yaml

                options = yaml.safe_load(config.read_text()) or {}
                if options.get("quantize"):
                    method = options["quantize"]
                    double_quant = options.get("double_quant", True) if double_quant is None else double_quant
                    break
    if method is None:
        if getattr(args, "base", "quantized") != "quantized":
            raise ConfigError("--base is for adapters trained on a quantized base (--quantize)")
        return None
    return {"quantize": method, "double_quant": True if double_quant is None else double_quant}


def _original_base_note(model, names: list[str], quantization: dict) -> str:
    """What merging into the original weights means for an adapter trained on quantized ones."""
    from ..quantization import quantization_error
    from ..state import lora_layers

    errors = sorted(
        quantization_error(layer.base_weight, quantization["quantize"], quantization["double_quant"])
        for _, layer in lora_layers(model)
        if any(n in layer.lora_A for n in names)
    )
    median = errors[len(errors) // 2] if errors else 0.0
    return (
        f"note: merged into the original full-precision weights; the adapter was trained on "
        f"{quantization['quantize']}-quantized ones, which differ from these by a median ||W - Q(W)||/||W|| of "
        f"{median:.1%} over the adapted modules: an error the adapter never saw (--base quantized exports the "
        "weights it was trained on)"
    )


GGUF_MODEL = "model.gguf"
GGUF_ADAPTER = "adapter.gguf"


def _export_gguf_adapter(args: argparse.Namespace, model, names: list[str], as_is: bool, options: dict) -> int:
    """The adapter (or the adapters combined into one) as llama.cpp's LoRA-adapter GGUF."""
    from .. import combine
    from ..models.gguf_export import write_adapter_gguf

    name = names[0]
    if not as_is:
        report = combine(model, names, args.weights, args.method, "combined", **options)
        print(report.table())
        name = "combined"
    label = Path(args.out).resolve().name
    out = save_directory(Path(args.out), lambda tmp: write_adapter_gguf(model, name, tmp / GGUF_ADAPTER, name=label))
    print(f"\nadapter: {out / GGUF_ADAPTER}  (llama.cpp: llama-cli -m BASE.gguf --lora FILE; Ollama: ADAPTER)")
    return 0


def _export_engine_adapter(args: argparse.Namespace, model, names: list[str], as_is: bool, options: dict) -> int:
    """The adapter (or the adapters combined into one) as a directory vLLM or SGLang serves."""
    from .. import combine
    from ..serve.vllm_export import export_adapter

    name = names[0]
    if not as_is:
        report = combine(model, names, args.weights, args.method, "combined", **options)
        print(report.table())
        name = "combined"
    export = export_adapter(
        model,
        name,
        Path(args.out),
        engine=args.format,
        max_lora_rank=args.max_lora_rank,
        refactor_dora=args.refactor_dora,
    )
    print(export.table())
    flag = "--lora-modules" if args.format == "vllm" else "--lora-paths"
    print(f"\nadapter: {args.out}  ({args.format}: {flag} NAME={Path(args.out).resolve()})")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from .. import compress, load_adapter, save_adapter
    from ..models import load_model

    _require_new_out(args)
    model, _ = load_model(args.model, device=args.device)
    name = load_adapter(model, args.adapter, name="adapter")
    report = compress(model, name, args.rank)
    return _print_report(report, save_adapter(model, args.out, name), args.json)


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..arithmetic import inspect_adapter

    model = None
    if args.model:
        from ..models import load_model

        model, _ = load_model(args.model, device=args.device)
    info = inspect_adapter(args.adapter, model)
    plot = info.plot(args.plot) if args.plot else None
    if args.plot and plot is None:
        print(f"plot: {args.plot} not written: no module has a spectrum to plot", file=sys.stderr)
    if args.json:
        print(json.dumps({**info.to_dict(), "plot": str(plot) if plot else None}, indent=2))
        return 0
    print(info.table())
    if plot:
        print(f"\nplot: {plot}")
    return 0
