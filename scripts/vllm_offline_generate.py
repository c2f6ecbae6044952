"""Greedy generation with vLLM's offline engine, run by the Python of vLLM's own venv (it imports
vllm only, never lorakit): tests/test_vllm_equality.py and bench/vllm_cpu_throughput.py start it.

    $LORAKIT_VLLM_PYTHON scripts/vllm_offline_generate.py JOB.json RESULT.json

JOB.json: {"model": dir, "adapters": {name: dir}, "max_lora_rank": int, "max_loras": int,
"dtype": "float32", "max_model_len": int, "max_tokens": int, "prompts": [[token ids], ...],
"batches": [[[prompt index, adapter name or null], ...], ...], "warmup": bool, "ignore_eos": bool}

Each batch goes to one ``LLM.generate`` call (its rows are scheduled together). RESULT.json:
{"batches": [[[token ids], ...], ...], "seconds": [wall seconds per batch], "versions": {...}}.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(job_file: str, result_file: str) -> int:
    job = json.loads(open(job_file).read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU; the default is 4

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = job.get("adapters") or {}
    llm = LLM(
        model=job["model"],
        dtype=job.get("dtype", "float32"),
        enable_lora=bool(adapters),
        max_lora_rank=job.get("max_lora_rank", 16),
        max_loras=max(1, job.get("max_loras", len(adapters) or 1)),
        max_model_len=job.get("max_model_len", 512),
        enforce_eager=True,
        seed=0,
    )
    requests = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}
    # ignore_eos: a fixed number of tokens per request (the bench); else a request stops at EOS as
    # transformers' generate does (the equality test).
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=bool(job.get("ignore_eos")))
    prompts = job["prompts"]

    def run(batch):
        inputs = [{"prompt_token_ids": prompts[index]} for index, _ in batch]
        loras = [requests[name] if name else None for _, name in batch]
        outputs = llm.generate(inputs, params, lora_request=loras, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    if job.get("warmup"):
        run(job["batches"][0])
    results, seconds = [], []
    for batch in job["batches"]:
        start = time.perf_counter()
        results.append(run(batch))
        seconds.append(time.perf_counter() - start)
    versions = {"vllm": vllm.__version__, "torch": torch.__version__}
    with open(result_file, "w") as f:
        json.dump({"batches": results, "seconds": seconds, "versions": versions}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
