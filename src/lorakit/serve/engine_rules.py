"""What vLLM (0.32) and SGLang accept in an adapter directory and compute as lorakit does, checked
from the files alone (adapter_config.json and the tensor shapes; no weights read, no model).

vLLM 0.32 (read from its ``vllm/lora`` sources: the PEFT config helper, the checkpoint loader and
the layer wrappers):
- computes ``s = lora_alpha / r`` per module, ``alpha / sqrt(r)`` with ``use_rslora``, and takes
  ``rank_pattern`` / ``alpha_pattern`` with PEFT's suffix rule, so such adapters need no change;
- refuses DoRA, ``lora_bias``, ``bias`` other than "none", inits that change the base (PiSSA,
  OLoRA, CorDA, LoftQ: it names the allowed ones), ``modules_to_save`` other than a classifier's
  ``classifier`` / ``score`` head, and a rank above ``--max-lora-rank`` (one of ``VLLM_RANKS``);
- reads only ``lora_A.weight`` / ``lora_B.weight`` / ``lora_embedding_A|B`` keys (anything else,
  VeRA's vectors or DoRA's magnitudes, is an unsupported weight), 2-D, unscaled;
- adapts the modules a model class lists (its linear layers by name, the packed q/k/v and
  gate/up by their parts, the embeddings it names); for the architectures in
  ``SUPPORTED_MODULES`` a target outside the list is refused at load.

SGLang reads the same layout but one ``lora_alpha / r`` per adapter, so ``lorakit export --format
sglang`` writes every module at one rank with ``lora_alpha = r`` (scaling 1, folded into B), and
the checks below refuse rsLoRA, patterns and mixed ranks for it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterFileError, ConfigError
from ..io.layout import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, strip_prefix
from ..io.load import read_config_data

ENGINES = {"vllm": "vLLM", "sglang": "SGLang"}
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's choices for --max-lora-rank
# Inits vLLM 0.32 loads as plain LoRA (they set only the initial factors).
VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
VLLM_SAVED_MODULES = ("classifier", "score")

_LLAMA_LIKE = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}
)
# Module names vLLM puts LoRA on, per model class (its packed_modules_mapping parts, its linear
# layers, its embedding_modules); an architecture not listed is not checked.
SUPPORTED_MODULES: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Qwen3ForCausalLM": _LLAMA_LIKE,
}
FIX = "`lorakit export --format {engine} --adapter DIR --out NEW_DIR` writes it as plain LoRA"


def engine_title(engine: str) -> str:
    return ENGINES.get(engine, engine)


def model_architecture(model: object) -> str:
    """The model's class name, as transformers writes it into config.json's ``architectures``."""
    return type(model).__name__


def vllm_rank_for(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``."""
    for allowed in VLLM_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(f"rank {rank} is above vLLM's largest --max-lora-rank {VLLM_RANKS[-1]}: compress the adapter")


def _factor_key(key: str) -> tuple[str, str] | None:
    """``base_model.model.<path>.lora_A.weight`` -> (path, "A"); embeddings' keys too; else None."""
    key = strip_prefix(key)
    for suffix, factor in (
        (".lora_A.weight", "A"),
        (".lora_B.weight", "B"),
        (".lora_embedding_A", "A"),
        (".lora_embedding_B", "B"),
    ):
        if key.endswith(suffix):
            return key[: -len(suffix)], factor
    return None


def check_adapter_data(
    config: dict,
    shapes: dict[str, tuple[int, ...]],
    *,
    source: str,
    engine: str = "vllm",
    max_lora_rank: int | None = None,
    architecture: str | None = None,
) -> int:
    """Raise ConfigError (one line, the first problem and its fix) if ``engine`` would refuse the
    adapter described by ``config`` (adapter_config.json) and ``shapes`` (file key -> shape), or
    compute it differently from lorakit; return its largest rank."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}: choose one of {sorted(ENGINES)}")
    title, fix = engine_title(engine), FIX.format(engine=engine)

    def refuse(problem: str) -> None:
        raise ConfigError(f"{source}: {problem}")

    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        refuse(f"{title} serves LoRA adapters, not {peft_type}; {fix}")
    if config.get("use_dora"):
        refuse(
            f"{title} refuses DoRA; {fix.replace('--out', '--refactor-dora --out')} (its error reported), "
            "or serve it with `lorakit serve`"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        refuse(f"{title} loads no trained biases (bias={config.get('bias')!r}); serve it with `lorakit serve`")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_INITS:
        refuse(f"init {init!r} changed the base weights, which {title} does not; {fix} against the original base")
    saved = [m for m in config.get("modules_to_save") or [] if m not in VLLM_SAVED_MODULES]
    if saved:
        refuse(
            f"{title} loads no modules_to_save but a classifier head ({'/'.join(VLLM_SAVED_MODULES)}), found {saved}; "
            "merge the adapter into the base (`lorakit export --format safetensors`) or use `lorakit serve`"
        )
    if config.get("fan_in_fan_out"):
        refuse(f"fan_in_fan_out adapters (transformers Conv1D layers) are not served by {title}")
    if config.get("target_parameters"):
        refuse(f"parameter targets ({config['target_parameters']}) are not served by {title}; use `lorakit serve`")
    if engine == "sglang":
        if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
            refuse(f"{title} takes one lora_alpha / r per adapter (no rsLoRA, no rank/alpha patterns); {fix}")

    ranks: dict[str, int] = {}
    for key, shape in shapes.items():
        split = _factor_key(key)
        if split is None:
            if key.rsplit(".", 2)[-2] in VLLM_SAVED_MODULES or strip_prefix(key).split(".")[0] in VLLM_SAVED_MODULES:
                continue  # a classifier head's copy (modules_to_save)
            refuse(f"tensor {key!r} is not a LoRA factor {title} reads; {fix}")
        path, factor = split
        if len(shape) != 2:
            refuse(f"{path} has {len(shape)}-D factors (a convolution?); {title} serves linear and embedding LoRA only")
        ranks[path] = shape[0] if factor == "A" else shape[1]
    if not ranks:
        refuse("holds no LoRA factors")
    rank = max(ranks.values())
    if engine == "sglang" and len(set(ranks.values())) > 1:
        refuse(f"{title} expects one rank for every module, found {sorted(set(ranks.values()))}; {fix}")
    declared = max([int(config.get("r") or 0), *[int(v) for v in (config.get("rank_pattern") or {}).values()]])
    if max_lora_rank is not None and max(rank, declared) > max_lora_rank:
        refuse(
            f"rank {max(rank, declared)} is over --max-lora-rank {max_lora_rank}; raise the limit or compress the "
            "adapter (`lorakit compress --rank N`)"
        )
    supported = SUPPORTED_MODULES.get(architecture or "")
    if supported is not None:
        unsupported = sorted({p.rsplit(".", 1)[-1] for p in ranks} - supported)
        if unsupported:
            refuse(
                f"{title} puts no LoRA on {unsupported} of {architecture} (it adapts {sorted(supported)}); "
                "retrain without them or use `lorakit serve`"
            )
    return max(rank, declared)


def tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``directory``'s weights file, from the safetensors header (no weights read)."""
    file = directory / WEIGHTS_NAME
    if file.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt") as reader:
                return {key: tuple(reader.get_slice(key).get_shape()) for key in reader.keys()}
        except (SafetensorError, OSError) as exc:
            raise AdapterFileError(f"cannot read {file}: {exc} (the file is corrupt or truncated)") from None
    if (directory / LEGACY_WEIGHTS_NAME).is_file():
        from ..io.load import read_weights

        return {key: tuple(t.shape) for key, t in read_weights(directory).items()}
    raise AdapterFileError(f"{directory} holds no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME})")


def check_adapter_dir(
    directory: Path,
    *,
    engine: str = "vllm",
    max_lora_rank: int | None = None,
    architecture: str | None = None,
    name: str | None = None,
) -> int:
    """``check_adapter_data`` for an adapter directory (``name``: how the message calls it);
    returns its largest rank."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"adapter directory {directory} does not exist")
    if not (directory / CONFIG_NAME).is_file():
        raise AdapterFileError(f"{directory} holds no {CONFIG_NAME}: not an adapter directory")
    source = f"adapter {name!r} ({directory})" if name else f"adapter {directory}"
    return check_adapter_data(
        read_config_data(directory),
        tensor_shapes(directory),
        source=source,
        engine=engine,
        max_lora_rank=max_lora_rank,
        architecture=architecture,
    )
