"""A bounded load test of `fewtune serve` on 127.0.0.1: concurrent requests against one at a time.

    python benchmarks/serve_load.py [--run runs/demo] [--requests 200] [--concurrency 16] [--sequential 40]
                                    [--max-tokens 64] [--max-batch 16]

Starts `fewtune serve` on a free port in its own process (the run given, default runs/demo, which
`fewtune demo` trains; else the embedded default model), then sends the car-command test prompts
through the official `openai` client: first --sequential requests one after another, then
--requests requests from --concurrency threads at once. Greedy, up to --max-tokens new tokens.
Reports latency p50/p95, requests/s, completion tokens/s and errors (goal: none) for both, and
whether the concurrent answers equal the sequential ones for the prompts both sent.

Writes benchmarks/results/serve_load.md (hand notes below the marker are kept). Run it alone: a
second CPU-heavy process on this machine distorts every number.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _machine import cpu_kind, write_keeping_notes  # noqa: E402  (benchmarks/_machine.py)

ROOT = Path(__file__).resolve().parents[1]
TEST = ROOT / "src" / "fewtune" / "demo" / "data" / "car_commands_test.jsonl"
OUT = ROOT / "benchmarks" / "results" / "serve_load.md"
NOTES = "<!-- written by hand below this line; serve_load.py keeps it when it rewrites the results -->"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(target: str, port: int, max_batch: int) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from fewtune.cli import main; main()", "serve", target, "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if json.loads(r.read())["status"] == "ok":
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not answer /health within 10 minutes")


def one(client, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    try:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, temperature=0)
        return {"s": time.perf_counter() - start, "tokens": reply.usage.completion_tokens,
                "text": reply.choices[0].message.content, "error": None}
    except Exception as err:  # noqa: BLE001  counted, not fatal: the table reports errors
        return {"s": time.perf_counter() - start, "tokens": 0, "text": None, "error": f"{type(err).__name__}: {err}"}


def summary(name: str, results: list[dict], wall: float) -> str:
    ok = [r for r in results if r["error"] is None]
    lat = sorted(r["s"] for r in ok)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    tokens = sum(r["tokens"] for r in ok)
    return (f"| {name} | {len(results)} | {len(results) - len(ok)} | {statistics.median(lat) if lat else float('nan'):.2f} "
            f"| {pct(0.95):.2f} | {wall:.1f} | {len(ok) / wall:.2f} | {tokens / wall:.1f} |")


def main() -> None:
    import openai

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sequential", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()
    target = args.run if (Path(args.run) / "config.yaml").is_file() else "smollm2-135m-instruct"
    prompts = [json.loads(line)["prompt"] for line in TEST.read_text(encoding="utf-8").splitlines()]
    port = free_port()
    print(f"CPU: {cpu_kind()}; serving {target} on port {port}", flush=True)
    server = start_server(target, port, args.max_batch)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        one(client, model, prompts[0], args.max_tokens)  # warm-up
        start = time.perf_counter()
        sequential = [one(client, model, prompts[i % len(prompts)], args.max_tokens) for i in range(args.sequential)]
        seq_wall = time.perf_counter() - start
        print(f"sequential: {seq_wall:.1f} s", flush=True)
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            concurrent = list(pool.map(lambda i: one(client, model, prompts[i % len(prompts)], args.max_tokens),
                                       range(args.requests)))
        conc_wall = time.perf_counter() - start
        print(f"concurrent: {conc_wall:.1f} s", flush=True)
    finally:
        server.terminate()
        server.wait(60)
    same = sum(c["text"] == s["text"] for c, s in zip(concurrent, sequential) if s["error"] is None)
    both = min(len(concurrent), len(sequential))
    errors = sorted({r["error"] for r in sequential + concurrent if r["error"]})
    argv = " ".join(sys.argv[1:])
    lines = ["# `fewtune serve` under load", "",
             f"Command: `python benchmarks/serve_load.py{' ' + argv if argv else ''}`, {time.strftime('%Y-%m-%d')}.",
             f"Machine: {cpu_kind()}; {os.cpu_count()} logical CPUs; server and client on 127.0.0.1. Model: {target}; "
             f"car-command prompts, greedy, up to {args.max_tokens} new tokens; server --max-batch {args.max_batch}.", "",
             "| arm | requests | errors | latency p50 (s) | latency p95 (s) | wall (s) | requests/s | completion tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             summary("one at a time", sequential, seq_wall),
             summary(f"{args.concurrency} concurrent", concurrent, conc_wall), "",
             f"Concurrent answers equal to the sequential answers for the same prompt: {same} of {both}."]
    if errors:
        lines += ["", "Errors: " + "; ".join(errors[:5])]
    text = "\n".join(lines)
    write_keeping_notes(OUT, text, NOTES)
    print(text)


if __name__ == "__main__":
    main()
