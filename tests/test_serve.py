"""fewtune serve: a real server on 127.0.0.1 with two tiny LoRA runs on one base, called with the official
`openai` client (chat, streaming, completions, errors, the two adapters) and raw HTTP where the wire format
itself is the point."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fewtune.config import GenerateSection  # noqa: E402
from fewtune.data.formats import Message  # noqa: E402
from fewtune.generate import generate, load_for_inference, prompt_ids  # noqa: E402
from fewtune.serve.api import create_app  # noqa: E402
from fewtune.serve.engine import Batcher, load_models, parse_targets, ServeError  # noqa: E402
from fewtune.train.loop import train  # noqa: E402

KEY = "test-key"


def post(url: str, body: bytes | dict, key: str | None = None, timeout: float = 60):
    """(status, response object or HTTPError) of a raw POST: the wire format itself, no client library."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
        return response.status, response
    except urllib.error.HTTPError as err:
        return err.code, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread, stopped the way SIGINT stops it (should_exit: in-flight requests finish)."""

    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("the test server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    """Two LoRA runs of the tiny Llama, trained on different data (so their adapters differ)."""
    from fewtune.config import build_config
    from tests.conftest import write_jsonl

    out = {}
    root = tmp_path_factory.mktemp("serve-runs")
    for name, word in (("alpha", "打开车窗"), ("beta", "关闭空调")):
        data = write_jsonl(root / f"{name}.jsonl", [{"prompt": f"{word} {i}", "completion": f"{word} ok {i}"}
                                                   for i in range(16)])
        cfg = build_config({"model": {"name": tiny_models["llama"]},
                            "data": {"train": str(data), "val_ratio": 0.0, "max_length": 64},
                            "method": {"name": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                            "train": {"output_dir": str(root / name), "max_steps": 3, "batch_size": 4, "lr": 5e-2,
                                      "warmup_ratio": 0.0, "seed": 1, "adapt_threads": False,
                                      "mixed_precision": "no"}})
        train(cfg, root / name)
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def models(runs):
    return load_models([f"alpha={runs['alpha']}", f"beta={runs['beta']}"], precision="no")


@pytest.fixture(scope="module")
def server(models):
    app = create_app(models, api_key=KEY, batcher=Batcher(window_s=0.2))
    with Server(app) as s:
        s.app = app
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def expected(run: str, text: str, **gen) -> str:
    """What fewtune generate answers, the run loaded as the server loads a shared base (adapter unmerged)."""
    loaded = load_for_inference(run, merge=False, precision="no")
    return generate(loaded, [[Message("user", text)]], GenerateSection(**gen), progress=False)[0][0]


def test_two_runs_share_one_base_and_are_listed(client, models):
    assert models["alpha"].loaded.model is models["beta"].loaded.model  # one copy of the base weights
    assert {m.id for m in client.models.list().data} == {"alpha", "beta"}


def test_chat_answers_as_fewtune_generate_with_the_runs_template_and_real_usage(client, models, runs):
    for name in ("alpha", "beta"):  # the request's model field picks the adapter
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "打开车窗 3"}],
                                               max_tokens=12, temperature=0)
        assert reply.choices[0].message.content == expected(runs[name], "打开车窗 3", max_new_tokens=12)
        ids = prompt_ids(models[name].loaded, [Message("user", "打开车窗 3")])
        assert reply.usage.prompt_tokens == len(ids)
        assert 0 < reply.usage.completion_tokens <= 12
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        assert reply.choices[0].finish_reason in ("stop", "length")
    short = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hello there"}],
                                           max_tokens=2, temperature=0)
    if short.choices[0].finish_reason == "length":
        assert short.usage.completion_tokens == 2


def test_streaming_chunks_follow_openai_and_add_up_to_the_answer(client):
    messages = [{"role": "user", "content": "关闭空调 5"}]
    whole = client.chat.completions.create(model="beta", messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="beta", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_stream_ends_with_done_on_the_wire(server):
    body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    status, r = post(server.url + "/v1/chat/completions", body, KEY)
    assert status == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [line.decode().strip() for line in r if line.strip()]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_completions_with_several_prompts_and_n(client):
    reply = client.completions.create(model="alpha", prompt=["打开车窗 1", "关闭空调 2"], n=2, max_tokens=6,
                                      temperature=0.9, top_p=0.9, seed=7)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    again = client.completions.create(model="alpha", prompt=["打开车窗 1", "关闭空调 2"], n=2, max_tokens=6,
                                      temperature=0.9, top_p=0.9, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]  # same seed, same samples
    assert reply.usage.completion_tokens == again.usage.completion_tokens > 0


def test_streamed_completions_add_up_per_prompt(client):
    prompts = ["打开车窗 1", "关闭空调 2"]
    whole = client.completions.create(model="beta", prompt=prompts, max_tokens=10, temperature=0)
    parts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in client.completions.create(model="beta", prompt=prompts, max_tokens=10, temperature=0, stream=True):
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert parts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}


def test_errors_have_openais_shape_and_status(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}], temperature=5)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "字 " * 3000}])
    assert "maximum context length is 1024" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # never fetched: nothing listens on that port
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}]}])
    assert "text only" in err.value.body["message"]
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    status, r = post(server.url + "/v1/chat/completions", b"{not json", KEY)
    assert status == 400 and "not valid JSON" in json.loads(r.read())["error"]["message"]
    health = urllib.request.urlopen(server.url + "/health", timeout=30)  # no key needed
    assert json.loads(health.read())["status"] == "ok"


def test_concurrent_requests_are_batched(client, server):
    before = len(server.app.state.batcher.batches)
    results = [None] * 6

    def ask(i: int) -> None:
        results[i] = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": f"打开车窗 {i}"}],
                                                    max_tokens=5, temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None for r in results)
    sizes = server.app.state.batcher.batches[before:]
    assert sum(sizes) == 6 and max(sizes) > 1


class HeldBatcher(Batcher):
    """A worker that waits for a signal before each generation: lets a test fill the queue or stop the server
    while a request is in flight."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.release = threading.Event()
        self.started_one = threading.Event()

    def _generate(self, group):
        self.started_one.set()
        self.release.wait(60)
        super()._generate(group)


def test_overload_answers_429_and_shutdown_finishes_in_flight_requests(models):
    batcher = HeldBatcher(max_queue=1, window_s=0.0)
    app = create_app(models, batcher=batcher)
    server = Server(app)
    client_results: dict[int, object] = {}

    def ask(i: int) -> None:
        try:
            client_results[i] = post(server.url + "/v1/chat/completions", {
                "model": "alpha", "messages": [{"role": "user", "content": f"打开车窗 {i}"}], "max_tokens": 3})[0]
        except OSError as err:  # reported by the assertion below
            client_results[i] = err

    with server:
        first = threading.Thread(target=ask, args=(0,))
        first.start()
        assert batcher.started_one.wait(30)  # request 0 is being generated (held)
        second = threading.Thread(target=ask, args=(1,))
        second.start()
        for _ in range(100):  # request 1 waits in the queue (size 1)
            if batcher.queue.qsize() == 1:
                break
            time.sleep(0.05)
        status, r = post(server.url + "/v1/chat/completions", {
            "model": "alpha", "messages": [{"role": "user", "content": "one too many"}], "max_tokens": 3})
        assert status == 429 and json.loads(r.read())["error"]["code"] == "queue_full"
        server.server.should_exit = True  # what SIGINT/SIGTERM do: stop accepting, finish what is in flight
        time.sleep(0.3)
        batcher.release.set()
        first.join(60)
        second.join(60)
    assert client_results == {0: 200, 1: 200}


def test_target_names(tmp_path):
    assert parse_targets(["a=runs/x", "runs/y/"]) == [("a", "runs/x"), ("y", "runs/y/")]
    with pytest.raises(ServeError, match="name them"):
        parse_targets(["runs/x", "other/x"])


def test_serve_command_refuses_a_missing_run(tmp_path):
    from typer.testing import CliRunner

    from fewtune.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "nothing" in result.output
