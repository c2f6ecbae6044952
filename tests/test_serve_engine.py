"""The engine over the real embedded model: requests for different adapters (and the base) that
arrive at random moments and are decoded together give, token for token, what single-request
generation gives with that adapter alone (fp32) — lorakit's and PEFT's."""

from __future__ import annotations

import random
import time

import pytest
import torch

import lorakit
from lorakit.data.stop_tokens import stop_token_ids
from lorakit.serve.requests import GenerationRequest, SamplingParams

pytestmark = pytest.mark.e2e

QUESTIONS = [
    "What is 2+2?",
    "Name three colors.",
    "hi",
    "Write a haiku about autumn leaves falling from the old oak tree.",
    "Explain gravity to a child in simple words, please, with an example from the playground.",
    "Translate 'good morning' into French.",
]

# name -> LoraConfig options: plain, rsLoRA, per-module rank/alpha patterns, DoRA.
ADAPTERS = {
    "plain": dict(r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rs": dict(r=4, alpha=8, use_rslora=True, target_modules="all-linear"),
    "patterns": dict(
        r=8,
        alpha=8,
        target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
        rank_pattern={"o_proj": 2},
        alpha_pattern={"up_proj": 32},
    ),
    "dora": dict(r=4, alpha=8, variant="dora", target_modules=["k_proj", "gate_proj"]),
}


def _fresh_model():
    from lorakit.models import load_model

    model, tokenizer = load_model("smollm2-135m", device="cpu")
    return model.float().eval(), tokenizer


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    model, _ = _fresh_model()
    root = tmp_path_factory.mktemp("adapters")
    gen = torch.Generator().manual_seed(7)
    dirs = {}
    for name, options in ADAPTERS.items():
        lorakit.add_adapter(model, lorakit.LoraConfig(**options), name)
        with torch.no_grad():
            for _, layer in lorakit.state.lora_layers(model):
                if name in layer.lora_B:
                    B = layer.lora_B[name]
                    B.copy_(torch.randn(B.shape, generator=gen) * 0.02)
        dirs[name] = root / name
        lorakit.save_adapter(model, dirs[name], name)
    return dirs


def _requests(engine, names, count, seed):
    rng = random.Random(seed)
    out = []
    for i in range(count):
        adapter = [*names, None][i % (len(names) + 1)] if i < len(names) + 1 else rng.choice([*names, None])
        question = rng.choice(QUESTIONS)
        ids = engine.chat_ids([{"role": "user", "content": question}]) if i % 3 else engine.completion_ids(question)
        params = SamplingParams(max_tokens=rng.randint(4, 20), temperature=0)
        out.append(GenerationRequest(f"r{i}", ids, adapter, params))
    return out


def _reference(model, tokenizer, request) -> list[int]:
    ids = torch.tensor([request.prompt_ids])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=request.sampling.max_tokens,
        do_sample=False,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


class EagerGraph:
    """``CapturedCall`` on the CPU: every call (a replay) runs the captured function again on the
    buffers, so the static batch's graph plumbing (buffers written before each replay, routing by
    the slot buffer, capture again when the layout changes) runs without CUDA."""

    captures = 0

    def __init__(self, fn, inputs, warmup=2):
        EagerGraph.captures += 1
        self.fn, self.inputs = fn, dict(inputs)

    def __call__(self, **inputs):
        for name, value in inputs.items():
            self.inputs[name].copy_(value)
        return self.fn(**self.inputs)


def _serve(adapter_dirs, decode, graphs=False):
    """The engine over a fresh fp32 model, with the requests' answers gathered from seeded random
    arrivals (18 requests over every adapter and the base, at most 6 rows at once)."""
    from lorakit.serve.adapter_pool import AdapterPool
    from lorakit.serve.engine import Engine, EngineLimits

    model, tokenizer = _fresh_model()
    pool = AdapterPool(model, max_loras=3, max_lora_rank=8)
    for name, directory in adapter_dirs.items():
        pool.register(name, directory)
    engine = Engine(model, tokenizer, pool, model_id="smollm2", limits=EngineLimits(max_num_seqs=6), decode=decode)
    assert engine.decode_mode == decode
    if graphs:  # the graphed steps, with EagerGraph (monkeypatched in) standing in for CUDA graphs
        engine._static.graphs = True
    engine.start()
    requests = _requests(engine, list(adapter_dirs), 18, seed=0)
    rng = random.Random(1)
    handles = []
    for request in requests:
        handles.append(engine.submit(request))
        time.sleep(rng.random() * 0.2)
    answers = [h.collect(timeout=300) for h in handles]
    engine.stop()
    return requests, answers, tokenizer


@pytest.fixture(scope="module")
def served(adapter_dirs):
    return _serve(adapter_dirs, "dynamic")


def test_static_batch_decodes_the_same_tokens(served, adapter_dirs):
    """The decode steps over fixed buffers (``static_batch.py``, what CUDA graphs replay; eager
    here) give the same tokens as the joined-and-trimmed cache, which the tests below hold to
    single-request generation and to PEFT."""
    requests, answers, _ = served
    _, static_answers, _ = _serve(adapter_dirs, "static")
    for request, (tokens, text, last), (s_tokens, s_text, s_last) in zip(requests, answers, static_answers):
        assert s_tokens == tokens, (request.adapter, request.request_id)
        assert (s_text, s_last.finish_reason) == (text, last.finish_reason)


def test_graphed_steps_decode_the_same_tokens(served, adapter_dirs, monkeypatch):
    """The CUDA-graph path of the static batch with each replay run eagerly (``EagerGraph``): the
    rows' tokens and slots reach the graph only through its buffers, the adapters' kernels route
    by the slot buffer alone (``SlotPlan.for_graph``), and the tokens are the dynamic cache's."""
    from lorakit.serve import static_batch

    monkeypatch.setattr(static_batch, "CapturedCall", EagerGraph)
    EagerGraph.captures = 0
    requests, answers, _ = served
    _, graphed_answers, _ = _serve(adapter_dirs, "static", graphs=True)
    assert EagerGraph.captures >= 2  # row buckets of 1 .. 6 rows (and again when the pool's layout changed)
    for request, (tokens, _, _), (g_tokens, _, _) in zip(requests, answers, graphed_answers):
        assert g_tokens == tokens, (request.adapter, request.request_id)


def test_mixed_batches_match_each_adapter_alone(served, adapter_dirs):
    requests, answers, tokenizer = served
    model, _ = _fresh_model()
    for name, directory in adapter_dirs.items():
        lorakit.load_adapter(model, directory, name)
    for request, (tokens, text, last) in zip(requests, answers):
        assert last.finish_reason in ("stop", "length"), last
        assert last.completion_tokens == len(tokens)
        if request.adapter is None:
            with lorakit.disable_adapters(model):
                expected = _reference(model, tokenizer, request)
        else:
            lorakit.set_adapter(model, request.adapter)
            expected = _reference(model, tokenizer, request)
        assert tokens == expected, (request.adapter, request.request_id)
        stop = stop_token_ids(tokenizer)
        shown = [t for t in tokens if t not in stop]
        assert text == tokenizer.decode(shown, skip_special_tokens=True)


def test_mixed_batches_match_peft(served, adapter_dirs):
    from peft import PeftModel

    requests, answers, tokenizer = served
    base, _ = _fresh_model()
    names = list(adapter_dirs)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    peft_model.eval()
    for request, (tokens, _, _) in zip(requests, answers):
        if request.adapter is None:
            with peft_model.disable_adapter():
                expected = _reference(peft_model, tokenizer, request)
        else:
            peft_model.set_adapter(request.adapter)
            expected = _reference(peft_model, tokenizer, request)
        assert tokens == expected, (request.adapter, request.request_id)


def test_auto_decode_falls_back_to_the_dynamic_cache_where_static_rows_cannot_run(monkeypatch):
    """ "auto" picks CUDA graphs on a GPU; where the static rows cannot run (here: a KV budget
    below their buffers) it warns and decodes over the dynamic cache, while asking for them
    explicitly is refused with the reason."""
    from lorakit.errors import ConfigError
    from lorakit.serve import engine as engine_module
    from lorakit.serve.adapter_pool import AdapterPool
    from lorakit.serve.engine import Engine, EngineLimits

    monkeypatch.setattr(engine_module, "_decode_mode", lambda decode, device: "static")
    model, tokenizer = _fresh_model()
    limits = EngineLimits(max_num_seqs=4, kv_cache_gb=1e-4)
    pool = AdapterPool(model, max_loras=1, max_lora_rank=8)
    with pytest.warns(UserWarning, match="enforce-eager"):
        engine = Engine(model, tokenizer, pool, model_id="m", limits=limits, decode="auto")
    assert engine.decode_mode == "dynamic" and engine._static is None and engine.scheduler.static is None
    with pytest.raises(ConfigError, match="raise --kv-cache-gb or lower --max-num-seqs"):
        Engine(model, tokenizer, pool, model_id="m", limits=limits, decode="static")
