"""Summarize a py-spy raw profile (`py-spy record -f raw`, as bench_serve.py --profile writes): samples per thread,
then each busy thread's heaviest frames by own time and by inclusive time. For `kiln serve` (sampled with
--subprocesses): how much of the engine process's time is the engine's step and how much the server's event loop
takes.

    python benchmarks/spy_summary.py serve_profile.txt [--top 25]
"""

from __future__ import annotations

import argparse
import collections


def load(path: str) -> list[tuple[list[str], int]]:
    """[(frames, outermost first; samples)] of a raw py-spy file (one 'frame;frame;... count' line per stack)."""
    stacks = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack and count.isdigit():
                stacks.append((_join_quoted(stack.split(";")), int(count)))
    return stacks


def _join_quoted(frames: list[str]) -> list[str]:
    """A process frame quotes its command line, which may hold ';' (the engine process's `-c "...; spawn_main(...)"`):
    glue the pieces of an open quote back together."""
    out: list[str] = []
    for frame in frames:
        if out and out[-1].count('"') % 2 == 1:
            out[-1] += ";" + frame
        else:
            out.append(frame)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    stacks = load(args.profile)
    threads: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    for frames, count in stacks:
        # With --subprocesses (both of kiln serve's processes) a stack starts with its process and those above it,
        # then its thread: the key is the innermost process (pid and the start of its command line) and the thread.
        procs = 0
        while procs < len(frames) - 1 and frames[procs].startswith("process "):
            procs += 1
        key = frames[procs] if procs == 0 else f"{frames[procs - 1][:70]} / {frames[procs]}"
        threads[key].append((frames[procs + 1:], count))
    total = sum(count for _, count in stacks)
    print(f"{total} samples")
    for thread, items in sorted(threads.items(), key=lambda kv: -sum(c for _, c in kv[1])):
        n = sum(count for _, count in items)
        print(f"\n== {thread}: {n} samples ({n / total:.0%})")
        own, inclusive = collections.Counter(), collections.Counter()
        for frames, count in items:
            if frames:
                own[frames[-1]] += count
            for frame in set(frames):
                inclusive[frame] += count
        print("  own time:")
        for frame, count in own.most_common(args.top):
            print(f"  {count:7d} {count / n:5.1%}  {frame[:150]}")
        print("  inclusive:")
        for frame, count in inclusive.most_common(args.top):
            print(f"  {count:7d} {count / n:5.1%}  {frame[:150]}")


if __name__ == "__main__":
    main()
