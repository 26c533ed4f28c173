"""Load generator for `kiln serve`, after vLLM's benchmark_serving: Poisson arrivals at each request rate of a sweep,
random prompts (token ids) and output lengths drawn around set means, TTFT / ITL / TPOT / end-to-end latency (mean,
p50, p99) and throughput per rate, then the same workload offline through kiln.LLM.generate for the ratio, and the
engine's own time to first token for one prompt offline (prefill, plus the launch of the next step under async
scheduling: what the served TTFT at low load is compared with).

    python benchmarks/bench_serve.py --engine_dir E --num_prompts 200 --input_len 128 --output_len 128 \\
        --request_rate 1 4 16 inf [--range_ratio 0.5] [--output_json serve.json]
    python benchmarks/bench_serve.py --base_url http://127.0.0.1:8000 --model NAME ...   # a server already running

Without --base_url it starts `kiln serve` on a free port (extra flags through --serve_args "..."), stops it with
SIGTERM after the sweep, and then runs the offline pass in this process. The client is a minimal HTTP/1.0 SSE reader
on raw asyncio sockets, so that client-side parsing stays far below the server's per-token cost.

With --profile FILE the sweep still runs unprofiled, and one more pass of the first rate after it is sampled with
py-spy, reported on its own ("under py-spy": its row, and a step table beside the measured pass) and never counted in
the throughput or the ratio. py-spy's default mode stops every thread of the sampled processes for each sample, at a
cost that grows with their threads: a host-bound loop in a process of 1, 17, 33 and 49 threads ran 8%, 18%, 60% and
105% slower under `py-spy record -r 100 --threads` (2-core CPU), and a GPU engine process has one thread per core in
numpy's OpenBLAS pool alone besides CUDA's. That slows what the engine does on the host (eager prefill and mixed
steps, the serve loop) and hides in the waits of device-bound steps (CUDA-graph decodes), which fits the session-9
H100 run, whose measured pass was sampled (mixed steps 37.2 ms served vs 26.7 offline, graph decodes equal; the
prefix hits it blamed cost the host nothing: benchmarks/bench_prefix_admission.py). The profile pass samples with
--nonblocking (33 threads: 16% instead of 54% slower), which may tear a stack now and then.

Both passes report the engine's step stats (kiln/engine/step_stats.py): the engine's step() calls by kind (decode in
a CUDA graph, eager decode, prefill, mixed prefill + decode), their host time, sequences and prefill tokens, and the
host time between steps; served, from /metrics (kiln_engine_*_total) scraped before and after each rate's run. A
table puts each rate's beside the offline pass's; the JSON has them as "step_stats" of each rate and
"offline_step_stats".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field


@dataclass
class Result:
    """One request as the client saw it."""

    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def workload(args: argparse.Namespace, vocab: int, salt: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request, lengths uniform in [mean*(1-r), mean*(1+r)] as vLLM's random
    dataset; ids avoid the first 1000 (special tokens of most vocabularies). The lengths depend on --seed only, the
    tokens on --seed and `salt`: each pass of a run (the warm-up, every rate, the profiled pass) sends the same
    lengths with tokens of its own, so that no pass finds another's prompts in the server's prefix cache (the
    offline pass, in a fresh engine, gets salt 0 as the first rate does)."""
    lengths = random.Random(args.seed)
    tokens = random.Random(f"{args.seed}-{salt}")

    def length(mean: int) -> int:
        return max(1, lengths.randint(int(mean * (1 - args.range_ratio)), int(mean * (1 + args.range_ratio))))

    return [([tokens.randrange(1000, vocab) for _ in range(length(args.input_len))], length(args.output_len))
            for _ in range(args.num_prompts)]


async def one_request(host: str, port: int, model: str, prompt: list[int], max_tokens: int) -> Result:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}}).encode()
    start = time.perf_counter()
    result = Result(False, len(prompt))
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/completions HTTP/1.0\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            result.error = status.decode().strip() + " " + (await reader.read()).decode()[:200]
            return result
        last = None
        async for line in reader:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result.error = chunk["error"]["message"]
                return result
            now = time.perf_counter()
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                if last is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        writer.close()
        result.e2e = time.perf_counter() - start
        result.ok = result.output_tokens > 0
    except OSError as err:
        result.error = str(err)
    return result


async def run_rate(host: str, port: int, model: str, work: list[tuple[list[int], int]], rate: float,
                   max_concurrency: int | None, seed: int) -> tuple[list[Result], float]:
    """Send every request with exponential gaps of mean 1/rate (all at once for inf); return results and duration."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def limited(prompt: list[int], out: int) -> Result:
        if gate is None:
            return await one_request(host, port, model, prompt, out)
        async with gate:
            return await one_request(host, port, model, prompt, out)

    tasks = []
    start = time.perf_counter()
    for prompt, out in work:
        tasks.append(asyncio.create_task(limited(prompt, out)))
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def summarize(rate: float, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    itl = [x for r in ok for x in r.itl]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    ms = 1000.0
    row = {"request_rate": rate, "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
           "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
           "total_token_throughput": (out_tokens + sum(r.prompt_len for r in ok)) / duration}
    for name, values in (("ttft", [r.ttft for r in ok]), ("itl", itl), ("tpot", tpot), ("e2e", [r.e2e for r in ok])):
        row[f"mean_{name}_ms"] = sum(values) / len(values) * ms if values else float("nan")
        row[f"p50_{name}_ms"] = pct(values, 50) * ms
        row[f"p99_{name}_ms"] = pct(values, 99) * ms
    errors = [r.error for r in results if not r.ok][:3]
    if errors:
        row["errors"] = errors
    return row


def print_row(row: dict) -> None:
    print(f"rate {row['request_rate']:>6}: {row['completed']} ok, {row['failed']} failed in {row['duration_s']:.1f} s; "
          f"{row['request_throughput']:.2f} req/s, {row['output_throughput']:.0f} out tok/s | TTFT p50 "
          f"{row['p50_ttft_ms']:.1f} p99 {row['p99_ttft_ms']:.1f} ms | ITL p50 {row['p50_itl_ms']:.2f} p99 "
          f"{row['p99_itl_ms']:.2f} ms | TPOT p50 {row['p50_tpot_ms']:.2f} ms | E2E p50 {row['p50_e2e_ms']:.0f} "
          f"p99 {row['p99_e2e_ms']:.0f} ms", flush=True)
    for err in row.get("errors", []):
        print(f"    error: {err}")


# /metrics counters of the engine's StepStats (kiln/serve/metrics.py StepCounters) -> StepStats.summary()'s fields
STEP_COUNTERS = {"kiln_engine_steps_total": "steps", "kiln_engine_step_seconds_total": "seconds",
                 "kiln_engine_step_sequences_total": "seqs", "kiln_engine_step_prefill_tokens_total": "prefill_tokens"}
_KIND_SAMPLE = re.compile(r'^(kiln_engine_\w+_total)\{kind="(\w+)"\} (\S+)$')


def scrape_step_stats(host: str, port: int) -> dict | None:
    """The served engine's step stats from /metrics, in StepStats.summary()'s shape; None from a server without
    them or unreachable."""
    try:
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    except OSError:
        return None
    kinds: dict[str, dict[str, float]] = {}
    between = 0.0
    for line in text.splitlines():
        found = _KIND_SAMPLE.match(line)
        if found and found[1] in STEP_COUNTERS:
            kinds.setdefault(found[2], {})[STEP_COUNTERS[found[1]]] = float(found[3])
        elif line.startswith("kiln_engine_between_steps_seconds_total "):
            between = float(line.split()[1])
    if not kinds:
        return None
    return {"steps": sum(k.get("steps", 0) for k in kinds.values()),
            "seconds": sum(k.get("seconds", 0) for k in kinds.values()), "between_seconds": between, "kinds": kinds}


def settled_step_stats(host: str, port: int) -> dict | None:
    """Scrapes until two in a row agree (the engine sends its stats at once when it goes idle, at most every second
    while busy): the totals after the requests' last step."""
    last = scrape_step_stats(host, port)
    for _ in range(40):
        time.sleep(0.05)
        now = scrape_step_stats(host, port)
        if now == last:
            break
        last = now
    return last


def step_stats_delta(after: dict | None, before: dict | None) -> dict | None:
    """What the engine's steps did between two summaries."""
    if after is None or before is None:
        return None

    def sub(a: dict, b: dict) -> dict:
        return {k: (sub(v, b.get(k, {})) if isinstance(v, dict) else v - b.get(k, 0)) for k, v in a.items()}

    return sub(after, before)


def step_table(columns: list[tuple[str, dict, float]]) -> str:
    """(title, step stats, wall seconds of the pass) side by side: per kind the step() calls, mean host ms per call,
    total seconds, sequences and prefill tokens per call; then all calls, the time between calls, and the wall time
    (its rest: idle, or waiting for requests)."""
    kinds = [k for k in dict.fromkeys(k for c in columns for k in c[1]["kinds"])
             if any(c[1]["kinds"].get(k, {}).get("steps") for c in columns)]  # kinds that ran, in the engine's order
    head = f"{'':<14}" + "".join(f" | {title[:49]:^49}" for title, _, _ in columns)
    sub = f"{'kind':<14}" + f" | {'steps':>7} {'ms/step':>8} {'total s':>8} {'seqs/step':>10} {'pf tok/step':>12}" \
        * len(columns)
    lines = [head, sub]

    def cells(k: dict) -> str:
        n, seconds = k.get("steps", 0), k.get("seconds", 0)
        n_or_1 = n or 1
        return (f" | {n:>7.0f} {seconds / n_or_1 * 1000:>8.2f} {seconds:>8.2f} {k.get('seqs', 0) / n_or_1:>10.1f} "
                f"{k.get('prefill_tokens', 0) / n_or_1:>12.1f}")

    for kind in kinds:
        lines.append(f"{kind:<14}" + "".join(cells(c[1]["kinds"].get(kind, {})) for c in columns))
    total = [{name: sum(k.get(name, 0) for k in c[1]["kinds"].values()) for name in STEP_COUNTERS.values()}
             for c in columns]
    lines.append(f"{'all':<14}" + "".join(cells(t) for t in total))
    lines.append(f"{'between steps':<14}" + "".join(f" | {'':>16} {c[1]['between_seconds']:>8.2f} {'':>23}"
                                                     for c in columns))
    lines.append(f"{'wall':<14}" + "".join(f" | {'':>16} {c[2]:>8.2f} {'':>23}" for c in columns))
    return "\n".join(lines)


def offline(args: argparse.Namespace, work: list[tuple[list[int], int]], warmup: list[tuple[list[int], int]]) -> dict:
    """The same requests through kiln.LLM.generate at once (after a few of `warmup`'s: other tokens, so that the
    measured prompts find nothing in the prefix cache, as served), and the prefill time of one mean-length prompt."""
    import kiln

    llm = kiln.LLM(args.engine_dir, device=args.device)
    params = [kiln.SamplingParams(max_tokens=out, temperature=0, ignore_eos=True) for _, out in work]
    llm.generate([p for p, _ in warmup[:4]], params[:4])  # warm-up (kernels, graphs)
    llm.engine.step_stats.reset()
    start = time.perf_counter()
    results = llm.generate([p for p, _ in work], params)
    duration = time.perf_counter() - start
    step_stats = llm.engine.step_stats.summary()
    tokens = sum(len(r.outputs[0].token_ids) for r in results)
    prompt = work[0][0][:args.input_len]
    first = kiln.SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    times = []
    for _ in range(5):  # the engine's own time to first token: prefill (and, with async scheduling, the next launch)
        t = time.perf_counter()
        stream = llm.stream([prompt], first)
        next(iter(stream))
        times.append(time.perf_counter() - t)
        stream.close()  # aborts the rest
    llm.close()
    return {"offline_duration_s": duration, "offline_output_throughput": tokens / duration,
            "prefill_ms_p50": pct(times, 50) * 1000, "prefill_prompt_len": len(prompt),
            "offline_step_stats": step_stats}


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "kiln", "serve", "--engine_dir", args.engine_dir, "--port", str(port),
           "--served_model_name", "bench", "--max_queue", str(10 * args.num_prompts + 100), "--log_level", "warning",
           *(["--device", args.device] if args.device else []), *shlex.split(args.serve_args)]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"kiln serve exited with {proc.returncode} before it was ready")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("kiln serve did not become ready in time (--startup_timeout)")


def start_profile(pid: int, path: str) -> subprocess.Popen | None:
    """py-spy sampling every thread of the server and of its engine process at 100 Hz (--idle off: only running
    stacks), without stopping them for each sample (--nonblocking: stopping every thread is what slows them)."""
    import shutil

    exe = shutil.which("py-spy")
    if exe is None:
        print("--profile: py-spy is not on PATH; no profile is taken", flush=True)
        return None
    return subprocess.Popen([exe, "record", "-p", str(pid), "-o", path, "-f", "raw", "-r", "100", "--threads",
                             "--subprocesses", "--nonblocking"],  # the engine runs in a child process of kiln serve
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine_dir", help="engine to serve (and to run offline for the ratio)")
    p.add_argument("--base_url", help="bench a server already running here instead (no offline pass)")
    p.add_argument("--model", default="bench", help="model name to send with --base_url")
    p.add_argument("--num_prompts", type=int, default=200)
    p.add_argument("--input_len", type=int, default=128)
    p.add_argument("--output_len", type=int, default=128)
    p.add_argument("--range_ratio", type=float, default=0.0, help="lengths uniform in mean*(1-r)..mean*(1+r)")
    p.add_argument("--request_rate", nargs="+", default=["inf"], help="requests/s per run of the sweep; inf: all at "
                                                                       "once")
    p.add_argument("--max_concurrency", type=int, default=None)
    p.add_argument("--warmup_prompts", type=int, default=2, help="requests of the workload sent at once before the "
                   "sweep, unmeasured: kernels a step shape compiles the first time it is seen, CUDA graph and "
                   "allocator warm-up (the offline pass runs after the server, with Triton's disk cache warm; a "
                   "warm-up of the whole workload, --warmup_prompts = --num_prompts, measures both sides warm)")
    p.add_argument("--vocab_size", type=int, default=None, help="with --base_url: the model's vocabulary size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--serve_args", default="", help="more flags for kiln serve, one string")
    p.add_argument("--skip_offline", action="store_true")
    p.add_argument("--profile", metavar="FILE", help="after the sweep, run its first rate once more with py-spy (on "
                   "PATH) sampling the server and write its raw stacks here (benchmarks/spy_summary.py reads them): "
                   "where its Python time goes. That pass is reported apart and never counted: py-spy slows the "
                   "host-bound steps it samples")
    p.add_argument("--startup_timeout", type=float, default=600)
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    if not (args.engine_dir or args.base_url):
        p.error("give --engine_dir (start a server) or --base_url (use a running one)")
    return args


def print_step_tables(rows: list[dict], report: dict) -> None:
    """One table per rate: the served engine's steps beside the offline pass's (either alone when the other is
    missing: --skip_offline, a server without the counters)."""
    offline_stats = report.get("offline_step_stats")
    first = [("offline LLM.generate", offline_stats, report["offline_duration_s"])] if offline_stats else []
    served = [(f"served, rate {row['request_rate']}", row["step_stats"], row["duration_s"])
              for row in rows if row.get("step_stats")]
    for column in served or [None]:
        columns = first + ([column] if column else [])
        if columns:
            print("\nengine step() calls by the kind of model step each launched (host wall time, no device sync):")
            print(step_table(columns))
    profiled = report.get("profiled_rate")
    if profiled and profiled.get("step_stats") and served:
        print("\nthe same pass under py-spy (the profile's run; py-spy's cost is the difference, not counted above):")
        print(step_table([served[0], (f"served, rate {profiled['request_rate']}, under py-spy",
                                      profiled["step_stats"], profiled["duration_s"])]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engine_dir:
        config = json.load(open(os.path.join(args.engine_dir, "config.json")))
        vocab = args.vocab_size or config["vocab_size"]
    else:
        vocab = args.vocab_size or 32000
    work = workload(args, int(vocab))
    proc = None
    if args.base_url:
        host, port = args.base_url.removeprefix("http://").rstrip("/").split(":")
        model = args.model
    else:
        proc, port, host, model = *start_server(args), "127.0.0.1", "bench"
    rows = []
    profiled = None
    spy = None

    def measure(rate: float, salt: int) -> dict:
        before = settled_step_stats(host, int(port))
        results, duration = asyncio.run(run_rate(host, int(port), model, workload(args, int(vocab), salt), rate,
                                                 args.max_concurrency, args.seed))
        row = summarize(rate, results, duration)
        row["step_stats"] = step_stats_delta(settled_step_stats(host, int(port)), before)
        return row

    try:
        warmup = workload(args, int(vocab), salt=-1)[:max(1, args.warmup_prompts)]
        asyncio.run(run_rate(host, int(port), model, warmup, float("inf"), None, args.seed))
        for salt, rate in enumerate(float(r) for r in args.request_rate):
            rows.append(measure(rate, salt))
            print_row(rows[-1])
        if args.profile and proc is not None:
            # Its own pass, after the measured ones: py-spy stops the processes for each sample.
            spy = start_profile(proc.pid, args.profile)
            if spy is not None:
                profiled = measure(float(args.request_rate[0]), len(args.request_rate))
                print("under py-spy (not counted): ", end="")
                print_row(profiled)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(timeout=60)
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            print(f"kiln serve exited with {proc.wait(timeout=120)}")
    report = {"args": vars(args), "rates": rows}
    if profiled is not None:
        report["profiled_rate"] = profiled
    if args.engine_dir and not args.skip_offline:
        report.update(offline(args, work, workload(args, int(vocab), salt=-1)))
        best = max(r["output_throughput"] for r in rows)
        report["serve_over_offline"] = best / report["offline_output_throughput"]
        low = rows[0]
        print(f"offline LLM.generate: {report['offline_output_throughput']:.0f} out tok/s; best served "
              f"{best:.0f} = {report['serve_over_offline']:.1%} of offline. Offline first token of "
              f"{report['prefill_prompt_len']} tokens {report['prefill_ms_p50']:.1f} ms vs served TTFT p50 "
              f"{low['p50_ttft_ms']:.1f} ms at rate "
              f"{low['request_rate']} (+{low['p50_ttft_ms'] - report['prefill_ms_p50']:.1f} ms)")
    print_step_tables(rows, report)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
