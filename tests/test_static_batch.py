"""`StaticBatch`: decode steps over fixed per-row buffers (what CUDA graphs replay) give each row
what the model computes for that row's whole sequence alone; rows join, leave and are reused; L
grows; a capture the model refuses falls back to eager steps."""

import inspect
import time

import pytest
import torch

import lorakit
from lorakit.serve import static_batch
from lorakit.serve.adapter_pool import BASE_ROUTE, AdapterPool
from lorakit.serve.static_batch import StaticBatch

from .tiny import randomize_adapters, tiny_llama


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model, 0.3)
    path = tmp_path_factory.mktemp("adapter") / "a"
    lorakit.save_adapter(model, path)
    return path


def cache_argument(model) -> str:
    # transformers renamed the forward's cache argument (past_key_values -> cache)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def forward(model):
    def run(ids, mask, positions, cache):
        kwargs = {cache_argument(model): cache}
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits[:, -1, :]

    return run


def prefill(model, prompts):
    """A left-padded prefill as the engine runs it: (cache, mask, last logits)."""
    from transformers import DynamicCache

    length = max(map(len, prompts))
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p)
        mask[i, length - len(p) :] = 1
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        kwargs = {cache_argument(model): cache}
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
    return cache, mask, out.logits[:, -1, :]


def alone(model, sequence):
    with torch.inference_mode():
        return model(torch.tensor([sequence])).logits[0, -1]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_rows_decode_as_alone(adapter_dir, attention, monkeypatch):
    """Decode steps under inference mode, joins and leaves outside it (as the engine makes them),
    L growing in between; sdpa takes the boolean mask, eager attention an additive one."""
    monkeypatch.setattr(static_batch, "FIRST_LENGTH", 8)  # L grows while the rows decode
    model = tiny_llama()
    model.set_attn_implementation(attention)
    pool = AdapterPool(model, max_loras=1, max_lora_rank=4)
    pool.register("a", adapter_dir)
    route = pool.acquire("a")
    while route is None:
        route = pool.acquire("a")
    batch = StaticBatch(model, 4, graphs=False, pool=pool, forward=forward(model))
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [3]]
    routes = [route, BASE_ROUTE, route]
    pool.set_rows(routes)
    cache, mask, _ = prefill(model, prompts)
    rows = batch.admit(cache, mask)
    assert rows == [0, 1, 2]
    sequences = [list(p) for p in prompts]
    for step in range(7):
        if step == 4:  # after L grew: row 1 leaves; a new row takes its static row
            batch.release(rows[1])
            pool.set_rows([route])
            cache, mask, _ = prefill(model, [[20, 21]])
            assert batch.admit(cache, mask) == [1]
            sequences[1] = [20, 21]
            routes[1] = route
        tokens = [(7 * step + 3 * i) % 120 + 1 for i in range(3)]
        for seq, token in zip(sequences, tokens):
            seq.append(token)
        with torch.inference_mode():
            got = batch.step(rows, tokens, routes)
        for i, seq in enumerate(sequences):
            with lorakit.disable_adapters(model) if routes[i] is BASE_ROUTE else _adapter(model, adapter_dir):
                want = alone(model, seq)
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4, msg=f"step {step} row {i}")
    assert batch.length >= 16  # grew from 8
    pool.close()


class _adapter:
    """The adapter in ``path`` applied to ``model`` alone, for a reference forward."""

    def __init__(self, model, path):
        self.model, self.path = model, path

    def __enter__(self):
        pool_routing = [(m, m.row_adapters) for m in lorakit.state.adapter_modules(self.model)]
        self.saved = pool_routing
        for module, _ in pool_routing:
            module.row_adapters = None
        lorakit.load_adapter(self.model, self.path, name="reference")
        return self

    def __exit__(self, *exc):
        lorakit.delete_adapter(self.model, "reference")
        for module, routing in self.saved:
            module.row_adapters = routing


def test_a_refused_capture_falls_back_to_eager_steps(adapter_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(static_batch, "CapturedCall", refuse)
    model = tiny_llama()
    pool = AdapterPool(model, max_loras=1, max_lora_rank=4)
    batch = StaticBatch(model, 2, graphs=True, pool=pool, forward=forward(model))
    cache, mask, _ = prefill(model, [[4, 5, 6]])
    rows = batch.admit(cache, mask)
    with pytest.warns(UserWarning, match="decoding eagerly"), torch.inference_mode():
        got = batch.step(rows, [7], [BASE_ROUTE])
    assert not batch.graphs
    torch.testing.assert_close(got[0], alone(model, [4, 5, 6, 7]), rtol=1e-4, atol=1e-4)


def test_attention_that_takes_no_mask_is_refused():
    from lorakit.errors import ConfigError

    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="sdpa or eager"):
        StaticBatch(model, 2, graphs=False, pool=None, forward=None)


PER_TOKEN = 1000  # KV bytes per token in the scheduler tests
ONE_LENGTH = 4 * static_batch.FIRST_LENGTH * PER_TOKEN  # four static rows' buffers at L = 256
TINY_PER_TOKEN = 2 * 2 * 2 * 8 * 4  # the tiny Llama's KV bytes per token: K and V, 2 layers, 2 heads of 8, fp32


def tiny_engine(decode: str = "static", kv_columns: int | None = None, observer=None, **limits):
    """An engine over a tiny Llama and a small trained tokenizer (``echo_tokenizer``), not started;
    ``kv_columns``: a KV budget of that many tokens."""
    from lorakit.serve.engine import Engine, EngineLimits

    from .serve_double import echo_tokenizer

    tokenizer = echo_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(vocab=len(tokenizer))
    if kv_columns is not None:
        limits["kv_cache_gb"] = kv_columns * TINY_PER_TOKEN / 2**30
    pool = AdapterPool(model, max_loras=1, max_lora_rank=4)
    limits = EngineLimits(**{"max_num_seqs": 4, **limits})
    return Engine(model, tokenizer, pool, model_id="m", limits=limits, decode=decode, observer=observer)


def wait(scheduler, name: str, prompt: int, max_tokens: int) -> None:
    """A request of ``prompt`` tokens asking ``max_tokens`` joins the scheduler's queue."""
    from lorakit.serve.requests import GenerationRequest, RequestHandle, SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0)
    scheduler.add(RequestHandle(GenerationRequest(name, [1] * prompt, None, sampling)))


def admitted_names(scheduler, running: int) -> list[str]:
    return [a.handle.request_id for a in scheduler.admit(running=running, running_columns=0)[0]]


def test_the_kv_budget_is_charged_for_the_static_rows():
    """Over static rows the KV memory is the buffers' (capacity × L columns, L doubling from 256),
    whatever the rows use: a row whose prompt + max_tokens would grow L past the budget waits
    while others run, goes alone, and a budget below one L of 256 is refused at start."""
    from lorakit.errors import ConfigError
    from lorakit.serve.scheduler import EngineLimits, Scheduler

    model = tiny_llama()
    batch = StaticBatch(model, 4, graphs=False, pool=None, forward=None)
    limits = EngineLimits(max_num_seqs=4, kv_cache_gb=(ONE_LENGTH + 10) / 2**30)
    scheduler = Scheduler(limits, AdapterPool(model, max_loras=1, max_lora_rank=4), PER_TOKEN, static=batch)

    # Three short rows fit one L of 256 together (the dynamic rule would charge their sum too).
    for name in ("a", "b", "c"):
        wait(scheduler, name, 100, 100)
    assert admitted_names(scheduler, running=0) == ["a", "b", "c"]
    # 200 + 100 columns would double L: the row waits while the three run, and goes alone.
    wait(scheduler, "long", 200, 100)
    assert admitted_names(scheduler, running=3) == []
    # One prefill pads its rows to its longest prompt: a short prompt asking many tokens beside a
    # long prompt needs long + many columns (10 + 240 alone would fit; 200 + 240 does not).
    fresh = Scheduler(limits, scheduler.pool, PER_TOKEN, static=batch)
    wait(fresh, "many", 10, 240)
    wait(fresh, "long-prompt", 200, 10)
    assert admitted_names(fresh, running=0) == ["many"]
    assert admitted_names(scheduler, running=0) == ["long"]
    assert scheduler.static_columns == 300
    # The buffers at L = 512 are held now: rows that fit them cost nothing more and join.
    wait(scheduler, "d", 250, 200)
    assert admitted_names(scheduler, running=1) == ["d"]

    with pytest.raises(ConfigError, match="raise --kv-cache-gb or lower --max-num-seqs"):
        Scheduler(EngineLimits(max_num_seqs=4, kv_cache_gb=(ONE_LENGTH - 10) / 2**30), None, PER_TOKEN, static=batch)


def test_the_dynamic_cache_is_charged_as_rows_times_the_longest_row():
    """The running batch's DynamicCache left-pads every row to the longest (and trims columns no
    row uses any more): a short request beside a long running row costs the long row's columns,
    not its own (which the sum of the rows' lengths would charge); each row carries its own."""
    from lorakit.serve.scheduler import EngineLimits, Scheduler

    pool = AdapterPool(tiny_llama(), max_loras=1, max_lora_rank=4)
    scheduler = Scheduler(EngineLimits(max_num_seqs=8, kv_cache_gb=1000 * PER_TOKEN / 2**30), pool, PER_TOKEN)
    wait(scheduler, "short", 10, 10)
    # one running row that may fill 600 columns: two rows of 600 are over 1000 (the sum, 620, is not)
    assert scheduler.admit(running=1, running_columns=600)[0] == []
    admitted = scheduler.admit(running=1, running_columns=400)[0]  # two rows of 400 fit
    assert [a.handle.request_id for a in admitted] == ["short"] and admitted[0].columns == 20
    for name, prompt, tokens in (("a", 100, 5), ("b", 10, 50), ("c", 10, 5)):
        wait(scheduler, name, prompt, tokens)
    admitted = scheduler.admit(running=0, running_columns=0)[0]
    assert [a.columns for a in admitted] == [105, 60, 15]
    # rows admitted together count too: beside a row of 250, four rows (1000) fit, a fifth does not
    for name, prompt, tokens in (("long", 100, 150), ("s1", 10, 5), ("s2", 10, 5), ("s3", 10, 5), ("s4", 10, 5)):
        wait(scheduler, name, prompt, tokens)
    assert [a.handle.request_id for a in scheduler.admit(running=0, running_columns=0)[0]] == ["long", "s1", "s2", "s3"]


def test_the_engine_charges_its_running_rows_columns():
    """The engine hands the scheduler its rows' columns: under a budget of 100 columns, a row that
    may fill 60 runs alone, and a short request waits for it to finish (two rows of 60 are 120)."""
    from lorakit.serve.requests import GenerationRequest, SamplingParams

    class Steps:
        def __init__(self):
            self.running = []

        def step(self, running, *args):
            self.running.append(running)

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    steps = Steps()
    engine = tiny_engine("dynamic", kv_columns=100, observer=steps)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (50, 5)]
    handles = [engine.submit(GenerationRequest(f"r{i}", [1] * 10, None, p)) for i, p in enumerate(params)]
    engine.start()
    try:
        assert [len(handle.collect(timeout=60)[0]) for handle in handles] == [50, 5]
    finally:
        engine.stop()
    assert max(steps.running) == 1


def test_one_request_may_not_reserve_more_kv_cache_than_the_budget():
    """A request whose prompt + max_tokens alone needs more KV cache than the budget would be
    admitted alone past it: it is refused at submission (400), and a request without max_tokens
    gets what the budget leaves. Static rows: the longest L their buffers may grow to."""
    from lorakit.errors import ConfigError
    from lorakit.serve.engine import EngineLimits
    from lorakit.serve.requests import GenerationRequest, SamplingParams
    from lorakit.serve.scheduler import Scheduler

    engine = tiny_engine("dynamic", kv_columns=100, max_num_seqs=2)
    assert engine.scheduler.most_columns() == 100

    def submit(max_tokens):
        return engine.submit(GenerationRequest("r", [1] * 10, None, SamplingParams(max_tokens=max_tokens)))

    with pytest.raises(ConfigError, match=r"more KV cache than this server holds for one request \(100 tokens\)"):
        submit(91)
    submit(90)
    assert submit(None).request.sampling.max_tokens == 90
    assert Scheduler(EngineLimits(), engine.pool, TINY_PER_TOKEN).most_columns() is None  # no budget

    batch = StaticBatch(engine.model, 4, graphs=False, pool=None, forward=None)
    for budget, columns in ((ONE_LENGTH + 10, 256), (2 * ONE_LENGTH, 512), (5 * ONE_LENGTH, 1024)):
        scheduler = Scheduler(EngineLimits(max_num_seqs=4, kv_cache_gb=budget / 2**30), None, PER_TOKEN, static=batch)
        assert scheduler.most_columns() == columns


def test_a_chat_without_max_tokens_gets_what_the_kv_budget_leaves_over_http():
    """Over HTTP too: a chat that asks no max_tokens is answered (200), its completion capped by
    what the budget leaves after its prompt; one asking more than that is a 400."""
    httpx = pytest.importorskip("httpx")
    from lorakit.serve.app import build_app

    from .http_server import running_server

    engine = tiny_engine("dynamic", kv_columns=100, max_num_seqs=2)
    asked = []
    submit = engine.submit
    engine.submit = lambda request, loop=None: asked.append(request) or submit(request, loop)
    engine.start()
    try:
        with running_server(build_app(engine, api_key="")) as url:
            body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            prompt = len(asked[-1].prompt_ids)
            assert asked[-1].sampling.max_tokens == 100 - prompt
            assert response.json()["usage"]["completion_tokens"] <= 100 - prompt
            response = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 100}, timeout=60)
            assert response.status_code == 400 and "KV cache" in response.json()["error"]["message"]
    finally:
        engine.stop()


def test_a_failing_device_still_gives_each_client_one_last_delta():
    """When a decode step fails and every later device operation fails too (a sticky CUDA error),
    the rows leave once, and their error deltas reach the clients' event loop."""
    import asyncio

    from lorakit.serve.engine import Engine, EngineLimits
    from lorakit.serve.requests import GenerationRequest, SamplingParams

    from .serve_double import echo_tokenizer

    tokenizer = echo_tokenizer()
    model = tiny_llama(vocab=len(tokenizer))
    pool = AdapterPool(model, max_loras=1, max_lora_rank=4)
    engine = Engine(model, tokenizer, pool, model_id="m", limits=EngineLimits(max_num_seqs=2), decode="static")
    engine.start()
    released = []
    pool_release = pool.release
    pool.release = lambda route: (released.append(route), pool_release(route))

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    async def client():
        loop = asyncio.get_running_loop()
        params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
        handle = engine.submit(GenerationRequest("r", [1, 2, 3], None, params), loop=loop)
        first = await asyncio.wait_for(handle.__anext__(), 30)
        engine._static.step = engine._static.release = broken
        last = first
        while last.finish_reason is None:
            last = await asyncio.wait_for(handle.__anext__(), 30)
        await asyncio.sleep(0.2)
        return last, handle._async_queue.qsize()

    last, after = asyncio.run(client())
    engine.stop()
    assert last.finish_reason == "error" and "device-side assert" in last.error
    assert after == 0 and len(released) == 1  # one last delta, the slot given back once


def test_static_rows_without_a_kv_budget_take_a_share_of_free_device_memory(monkeypatch):
    """Without --kv-cache-gb, static rows (whose buffers grow with the longest row, for every row)
    are bounded by a share of the GPU's free memory, as --kv-cache-gb would bound them."""
    from lorakit.errors import ConfigError
    from lorakit.serve import engine as engine_module
    from lorakit.serve.scheduler import EngineLimits, Scheduler

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000_000, 80_000_000))
    assert engine_module._static_rows_memory(torch.device("cuda")) == 8_000_000
    assert engine_module._static_rows_memory(torch.device("cpu")) is None

    model = tiny_llama()
    batch = StaticBatch(model, 4, graphs=False, pool=None, forward=None)
    limits = EngineLimits(max_num_seqs=4)
    pool = AdapterPool(model, max_loras=1, max_lora_rank=4)
    scheduler = Scheduler(limits, pool, PER_TOKEN, static=batch, device_memory=ONE_LENGTH + 10)
    wait(scheduler, "short", 100, 100)
    wait(scheduler, "long", 300, 100)
    assert admitted_names(scheduler, running=0) == ["short"]
    assert Scheduler(limits, pool, PER_TOKEN, device_memory=10)._budget() is None  # dynamic cache: unbounded
    with pytest.raises(ConfigError, match="free device memory"):
        Scheduler(limits, pool, PER_TOKEN, static=batch, device_memory=ONE_LENGTH - 10)


def test_auto_decode_is_cuda_graphs_on_a_gpu_with_triton(monkeypatch):
    """The default decode: CUDA graphs over static rows where a GPU and Triton are there, the
    dynamic cache elsewhere; graphs asked for without them are refused."""
    from lorakit.errors import ConfigError
    from lorakit.kernels import triton_support
    from lorakit.serve.engine import _decode_mode

    monkeypatch.setattr(triton_support, "triton", object())
    assert _decode_mode("auto", torch.device("cuda")) == "graphs"
    assert _decode_mode("auto", torch.device("cpu")) == "dynamic"
    monkeypatch.setattr(triton_support, "triton", None)
    assert _decode_mode("auto", torch.device("cuda")) == "dynamic"
    with pytest.raises(ConfigError, match="needs the model on a CUDA device and Triton"):
        _decode_mode("graphs", torch.device("cuda"))


def _overlap_run(overlap: bool, decode: str = "static", cancel: bool = False):
    """A tiny model's engine over staggered arrivals: greedy and seeded sampled rows, stop strings,
    varied max_tokens. Returns each request's (tokens, text, finish reason, usage) and, for each
    static decode step, (launched from device tokens, its rows)."""
    from lorakit.serve.requests import GenerationRequest, SamplingParams

    engine = tiny_engine(decode)
    tokenizer = engine.tokenizer
    engine.overlap = overlap
    from_device = []
    if engine._static is not None:
        step = engine._static.step
        engine._static.step = lambda rows, tokens, routes: (
            from_device.append((isinstance(tokens, torch.Tensor), len(rows))) or step(rows, tokens, routes)
        )
    gen = torch.Generator().manual_seed(3)
    requests = []
    for i in range(10):
        prompt = torch.randint(5, len(tokenizer) - 5, (int(torch.randint(2, 12, (1,), generator=gen)),), generator=gen)
        params = SamplingParams(
            max_tokens=int(torch.randint(1, 24, (1,), generator=gen)),
            temperature=[0, 0.8][i % 2],
            seed=100 + i,
            stop=["e"] if i % 3 == 0 else [],
        )
        requests.append(GenerationRequest(f"r{i}", prompt.tolist(), None, params))
    engine.start()
    try:
        if cancel:  # one request cancelled after its third delta, while the others run beside it
            params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
            cancelled = engine.submit(GenerationRequest("cancelled", [7, 8, 9], None, params))
        handles = []
        for i, request in enumerate(requests):
            handles.append(engine.submit(request))
            if i % 4 == 3:
                time.sleep(0.05)  # later arrivals join a running batch
        if cancel:
            for _ in range(3):
                cancelled.next_delta(timeout=60)
            cancelled.cancel()
            while (last := cancelled.next_delta(timeout=60)).finish_reason is None:
                pass
            assert last.finish_reason == "abort" and last.completion_tokens < 200
        answers = []
        for handle in handles:
            tokens, text, last = handle.collect(timeout=60)
            answers.append((tokens, text, last.finish_reason, last.completion_tokens))
    finally:
        engine.stop()
    return answers, from_device


def test_overlapped_steps_give_the_same_answers():
    """Decode steps launched from the previous step's samples on the device (``Engine.overlap``)
    give every request the tokens, text and finish reason of steps that wait for their tokens,
    and of the dynamic cache; no row makes more than max_tokens."""
    overlapped, steps = _overlap_run(True)
    waited, waited_steps = _overlap_run(False)
    dynamic, _ = _overlap_run(True, decode="dynamic")
    assert any(on_device for on_device, _ in steps) and not any(on_device for on_device, _ in waited_steps)
    assert overlapped == waited == dynamic
    # A row ended by a stop string computes one token more (dropped); one ended by its length none.
    stops = sum(reason == "stop" for _, _, reason, _ in overlapped)
    extra = sum(rows for _, rows in steps) - sum(rows for _, rows in waited_steps)
    assert 0 <= extra <= stops
    assert {reason for _, _, reason, _ in overlapped} == {"stop", "length"}
    for tokens, _, _, usage in overlapped:
        assert len(tokens) == usage


def test_a_row_cancelled_while_its_step_is_in_flight_leaves_and_the_rest_are_unchanged():
    answers, _ = _overlap_run(True, cancel=True)
    assert answers == _overlap_run(False)[0]


# --- the overlapped engine driven step by step ------------------------------------------------
def _stepped_engine(overlap: bool = True):
    """An engine over static rows (eager, on the CPU) warmed up but not started: the tests call
    ``_step`` themselves, so what is in flight at each point is known."""
    engine = tiny_engine()
    engine.overlap = overlap
    engine._warm_up()
    return engine


def _ask(engine, name, prompt, max_tokens, **sampling):
    from lorakit.serve.requests import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **{"temperature": 0, **sampling})
    return engine.submit(GenerationRequest(name, prompt, None, params))


def _steps(engine, count):
    for _ in range(count):
        engine._step()
        engine._outbox.flush()


def _deltas(handle):
    out = []
    while not handle._queue.empty():
        out.append(handle._queue.get())
    return out


def _ending(handle):
    deltas = _deltas(handle)
    return sum((d.token_ids for d in deltas), []), deltas[-1].finish_reason, deltas[-1].completion_tokens


def test_a_row_ended_by_length_at_the_buffers_end_is_freed_before_the_next_step():
    """A row whose last key fills the static buffers' last column (prompt 200 + 57 tokens: 256)
    is left out of the step launched beside its last one; its static row is freed, not kept in the
    step's bucket, where its key would be written past the buffers (rows after it running on)."""
    answers = []
    for overlap in (False, True):
        engine = _stepped_engine(overlap)
        long = _ask(engine, "A", [5 + i % 300 for i in range(200)], 57)
        _steps(engine, 1)  # A in static row 0
        short = _ask(engine, "B", [5, 6, 7, 8, 9], 80)  # B in static row 1: A's row is inside B's bucket
        _steps(engine, 120)
        answers.append([_ending(long), _ending(short)])
        assert engine._static.length == 256
    assert answers[0] == answers[1]
    assert [(reason, made) for _, reason, made in answers[1]] == [("length", 57), ("length", 80)]


def test_a_failing_step_still_delivers_the_step_before_it():
    answers = []
    for overlap in (False, True):
        engine = _stepped_engine(overlap)
        calls, step = [0], engine._static.step

        def failing(rows, tokens, routes):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("CUDA out of memory (simulated)")
            return step(rows, tokens, routes)

        engine._static.step = failing
        first, second = _ask(engine, "A", [5, 6, 7], 3), _ask(engine, "B", [8, 9, 10], 10)
        _steps(engine, 6)
        answers.append([_ending(first), _ending(second)])
        assert not engine._rows and not any(engine._static.used)
    assert answers[0] == answers[1]
    assert answers[1][0][1:] == ("length", 3) and answers[1][1][1] == "error"


def test_stopping_delivers_the_step_in_flight():
    engine = _stepped_engine()
    handle = _ask(engine, "A", [5, 6, 7], 2)
    _steps(engine, 1)  # the prefill's token out, the second token's step in flight
    assert engine._inflight is not None
    engine._stop.set()
    engine._run()  # the loop ends at once; its clean stop reads the step in flight
    tokens, reason, made = _ending(handle)
    assert (len(tokens), reason, made) == (2, "length", 2)


def test_decode_counts_and_switching_overlap_off_mid_run():
    """The observer counts the rows each step computes (not rows left out of it), and overlap
    switched off between steps reads the step in flight first: the same tokens as without it."""
    from lorakit.serve.requests import NullObserver

    class Counted(NullObserver):
        def __init__(self):
            self.decoded = 0

        def step(self, running, waiting, prefill, decode, seconds):
            self.decoded += decode

    answers = []
    for switch in (None, 3):
        engine = _stepped_engine(overlap=switch is not None)
        engine.observer = Counted()
        handles = [_ask(engine, f"r{i}", [5, 6, 7 + i], n) for i, n in enumerate((4, 6, 9))]
        for k in range(15):
            if k == switch:
                engine.overlap = False
            _steps(engine, 1)
        answers.append([_ending(h) for h in handles])
        made = sum(made for _, _, made in answers[-1])
        assert engine.observer.decoded == made - 3  # every token but the prefills' first ones
    assert answers[0] == answers[1]


def test_logits_sampling_refuses_fail_their_rows_not_the_engine():
    """NaN logits (multinomial refuses them) fail the rows of that step, in the waiting and the
    overlapped path alike; the engine goes on serving."""
    for overlap in (False, True):
        engine = _stepped_engine(overlap)
        step = engine._static.step
        engine._static.step = lambda rows, tokens, routes: step(rows, tokens, routes) * float("nan")
        broken = _ask(engine, "A", [5, 6, 7], 5, temperature=1.0, seed=1)
        _steps(engine, 3)
        assert _ending(broken)[1] == "error" and not engine._rows
        engine._static.step = step
        fine = _ask(engine, "B", [5, 6, 7], 3)
        _steps(engine, 4)
        assert _ending(fine)[1:] == ("length", 3)
