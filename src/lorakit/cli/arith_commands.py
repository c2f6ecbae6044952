"""The adapter-arithmetic commands: merge, export, compress, inspect (see docs/arithmetic.md)."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

from ..arithmetic.options import METHODS
from ..io.atomic import discard, fsync_tree, shielded
from ..io.journal import fsync_folder

# Method options as flags: flag dest -> option name of lorakit.combine. Unset flags are not passed,
# so a flag the chosen method does not take is reported instead of silently ignored.
METHOD_FLAGS = {"density": "density", "rank": "rank", "lambda_": "lambda_", "normalize": "normalize",
                "rescale": "rescale", "consensus": "consensus", "seed": "seed", "t": "t"}


def add_arith_parsers(sub) -> None:
    """The merge, export, compress and inspect subcommands."""
    merge = sub.add_parser("merge", help="combine adapters into one adapter (linear, svd, ties, dare, slerp, ...)")
    _add_sources(merge)
    merge.add_argument("--out", required=True, help="directory for the combined adapter")
    merge.add_argument("--json", action="store_true", help="print the report as JSON")

    export = sub.add_parser("export", help="merge adapter(s) into the base and save a plain transformers model")
    _add_sources(export, method_default="linear")
    export.add_argument("--out", required=True, help="directory for the merged model and its tokenizer")

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
    cmd.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1 each; may be negative)")
    cmd.add_argument("--method", default=method_default, choices=list(METHODS), help="combination method")
    cmd.add_argument("--density", type=float, nargs="+",
                     help="ties/dare/magnitude_prune: fraction kept (one, or one per adapter)")
    cmd.add_argument("--rank", type=int, help="rank to re-factorise non-exact results to (svd and dense methods)")
    cmd.add_argument("--lambda", dest="lambda_", type=float, help="scale of the combined update (default 1)")
    cmd.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                     help="divide by the sum of the contributing weights")
    cmd.add_argument("--rescale", help="after dropping: true (=l1), l1, l2, linf, density or false")
    cmd.add_argument("--consensus", help="ties/dare_ties majority sign: sum (total) or count (frequency)")
    cmd.add_argument("--seed", type=int, help="dare: seed of the random drop (default 0)")
    cmd.add_argument("--t", type=float, help="slerp: position between the two adapters in [0, 1]")
    cmd.add_argument("--device", default="cpu")
    cmd.add_argument("--dtype", default="auto", help="dtype the base is loaded in (export: computed in float32, "
                     "saved in this dtype; auto = float32 on CPU, bfloat16 on GPU)")


def _method_options(args: argparse.Namespace) -> dict:
    options = {name: getattr(args, dest) for dest, name in METHOD_FLAGS.items() if getattr(args, dest, None) is not None}
    if isinstance(options.get("density"), list) and len(options["density"]) == 1:
        options["density"] = options["density"][0]
    if "rescale" in options:
        options["rescale"] = {"true": True, "false": False}.get(options["rescale"].lower(), options["rescale"].lower())
    return options


def _load_sources(args: argparse.Namespace, dtype: str | None = None):
    """The base model with each --adapter loaded (named after its directory), none of them active."""
    from .commands import load_with_adapters

    return load_with_adapters(args.model, args.adapter, args.device, dtype or args.dtype, activate=False)


def cmd_merge(args: argparse.Namespace) -> int:
    from .. import combine, save_adapter

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

    require_new_directory(Path(args.out))  # before the minutes of loading and merging
    target = resolve_dtype(args.dtype, resolve_device(args.device))
    # Base and adapters in float32, merged, then cast once: a bf16 export gets one rounding of
    # W0 + ΔW, not a rounding of W0, of the adapter's factors and of the sum.
    model, tokenizer, names = _load_sources(args, dtype="float32")
    options = _method_options(args)
    if len(names) == 1 and args.method == "linear" and args.weights in (None, [1.0]) and not options:
        # One adapter as it is: the layers' own merge (also keeps modules_to_save, merges DoRA).
        set_adapter(model, names)
        unload(model, merge=True)
        print(f"merged {args.adapter[0]} into {args.model}")
    else:
        report = combine(model, names, args.weights, args.method, into_base=True, **options)
        unload(model, merge=False)  # the result is in the base weights already: drop the LoRA layers
        print(report.table())
    model.to(target)
    out = save_directory(Path(args.out), lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    print(f"\nmodel: {out}  (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from .. import compress, load_adapter, save_adapter
    from ..models import load_model

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


def require_new_directory(out: Path) -> None:
    """Refuse an ``--out`` that holds files: mixing a new export with an old one's files (say a
    single model.safetensors beside a new sharded index) gives a folder transformers may load wrongly."""
    from ..errors import ConfigError

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder: choose a new folder, or remove it first")


def save_directory(out: Path, write) -> Path:
    """Run ``write(tmp_dir)`` and rename the folder to ``out`` (absent or empty): an interrupted
    export leaves no half model, and no old files mix with the new ones."""
    require_new_directory(out)
    if out.exists():
        return fill_empty_directory(out, write)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its folder is private (0700), and this one becomes the export, which is meant
    # to be shared; mkdir gives what the umask allows, as for any new folder.
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    os.mkdir(tmp)  # FileExistsError on a clash of random names: someone else's folder, left alone
    try:
        write(tmp)
        fsync_tree(tmp)  # the files on disk before the rename that publishes them
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
        fsync_folder(out.parent)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fill_empty_directory(out: Path, write) -> Path:
    """``save_directory`` for an existing empty ``out``, which is filled in place rather than
    replaced: it may be a mount point (a container volume) or sit in a folder this user cannot
    write. ``write`` fills a hidden folder inside it, whose entries are then moved up; on any
    failure (Ctrl-C included, even a second one) ``out`` is emptied again.

    Not ``io.atomic.replace_files_in_folder``: that one writes files whose names it knows
    beforehand, one by one, beside their final names, and keeps earlier files as backups; an
    export is a tree whose names only ``save_pretrained`` knows (shards, tokenizer files, maybe
    folders), written into a folder that is empty, so there is nothing to back up."""
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out))
    moved: list[Path] = []
    try:
        write(tmp)
        fsync_tree(tmp)
        for entry in sorted(tmp.iterdir()):
            moved.append(out / entry.name)  # before the rename: an interrupt in between must undo it too
            os.rename(entry, out / entry.name)
        tmp.rmdir()
        fsync_folder(out)
        return out
    except BaseException:
        shielded(lambda: _empty_again(moved, tmp))
        raise


def _empty_again(moved: list[Path], tmp: Path) -> None:
    """Remove what a failed ``fill_empty_directory`` put in its folder; each entry is dropped once
    removed, so a run cut short by Ctrl-C is finished by the next."""
    while moved:
        discard(moved[-1])
        moved.pop()
    shutil.rmtree(tmp, ignore_errors=True)
