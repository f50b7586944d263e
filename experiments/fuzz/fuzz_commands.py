"""Bad input against every command, as a user types it: each case of ``tests/bad_input_cases.py`` runs
as the real console command in a subprocess and gets a verdict; the table goes to ``cases.md`` beside
this file. (``tests/test_bad_input_commands.py`` runs the same cases in-process in the slow tier.)

    python experiments/fuzz/fuzz_commands.py              # every case (about 12 minutes on 2 cores)
    python experiments/fuzz/fuzz_commands.py --only pair  # the cases of one command

Beyond the in-process test, a subprocess shows what the user sees: the verdict counts a refusal as
``clean`` only when nothing printed a traceback and the output names what is wrong; a case that does
not finish in 120 s is a ``HANG``. Issue 23 wants no verdict in capitals.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))
import bad_input_cases as bic  # noqa: E402
from bad_input_cases import CASES, Case, last_error, verdict  # noqa: E402

COMMON = {a for base in (bic.TRAIN, bic.LOCAL, bic.SAMPLE, bic.SCORE, bic.BON, bic.EVAL, bic.EVAL_API, bic.EVAL_VADER,
                         bic.REPORT, bic.DASH, ["input={d}/s.jsonl", "output_dir={d}/p", "paths.log_dir={d}"])
          for a in base}  # fmt: skip
"""Arguments every case of a command shares; the table shows the rest."""


def shown(case: Case) -> str:
    """The arguments that make the case, and the files it writes."""
    args = " ".join(a for a in case.args if a not in COMMON)
    files = ", ".join(case.files)
    text = f"`{args}`" if args else ""
    return (f"{text} + {files}" if files else text).replace("|", "/")


def run_case(case: Case, folder: Path, env: dict[str, str]) -> tuple[Case, str, str]:
    folder.mkdir()
    env = dict(env, DPO_CACHE_DIR=str(folder / "cache"))
    cmd = [str(Path(sys.executable).parent / case.command), *case.argv(folder)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=folder)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        rc, out = None, ""
    v = verdict(case, rc, out)
    return case, v, last_error(out) if v != "ok" else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="one command's cases (e.g. pair, train)")
    parser.add_argument("--out", type=Path, default=HERE / "cases.md")
    parser.add_argument("--workers", type=int, default=2, help="cases run at once")
    args = parser.parse_args()
    cases = [c for c in CASES if args.only is None or c.command == f"dpo-{args.only}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.workers) as pool:
        futures = [pool.submit(run_case, c, Path(tmp) / f"case{i}", env) for i, c in enumerate(cases)]
        rows = []
        for future in futures:
            rows.append(future.result())
            case, v, _ = rows[-1]
            print(f"{case.command:14} {case.name:40} {v}", flush=True)
    counts = {v: sum(r[1] == v for r in rows) for v in ("clean", "ok", "TRACEBACK", "ACCEPTED", "UNNAMED", "REFUSED",
                                                        "HANG")}  # fmt: skip
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    head = f"`python experiments/fuzz/fuzz_commands.py` ({time.strftime('%Y-%m-%d')}, {len(rows)} cases, "
    lines = [f"# Bad input against every command\n\n{head}{time.time() - started:.0f} s): {summary}.\n",
             "| command | case | arguments (+ files) | input | verdict | what the user saw (last line) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {c.command} | {c.name} | {shown(c)} | {'bad' if c.bad else 'valid'} | {v} | {e} |"
              for c, v, e in rows]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(summary)


if __name__ == "__main__":
    main()
