"""Analysis speed: time of `hvtsm.analysis.analyze` per 1,000 lines of real-looking Python.

The input is hvtsm's own source (plus the analysis samples) concatenated into one module of
about --lines lines, written to a temporary file, so reading, parsing, import resolution
and every rule are in the figure. Shell (a deploy script repeated) and an ELF binary
(/usr/bin/python3) are timed the same way for reference.

Run: python3 bench/analysis_speed.py [--lines 10000] [--repeats 30]    (no root needed)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import progress, summary

from hvtsm.analysis import analyze

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "tests" / "analysis_samples"


def python_corpus(lines: int) -> str:
    sources = sorted((ROOT / "hvtsm").rglob("*.py")) + sorted(
        p for p in SAMPLES.glob("*.py") if p.name != "broken.py")
    out: list[str] = []
    while len(out) < lines:
        for path in sources:
            # a __future__ import is only legal at the top of a module
            out += [ln for ln in path.read_text().splitlines()
                    if not ln.startswith("from __future__")]
            if len(out) >= lines:
                break
    return "\n".join(out) + "\n"


def time_per_kline(path: Path, lines: int, repeats: int, label: str) -> list[float]:
    per_kline: list[float] = []
    for i in range(repeats):
        progress(f"{label}: {i + 1}/{repeats}")
        start = time.perf_counter()
        analyze(path)
        per_kline.append((time.perf_counter() - start) * 1000 * 1000 / lines)
    progress("")
    return per_kline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hvtsm-bench-") as tmp:
        py = Path(tmp) / "corpus.py"
        text = python_corpus(args.lines)
        py.write_text(text)
        n_py = text.count("\n")
        report = analyze(py)
        print(f"python corpus: {n_py} lines, {len(report.segments)} segments, "
              f"{sum(len(s.reasons) for s in report.segments)} reasons")
        print(summary("python, ms per 1,000 lines",
                      time_per_kline(py, n_py, args.repeats, "python")))

        sh = Path(tmp) / "corpus.sh"
        script = (SAMPLES / "deploy.sh").read_text()
        sh.write_text(script * max(1, args.lines // script.count("\n")))
        n_sh = sh.read_text().count("\n")
        print(summary(f"shell ({n_sh} lines), ms per 1,000 lines",
                      time_per_kline(sh, n_sh, args.repeats, "shell")))

    elf = Path(os.path.realpath("/usr/bin/python3"))
    times: list[float] = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        analyze(elf)
        times.append((time.perf_counter() - start) * 1000)
    print(summary(f"ELF {elf} ({elf.stat().st_size // 1024} KiB), ms per binary", times))


if __name__ == "__main__":
    main()
