"""The differential fuzzer at scale: many random models in user spellings, with its figures.

Runs ``tests/test_fuzz.py::test_user_code_compiles_correctly_or_is_refused`` with ``--n`` examples
(hypothesis, derandomized) and prints how many models were generated, compiled, refused (by
error type), attacked (compiled models checked twice: as built and after a weight edit) and how
many violated soundness (must be 0). The figures in docs/soundness.md come from:

    python benchmarks/fuzz.py --n 1500
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="models to generate (default: 500)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats.json"
        env = dict(os.environ, BCPC_FUZZ_STATS=str(stats), BCPC_FUZZ_EXAMPLES=str(args.n), HYPOTHESIS_PROFILE="ci")
        t0 = time.time()
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "tests/test_fuzz.py::test_user_code_compiles_correctly_or_is_refused"],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.time() - t0
        counts = json.loads(stats.read_text()) if stats.exists() else {}
    print(f"models generated: {counts.get('generated', 0)}")
    print(f"compiled:         {counts.get('compiled', 0)}")
    print(f"refused:          {counts.get('refused', 0)}")
    for key in sorted(k for k in counts if k.startswith("refused: ")):
        print(f"  {key[len('refused: '):]}: {counts[key]}")
    print(f"attacked:         {counts.get('attacked', 0)} (each compiled model twice: as built, after a weight edit)")
    print(f"violations:       {counts.get('violations', 0)}")
    print(f"wall time:        {seconds:.0f} s")
    if out.returncode != 0:
        print(out.stdout[-4000:], out.stderr[-2000:], sep="\n")
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
