"""The serving stack against a live server on localhost: the official `openai`
client (completions, chat, streaming), plain HTTP for the TGI routes, greedy output
equal to the offline decode, 16 and 64 requests in flight equal to one at a time,
client mistakes answered 4xx (never 500) while the server keeps serving, a client
gone mid-answer frees its slot, a burst past the limit answered 429 while the
admitted requests answer right, int8 weights within 1% perplexity of bfloat16 at
about half the memory."""

import collections
import concurrent.futures
import contextlib
import json
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import requests
from flax import nnx

from maxllm.sample import greedy_generate
from maxllm.serve.sampling import sample

from conftest import QUICKSTART, free_port, train_on_quickstart

VALID = QUICKSTART / "tokens" / "valid"
PROMPTS = [
    "The function returns", "To create a table in PostgreSQL,", "In Django, a model", "SELECT", "import os\n",
    "The server", "A database", "class Meta:", "Returns the", "If the value is", "The following example",
    "Python is", "def main():", "CREATE INDEX", "The default", "See also",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained by maxllm on the quickstart shards (a run directory)."""
    out = tmp_path_factory.mktemp("served")
    train_on_quickstart(out, "model.d_model=128", "model.mlp_dim=256", "model.max_seq_len=256", "data.seq_len=64",
                        "train.steps=80", "train.lr=3e-3", "train.global_batch_size=16", "checkpoint.every_steps=80")
    return out


@pytest.fixture(scope="module")
def live(trained):
    """(base URL, Server) for a uvicorn server in a background thread."""
    import uvicorn

    from maxllm.serve.loader import build_server
    from maxllm.serve.server import create_app

    server = build_server(trained, dtype="float32", slots=4, max_total_tokens=128, model_name="tiny")
    server.engine.start()
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not web.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)  # waiting for the socket to open; no result depends on it
    yield f"http://127.0.0.1:{port}", server
    web.should_exit = True
    thread.join(timeout=10)
    server.engine.stop()


def _offline(server, prompt: str, n: int) -> str:
    tok = server.tokenizer
    engine = server.engine
    ids = greedy_generate(engine.graphdef, engine.params, [tok.encode(prompt)], n, engine.max_len, tok.eos_id)[0]
    return tok.decode(ids)


def _client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_openai_client_completions_chat_and_streaming(live):
    url, server = live
    client = _client(url)
    assert [m.id for m in client.models.list().data] == ["tiny"]

    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    text = out.choices[0].text
    assert text == _offline(server, PROMPTS[0], 20)  # greedy through the server = offline greedy decode
    assert out.usage.completion_tokens == 20 and out.choices[0].finish_reason == "length"

    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0, stream=True))
    assert streamed == text

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=12, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=12, temperature=0, stream=True)]
    assert "".join(pieces) == chat.choices[0].message.content

    scored = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=1, temperature=0, echo=True, logprobs=1)
    lps = scored.choices[0].logprobs.token_logprobs
    assert lps[0] is None and all(lp <= 0 for lp in lps[1:])  # prompt log-probs, for evaluation

    a = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    b = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text  # seeded sampling is reproducible


def test_tgi_routes(live):
    url, server = live
    r = requests.post(f"{url}/generate", json={"inputs": PROMPTS[0], "parameters": {
        "max_new_tokens": 20, "details": True, "decoder_input_details": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["generated_text"] == _offline(server, PROMPTS[0], 20)
    d = body["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 20 and len(d["tokens"]) == 20
    assert d["prefill"][0]["logprob"] is None and len(d["prefill"]) == len(server.tokenizer.encode(PROMPTS[0]))

    with requests.post(f"{url}/generate_stream", json={"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 20}},
                       stream=True) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data:")]
    assert "".join(e["token"]["text"] for e in events[:-1]) == body["generated_text"]
    assert events[-1]["generated_text"] == body["generated_text"] and events[-1]["details"]["finish_reason"] == "length"

    stop = requests.post(f"{url}/generate", json={"inputs": PROMPTS[0], "parameters": {
        "max_new_tokens": 20, "stop": [body["generated_text"][3:6]], "details": True}}).json()
    assert stop["generated_text"] == body["generated_text"][:3] and stop["details"]["finish_reason"] == "stop_sequence"

    info = requests.get(f"{url}/info").json()
    assert info["model_id"] == "tiny" and info["max_total_tokens"] == 128 and info["max_input_tokens"] == 127
    assert requests.get(f"{url}/health").status_code == 200
    metrics = requests.get(f"{url}/metrics").text
    for name in ("maxllm_requests_total", "maxllm_prompt_tokens_total", "maxllm_generated_tokens_total",
                 "maxllm_queue_depth", "maxllm_time_to_first_token_seconds_bucket",
                 "maxllm_time_per_output_token_seconds_bucket"):
        assert name in metrics, name


def _complete(url, prompt, max_tokens):
    r = requests.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                                     "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_requests_in_flight_equal_one_at_a_time(live):
    url, _ = live
    jobs = [(PROMPTS[i % 16] + " " * (i // 16), 4 + (7 * i) % 29) for i in range(64)]  # mixed lengths
    alone = [_complete(url, p, n) for p, n in jobs[:16]]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda job: _complete(url, *job), jobs[:16]))
    assert together == alone
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        many = list(pool.map(lambda job: _complete(url, *job), jobs))
    expected = alone + [_complete(url, p, n) for p, n in jobs[16:]]
    assert many == expected


def test_client_mistakes_get_4xx_json_and_the_server_keeps_serving(live):
    url, server = live
    post = lambda path, **kw: requests.post(f"{url}{path}", **kw)  # noqa: E731
    cases = [
        post("/v1/completions", data="{not json", headers={"content-type": "application/json"}),
        post("/v1/completions", json={"model": "tiny", "prompt": 5}),
        post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": "many"}),
        post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": -3}),
        post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 10**9}),
        post("/v1/completions", json={"model": "tiny", "prompt": "word " * 400, "max_tokens": 4}),
        post("/v1/completions", json={"model": "tiny", "prompt": [999999], "max_tokens": 4}),
        post("/v1/completions", json={"model": "tiny", "prompt": "", "max_tokens": 4}),
        post("/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": -1}),
        post("/v1/chat/completions", json={"model": "tiny", "messages": []}),
        post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}),
        post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 0}}),
        post("/generate", json={"parameters": {}}),
        post("/generate", json=[1, 2]),
    ]
    for r in cases:
        assert r.status_code == 422, (r.status_code, r.text)
        assert "error" in r.json()
    unknown = post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "model_not_found"
    assert "max_input_tokens is 127" in cases[5].json()["error"]["message"]
    assert requests.get(f"{url}/nope").status_code == 404
    assert requests.get(f"{url}/health").status_code == 200
    assert _complete(url, PROMPTS[0], 20) == _offline(server, PROMPTS[0], 20)


def test_too_many_in_flight_get_429_and_api_key_is_enforced(live):
    url, server = live
    server.cfg.max_concurrent_requests = 2
    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(lambda i: requests.post(f"{url}/generate", json={
                "inputs": PROMPTS[i], "parameters": {"max_new_tokens": 100}}).status_code, range(12)))
    finally:
        server.cfg.max_concurrent_requests = 128
    assert set(codes) <= {200, 429} and codes.count(200) >= 2 and 429 in codes
    server.cfg.api_key = "sekret"
    try:
        assert requests.get(f"{url}/v1/models").status_code == 401
        assert requests.get(f"{url}/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
    finally:
        server.cfg.api_key = None


def _metrics(url) -> dict[str, float]:
    """The server's Prometheus samples, keyed by name and labels as written."""
    lines = requests.get(f"{url}/metrics").text.splitlines()
    return {key: float(value) for key, value in (line.rsplit(" ", 1) for line in lines if not line.startswith("#"))}


def _send(url, path: str, body: dict) -> socket.socket:
    """A raw HTTP/1.1 request on a connection of its own, sent; the answer is unread."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def _poll(url, until, what: str, seconds: float = 30) -> dict[str, float]:
    """The server's metrics once `until(metrics)` holds; fails after `seconds`."""
    deadline = time.monotonic() + seconds
    while not until(m := _metrics(url)):
        assert time.monotonic() < deadline, f"{what}: {m}"
        time.sleep(0.02)  # polling the server; no result depends on it
    return m


IN_FLIGHT, RUNNING = "maxllm_requests_in_flight", "maxllm_running_requests"
GENERATED, CANCELLED = "maxllm_generated_tokens_total", 'maxllm_finished_requests_total{reason="cancelled"}'


def _idle(m: dict[str, float]) -> bool:
    return m[IN_FLIGHT] == 0 and m[RUNNING] == 0


@contextlib.contextmanager
def _engine_stopped_at(engine, method: str, after: int = 0):
    """The engine's loop calls `method` (`_admit`: take in waiting requests;
    `_generate`: one decode step) `after` times, then parks before the next call
    until the caller releases it or the block ends; yields (parked, release). The
    test decides when the engine moves, however fast the machine is."""
    run, parked, gate, left = getattr(engine, method), threading.Event(), threading.Event(), [after]

    def stopped():
        if left[0]:
            left[0] -= 1
        else:
            parked.set()
            gate.wait()
        run()

    setattr(engine, method, stopped)
    try:
        engine._wake.set()  # the loop comes round now, not at its next idle timeout
        yield parked, gate.set
    finally:
        gate.set()
        delattr(engine, method)


MAX_TOKENS, STEPS = 90, 8  # the greedy continuations below run 90 tokens without an end-of-sequence
GONE_CASES = {
    "completions-stream": ("/v1/completions", {"prompt": PROMPTS[0], "stream": True}),
    "chat-stream": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "stream": True}),
    "completions-whole": ("/v1/completions", {"prompt": PROMPTS[0]}),
    "tgi-stream": ("/generate_stream", {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": MAX_TOKENS}}),
}


@pytest.mark.parametrize("case", GONE_CASES)
def test_a_client_gone_mid_answer_frees_its_slot(live, case):
    """The client reads three events of a long stream (or waits for a whole answer
    while its request decodes) and closes the connection: the request ends as
    "cancelled" far short of its max tokens, nothing is left in flight, and the
    next request is answered as usual."""
    url, server = live
    path, body = GONE_CASES[case]
    if path.startswith("/v1"):
        body = {"model": "tiny", "max_tokens": MAX_TOKENS, "temperature": 0, **body}
    before = _poll(url, _idle, "not idle before the test")
    with _engine_stopped_at(server.engine, "_generate", after=STEPS) as (parked, go_on):
        sock = _send(url, path, body)
        try:
            if body.get("stream") or path == "/generate_stream":
                received = b""
                while received.count(b"data:") < 3:
                    chunk = sock.recv(4096)
                    assert chunk, received
                    received += chunk
                assert received.startswith(b"HTTP/1.1 200"), received
            assert parked.wait(30), "the engine did not reach its last step"
        finally:
            sock.close()
        deadline = time.monotonic() + 30
        while not any(r is not None and r.cancelled for r in server.engine.active):
            assert time.monotonic() < deadline, "the server did not cancel the request"
            time.sleep(0.02)  # polling; no result depends on it
        go_on()
    after = _poll(url, _idle, "the slot was not freed")
    generated = after[GENERATED] - before[GENERATED]
    print(f"{case}: the request ended after {generated:.0f} of {MAX_TOKENS} tokens")
    assert after[CANCELLED] == before.get(CANCELLED, 0) + 1, "the request was not cancelled"
    assert 1 <= generated <= STEPS + 1  # the prefill's token and one a step
    assert _complete(url, PROMPTS[0], 20) == _offline(server, PROMPTS[0], 20)


def test_a_client_gone_while_waiting_gives_back_its_place(live):
    """A request whose client leaves before it gets a slot is dropped unstarted
    and no longer counts against max_concurrent_requests."""
    url, server = live
    gone = 'maxllm_requests_total{route="/v1/completions",status="499"}'
    before = _poll(url, _idle, "not idle before the test")
    with _engine_stopped_at(server.engine, "_admit") as (parked, _):
        assert parked.wait(30), "the engine loop did not come round"
        sock = _send(url, "/v1/completions", {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 8})
        _poll(url, lambda m: m[IN_FLIGHT] == 1, "the request was not admitted")
        sock.close()
        _poll(url, lambda m: m.get(gone, 0) == before.get(gone, 0) + 1, "the server did not see the client go")
    after = _poll(url, _idle, "the request still counts as in flight")
    assert after[CANCELLED] == before.get(CANCELLED, 0) + 1 and after[GENERATED] == before[GENERATED]


def test_a_burst_past_the_limit_gets_429_and_the_admitted_answer_right(live):
    """200 requests at once (half of them streamed) at a server that takes 4: the
    engine holds still while they land, so exactly 4 are admitted whatever the
    machine's speed; the rest get 429 with OpenAI's error and Retry-After, never a
    500; the 4 answer what greedy decoding gives, and the server then serves on."""
    url, server = live
    n, limit, max_tokens = 200, 4, 8
    jobs = [(PROMPTS[i % 4], i % 2 == 1) for i in range(n)]  # (prompt, streamed)
    start = threading.Barrier(n, timeout=60)

    def post(job):
        prompt, stream = job
        start.wait()
        r = requests.post(f"{url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream})
        if r.status_code == 200 and stream:
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]", r.text
            return r.status_code, r.headers, "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        return r.status_code, r.headers, r.json()

    server.cfg.max_concurrent_requests = limit
    try:
        with concurrent.futures.ThreadPoolExecutor(n) as pool, \
                _engine_stopped_at(server.engine, "_admit") as (parked, go_on):
            assert parked.wait(30), "the engine loop did not come round"
            futures = [pool.submit(post, job) for job in jobs]
            deadline = time.monotonic() + 60
            while sum(f.done() for f in futures) < n - limit:  # all but the admitted
                assert time.monotonic() < deadline, f"{sum(f.done() for f in futures)} of {n} answered"
                time.sleep(0.02)  # waiting for the rejections; no result depends on it
            go_on()
        answers = [f.result() for f in futures]
    finally:
        server.cfg.max_concurrent_requests = 128
    codes = collections.Counter(status for status, _, _ in answers)
    print(f"burst of {n} requests, max_concurrent_requests={limit}: "
          f"{codes[200]} answered 200, {codes[429]} answered 429, {n - codes[200] - codes[429]} other")
    assert codes == {200: limit, 429: n - limit}
    reference = {}
    for (status, headers, answer), (prompt, stream) in zip(answers, jobs):
        if status == 429:
            assert headers["Retry-After"] == "1"
            assert answer["error"]["type"] == "rate_limit_error" and answer["error"]["code"] == 429
            assert "max_concurrent_requests is 4" in answer["error"]["message"]
        else:
            if prompt not in reference:
                reference[prompt] = _offline(server, prompt, max_tokens)
            text = answer if stream else answer["choices"][0]["text"]
            assert text == reference[prompt], (prompt, stream)
    m = _poll(url, _idle, "requests left in flight after the burst")
    assert not [key for key in m if key.startswith("maxllm_requests_total") and 'status="5' in key]
    assert _complete(url, PROMPTS[5], max_tokens) == _offline(server, PROMPTS[5], max_tokens)


# ---------------------------------------------------------------------------------
# Sampling and int8


def test_sampling_options_match_their_definitions():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 50)) * 3, jnp.float32)
    seen = jnp.zeros((4, 50), bool).at[:, :10].set(True)
    keys = jax.random.split(jax.random.key(0), 4)
    ones, zeros = jnp.ones(4), jnp.zeros(4)
    greedy, lp = sample(logits, zeros, zeros.astype(int), ones, ones, seen, keys)
    np.testing.assert_array_equal(greedy, np.argmax(logits, -1))
    np.testing.assert_allclose(lp, jax.nn.log_softmax(logits)[jnp.arange(4), greedy], rtol=1e-6)
    top1, _ = sample(logits, ones, jnp.ones(4, int), ones, ones, seen, keys)  # top-k 1 = greedy
    np.testing.assert_array_equal(top1, greedy)
    tiny_p, _ = sample(logits, ones, zeros.astype(int), jnp.full(4, 1e-6), ones, seen, keys)  # top-p -> the best token
    np.testing.assert_array_equal(tiny_p, greedy)
    # Repetition penalty as transformers defines it, on the seen tokens only.
    pen = 2.0
    ref = np.where(np.asarray(seen), np.where(np.asarray(logits) > 0, np.asarray(logits) / pen, np.asarray(logits) * pen),
                   np.asarray(logits))
    penalized, _ = sample(logits, zeros, zeros.astype(int), ones, jnp.full(4, pen), seen, keys)
    np.testing.assert_array_equal(penalized, ref.argmax(-1))
    # Draws follow the distribution: top-k 3 at temperature 1 over many keys.
    many = jax.vmap(lambda k: sample(logits[:1], ones[:1], jnp.array([3]), ones[:1], ones[:1], seen[:1], k[None])[0][0])(
        jax.random.split(jax.random.key(1), 4000))
    top3 = np.argsort(-np.asarray(logits[0]))[:3]
    p = np.exp(np.asarray(logits[0])[top3] - np.asarray(logits[0])[top3].max())
    p /= p.sum()
    freq = np.array([(np.asarray(many) == t).mean() for t in top3])
    assert set(np.unique(np.asarray(many))) <= set(top3)
    np.testing.assert_allclose(freq, p, atol=0.03)


def test_int8_perplexity_within_1_percent_of_bfloat16_at_half_the_memory(trained):
    from maxllm.data.sources import Manifest, token_shards
    from maxllm.hf import load_pretrained
    from maxllm.models import build_model
    from maxllm.serve.quantize import quantize_params, weight_bytes

    loaded = load_pretrained(trained)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(loaded.config.model, 0)))
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), loaded.params)
    int8 = quantize_params(bf16)
    docs = token_shards(Manifest.read(VALID))
    rows = np.stack([np.resize(docs[i], 129) for i in range(len(docs))])  # held-out text, 128 targets a row

    @jax.jit
    def nll(params, rows):
        model = nnx.merge(graphdef, params)
        positions = jnp.broadcast_to(jnp.arange(128), (rows.shape[0], 128))
        logits, _, _ = model(rows[:, :-1], positions)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.take_along_axis(lp, rows[:, 1:, None], -1).mean()

    ppl_bf16 = float(jnp.exp(nll(bf16, jnp.asarray(rows))))
    ppl_int8 = float(jnp.exp(nll(int8, jnp.asarray(rows))))
    assert abs(ppl_int8 - ppl_bf16) / ppl_bf16 <= 0.01, (ppl_bf16, ppl_int8)
    assert ppl_bf16 < 4096 / 4  # trained: far better than uniform
    ratio = weight_bytes(int8) / weight_bytes(bf16)
    print(f"held-out perplexity bf16 {ppl_bf16:.4f} int8 {ppl_int8:.4f} "
          f"({(ppl_int8 - ppl_bf16) / ppl_bf16:+.3%}); weights int8/bf16 {ratio:.3f}")
    assert ratio <= 0.52, ratio


def test_the_serve_command_starts_serves_and_stops(trained):
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "maxllm.serve", "--model", str(trained), "--port", str(port),
                             "--max-total-tokens", "64", "--slots", "2", "--quantize", "int8", "--api-key", "k"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)  # waiting for the port to open; no result depends on it
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions", headers={"Authorization": "Bearer k"},
                          json={"model": trained.name, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
        assert requests.get(f"http://127.0.0.1:{port}/info", headers={"Authorization": "Bearer k"}).json()["model_dtype"] == "int8"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def test_an_exported_hf_folder_serves_like_its_run(trained, tmp_path):
    from maxllm.hf import export_run
    from maxllm.serve.engine import SamplingParams
    from maxllm.serve.loader import load_engine

    hf = export_run(trained, tmp_path / "hf", dtype="float32")
    engine, tokenizer, cfg, _ = load_engine(hf, dtype="float32", slots=2, max_total_tokens=64)
    assert cfg.model.d_model == 128 and tokenizer.path.endswith("tokenizer.json")  # the folder's own tokenizer
    run_engine, run_tokenizer, _, _ = load_engine(trained, dtype="float32", slots=2, max_total_tokens=64, warmup=False)
    prompt = run_tokenizer.encode(PROMPTS[0])
    assert tokenizer.encode(PROMPTS[0]) == prompt
    engine.start()
    try:
        result = engine.generate(prompt, SamplingParams(max_new_tokens=12))
    finally:
        engine.stop()
    expected = greedy_generate(run_engine.graphdef, run_engine.params, [prompt], 12, 64, run_tokenizer.eos_id)[0]
    assert [t.id for t in result.tokens] == expected[:len(result.tokens)] and result.tokens


def test_batched_prefill_equals_one_request_at_a_time_scanned_or_unrolled(trained):
    """Requests waiting together go through one padded prefill (mixed prompt lengths,
    sampling options, prompt log-probs); each result equals that request run alone,
    and a scanned layer stack decodes the same as the unrolled one."""
    from maxllm.serve.engine import Request, SamplingParams
    from maxllm.serve.loader import load_engine

    options = [SamplingParams(max_new_tokens=10, prompt_logprobs=True), SamplingParams(max_new_tokens=7),
               SamplingParams(max_new_tokens=9, temperature=0.8, top_p=0.9, seed=3),
               SamplingParams(max_new_tokens=8, repetition_penalty=1.3),
               SamplingParams(max_new_tokens=6, temperature=1.0, top_k=5, seed=11)]
    results = {}
    for scan in (False, True):
        engine, tokenizer, _, _ = load_engine(trained, dtype="float32", slots=8, max_total_tokens=96,
                                              scan_layers=scan, warmup=False)
        prompts = [tokenizer.encode(PROMPTS[i] + " and" * (3 * i)) for i in range(7)]  # 16- and 32-token buckets
        batches = []
        run_prefill = engine._run_prefill
        engine._run_prefill = lambda p, *a: (batches.append(len(p)), run_prefill(p, *a))[1]
        together = {}
        for i, prompt in enumerate(prompts):  # all waiting before the engine starts
            engine.submit(Request(prompt, options[i % len(options)], on_done=lambda r, i=i: together.update({i: r})))
        engine._admit()
        assert batches == [7]
        while engine.busy_slots:
            engine._generate()
        engine.start()
        try:
            alone = [engine.generate(p, options[i % len(options)]) for i, p in enumerate(prompts)]
        finally:
            engine.stop()
        for i, result in enumerate(alone):
            batched = together[i]
            assert [t.id for t in batched.tokens] == [t.id for t in result.tokens] and result.tokens
            np.testing.assert_allclose([t.logprob for t in batched.tokens], [t.logprob for t in result.tokens],
                                       atol=1e-5)
            if i % len(options) == 0:
                np.testing.assert_allclose(batched.prompt_logprobs[1:], result.prompt_logprobs[1:], atol=1e-5)
        results[scan] = [[t.id for t in r.tokens] for r in alone]
    assert results[True] == results[False]


def test_a_failed_prefill_fails_its_requests_and_the_engine_goes_on(trained):
    from maxllm.serve.engine import SamplingParams
    from maxllm.serve.loader import load_engine

    engine, tokenizer, _, _ = load_engine(trained, dtype="float32", slots=2, max_total_tokens=64, warmup=False)
    prompt = tokenizer.encode(PROMPTS[0])
    prefill, calls = engine._prefill, []

    def broken_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected prefill failure")
        return prefill(*args)

    engine._prefill = broken_once
    engine.start()
    try:
        failed = engine.generate(prompt, SamplingParams(max_new_tokens=4, seed=2**40 + 5), timeout=120)
        ok = engine.generate(prompt, SamplingParams(max_new_tokens=4, seed=-7), timeout=120)
    finally:
        engine.stop()
    assert failed.finish_reason == "error" and not failed.tokens
    assert ok.finish_reason == "length" and len(ok.tokens) == 4
