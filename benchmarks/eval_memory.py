"""Peak memory of ``cellfluxrl evaluate`` against the number of test pairs N.

    python benchmarks/eval_memory.py DATASET RUN [--n 100 800] [--steps 1]

Runs ``cellfluxrl evaluate`` once per N, each in a fresh Python process, and prints that process's
peak resident set size (``ru_maxrss``) and wall time. The evaluation accumulates features in
running mean/covariance sums and a fixed-size KID reservoir, so the peak should not grow with N
beyond noise; the sampler steps are cut (``--steps``) because generation cost does not change the
memory picture.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, resource, sys
from cellfluxrl.cli import cli
try:
    cli.main(args=sys.argv[1:], standalone_mode=False)
finally:
    print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(dataset: str, run: str, n: int, steps: int, out: str) -> tuple[float, float]:
    """Peak RSS (MiB) and wall seconds of one ``cellfluxrl evaluate`` at ``--n n``."""
    args = ["evaluate", "--data", dataset, run, "--n", str(n), "--steps", str(steps), "--best-of", "1,2",
            "--device", "cpu", "--out", out]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MAXRSS_KB")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"error: evaluate --n {n} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return int(lines[-1].split()[1]) / 1024, seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset")
    p.add_argument("run")
    p.add_argument("--n", type=int, nargs="+", default=[100, 800])
    p.add_argument("--steps", type=int, default=1)
    args = p.parse_args(argv)
    for n in args.n:
        with tempfile.TemporaryDirectory() as out:
            mib, seconds = peak_rss(args.dataset, args.run, n, args.steps, out)
            report = json.loads(open(f"{out}/report.json").read())
        print(json.dumps({"n": n, "pairs": report["settings"]["n"], "peak_rss_mib": round(mib, 1),
                          "seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
