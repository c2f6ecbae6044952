"""Peak memory of one DPO step against one SFT step on the same batch and model.

    python bench/dpo_memory.py                          # the embedded smollm2-135m on the CPU, 4 pairs
    python bench/dpo_memory.py --device cuda --pairs 8 --prompt-words 200

The point being measured (docs/tasks.md): lorakit's DPO keeps one base in memory, the reference
being the same weights with the adapters off under ``torch.no_grad``. Cases, each in a fresh
process (a process's peak RSS only grows, so cases must not share one):

* ``sft``: causal-LM loss on the batch's 2B rows (prompt + chosen, prompt + rejected; loss on the
  completions), the tokens a DPO step puts through the model;
* ``dpo``: lorakit's DPO step (reference forward, adapters off, then the policy forward);
* ``dpo-precomputed``: with the reference log-probabilities precomputed (``--precompute-ref``);
* ``dpo-copy``: the reference as a second, frozen copy of the base (what a trainer without
  adapters to switch off keeps: TRL with a non-PEFT model), for contrast.

Each case loads the model, adds an r=16 all-linear adapter, collates the batch, then runs one
optimizer step (forward, backward, AdamW; the first, so AdamW's state is created in it, alike in
every case). Reported: the tensors alive before the step (model, adapter, batch, the copy), the
step's peak above them and their sum. On a GPU the step's peak is ``torch.cuda.max_memory_allocated``
after a reset, minus what was allocated; on the CPU it is the CPU tensor allocations and frees the
profiler records (``profile_memory=True``), summed in time order: exact tensor bytes, whatever the
allocator keeps. The process's peak resident set (``/proc/self/statm``, sampled every 0.2 ms) is
given beside them; it includes the Python process and what glibc's allocator holds on to.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import threading
import time

CASES = ("sft", "dpo", "dpo-precomputed", "dpo-copy")
WORDS = "the model answers with valid json whose fields name each item and count it exactly as asked".split()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """The highest resident set seen while running (a thread reading /proc/self/statm)."""

    def __enter__(self):
        self.peak, self.running = rss(), True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.0002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())


def pairs_file(path: str, pairs: int, prompt_words: int, completion_words: int) -> str:
    import random

    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(pairs):
            lengths = (prompt_words, completion_words, completion_words)
            prompt, chosen, rejected = (" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths)
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def run_case(args) -> dict:
    import torch

    import lorakit
    from lorakit.models import load_model
    from lorakit.tasks import make_task
    from lorakit.training.config import TrainConfig

    torch.manual_seed(0)
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if args.case == "dpo-copy" else None
    cfg = TrainConfig(
        data=pairs_file(args.data, args.pairs, args.prompt_words, args.completion_words),
        task="dpo",
        precompute_ref=args.case == "dpo-precomputed",
        batch_size=args.pairs,
        max_length=4096,
    )
    task = make_task(cfg)
    task.prepare_model(model, tok)
    data = task.prepare_data(tok)  # with precompute_ref: the reference's log-probs, before the adapter
    lorakit.add_adapter(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    batch = {k: v.to(args.device) for k, v in data.collate(data.train).items()}
    if reference is not None:
        from lorakit.tasks.dpo_loss import sequence_logps

        with torch.no_grad():  # the copy's log-probs stand in for the reference pass of every step
            logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ref = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
            del logits
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref.chunk(2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    tokens = int(batch["attention_mask"].sum())

    def step():
        if args.case == "sft":
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        else:
            loss = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    import gc

    gc.collect()
    held = {id(t): t for t in [*model.parameters(), *model.buffers(), *batch.values()]}
    if reference is not None:
        held.update({id(t): t for t in [*reference.parameters(), *reference.buffers()]})
    before = sum(t.numel() * t.element_size() for t in held.values())
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        step_peak, what = torch.cuda.max_memory_allocated() - allocated, "torch.cuda.max_memory_allocated"
        rss_before = rss_peak = None
    else:
        from torch.profiler import ProfilerActivity, profile

        rss_before = rss()
        with PeakSampler() as sampler, profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            start = time.perf_counter()
            step()
            seconds = time.perf_counter() - start
        rss_peak = sampler.peak
        step_peak, what = tensor_peak(prof), "CPU tensor allocations (torch.profiler, profile_memory=True)"
    return {
        "case": args.case,
        "rows": int(batch["input_ids"].shape[0]),
        "length": int(batch["input_ids"].shape[1]),
        "tokens": tokens,
        "before": before,
        "step_peak": step_peak,
        "peak": before + step_peak,
        "rss_before": rss_before,
        "rss_peak": rss_peak,
        "seconds": seconds,
        "measured": what,
    }


def tensor_peak(prof) -> int:
    """The most bytes of CPU tensors alive at once during the profiled block, above those alive at its start:
    the profiler's allocation (+) and free (-) records in time order, summed."""
    events = prof.profiler.kineto_results.events()
    records = [e for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"]
    live = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs in the batch (2x rows)")
    parser.add_argument("--prompt-words", type=int, default=120)
    parser.add_argument("--completion-words", type=int, default=60)
    parser.add_argument("--case", choices=CASES, help="run one case in this process and print its JSON")
    parser.add_argument("--data", default="/tmp/lorakit-dpo-memory.jsonl")
    parser.add_argument("--json", help="write every case's numbers to this file")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    results = []
    for case in CASES:
        command = [sys.executable, __file__, "--case", case, *sys.argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    import torch
    import transformers

    sft = results[0]["step_peak"]
    mib = 2**20
    print(
        f"model {args.model} on {args.device} ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {args.pairs} pairs = {results[0]['rows']} rows x "
        f"{results[0]['length']} tokens; measured: {results[0]['measured']}\n"
    )
    print(
        "| case | tensors before the step (MiB) | step's peak above them (MiB) | vs SFT | peak tensors (MiB) | vs SFT "
        "| peak RSS (MiB) | step (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        resident = f"{r['rss_peak'] / mib:.0f}" if r["rss_peak"] else "-"
        print(
            f"| {r['case']} | {r['before'] / mib:.0f} | {r['step_peak'] / mib:.0f} | {r['step_peak'] / sft:.2f}x "
            f"| {r['peak'] / mib:.0f} | {r['peak'] / results[0]['peak']:.2f}x | {resident} | {r['seconds']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
