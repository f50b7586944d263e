"""Bad input against every command, as a user types it: each case runs the real console command in a
subprocess and gets a verdict; the table goes to ``cases.md`` beside this file.

    python experiments/fuzz/fuzz_commands.py              # every case (a few minutes on 2 cores)
    python experiments/fuzz/fuzz_commands.py --only pair  # the cases of one command

Verdicts of a bad input: ``clean`` (non-zero exit, no traceback, the error names what is wrong),
``TRACEBACK`` (a raw library or Python traceback), ``ACCEPTED`` (exit 0: a silent misread), ``HANG``
(no answer in 120 s). Of a valid input: ``ok`` or ``REFUSED``. Issue 23 wants 0 of the capitals.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass
class Case:
    """One command line. ``args`` may hold ``{d}``, the case's own folder, where ``files`` are written
    first (a list is written as JSONL rows; bytes as they are)."""

    command: str
    name: str
    args: list[str]
    files: dict[str, bytes | list] = field(default_factory=dict)
    bad: bool = True  # a bad input (must be refused) or a valid one (must run)
    names: str = ""  # a regex the output must match when refused (what the error names)

    def argv(self, folder: Path) -> list[str]:
        for name, content in self.files.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, list):
                content = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in content).encode()
            path.write_bytes(content)
        return [a.replace("{d}", str(folder)) for a in self.args]


GOOD = {"prompt": "Review it:", "completions": [" A warm film.", " Dull."], "rewards": [0.8, -0.2]}
TRAIN = ["experiment=tiny", "debug=fast", "data.source.max_rows=32", "callbacks.samples=null", "paths.log_dir={d}"]
PPO = [*TRAIN, "system=ppo", "system.minibatch_size=2"]
SAMPLE = ["model.pretrained=unused", "prompts.file={d}/p.txt", "paths.log_dir={d}"]
PROMPTS = {"p.txt": b"Review it:\n"}
LOCAL = ["data=local", "data.source.splits.train={d}/t.jsonl", "data.source.splits.val={d}/t.jsonl",
         "data.max_length=64", "data.max_prompt_length=32"]
SAME = [{"prompt": f"p{i}", "chosen": " a", "rejected": " a"} for i in range(40)]
EVAL_ANY = ["data=reviews", "template=positive", "completions={d}/c.jsonl", "paths.log_dir={d}"]
EVAL, EVAL_API = [*EVAL_ANY, "judge=reward"], [*EVAL_ANY, "judge=api", "judge.api_key_env=K"]


def pair(name: str, rows: list, names: str = "", *extra: str, bad: bool = True) -> Case:
    return Case("dpo-pair", name, ["input={d}/s.jsonl", "output_dir={d}/p", *extra], {"s.jsonl": rows}, bad, names)


def train(name: str, names: str, *extra: str, files: dict | None = None, bad: bool = True, base=TRAIN) -> Case:
    return Case("dpo-train", name, [*base, *extra], files or {}, bad, names)


CASES: list[Case] = [
    train("run_name empty", "run_name", "run_name="),
    train("run_name ../../x", "run_name", "run_name=../../x"),
    train("16-mixed on CPU", "16-mixed", "trainer.precision=16-mixed"),
    train("unknown precision", "precision", "trainer.precision=bf17"),
    train("gpu without CUDA", "accelerator", "trainer=gpu"),
    train("bf16-mixed trains", "", "trainer.precision=bf16-mixed", bad=False),
    train("ppo clip_range -1", "clip_range", "system.clip_range=-1", base=PPO),
    train("ppo vf_coef -1", "vf_coef", "system.vf_coef=-1", base=PPO),
    train("ppo clip_range_value 0", "clip_range_value", "system.clip_range_value=0", base=PPO),
    train("ppo max_steps 1", "max_steps", "trainer.max_steps=1", base=PPO),
    train("ppo temperature -1", "temperature", "system.generation.temperature=-1", base=PPO),
    train("rm center_weight -1", "center_weight", "system=reward_model", "system.center_weight=-1"),
    train("lr -1", "lr", "optim.optimizer.lr=-1"),
    train("warmup -5", "warmup", "optim.warmup_steps=-5"),
    train("beta abc", "beta", "loss.beta=abc"),
    train("batch_size 0", "batch_size", "data.batch_size=0"),
    train("max_length 0", "max_length", "data.max_length=0"),
    train("ckpt_path missing", "ckpt_path", "ckpt_path={d}/no.ckpt"),
    train("ckpt_path a text file", "checkpoint", "ckpt_path={d}/x.ckpt", files={"x.ckpt": b"hello"}),
    train("fsdp tensor_parallel 2", "tensor_parallel", "trainer=fsdp_cpu", "data.batch_size=4",
          "trainer.strategy.tensor_parallel_size=2"),
    train("fsdp data_parallel 3", "data_parallel", "trainer=fsdp_cpu", "data.batch_size=4",
          "trainer.strategy.data_parallel_size=3"),
    train("identical pairs", "same chosen and rejected", *LOCAL,
          files={"t.jsonl": SAME}),
    train("binary data file", "t.jsonl", *LOCAL,
          files={"t.jsonl": bytes(range(256))}),
    train("unknown key", "nonsense", "+loss.nonsense=1"),
    Case("dpo-sample", "max_prompts 0", [*SAMPLE, "prompts.max_prompts=0"], PROMPTS, names="max_prompts"),
    Case("dpo-sample", "max_prompts -1", [*SAMPLE, "prompts.max_prompts=-1"], PROMPTS, names="max_prompts"),
    Case("dpo-sample", "temperature -1", [*SAMPLE, "generation.temperature=-1"], PROMPTS, names="temperature"),
    Case("dpo-sample", "top_p 2", [*SAMPLE, "generation.top_p=2"], PROMPTS, names="top_p"),
    Case("dpo-sample", "top_k -3", [*SAMPLE, "generation.top_k=-3"], PROMPTS, names="top_k"),
    Case("dpo-sample", "max_new_tokens 0", [*SAMPLE, "generation.max_new_tokens=0"], PROMPTS, names="max_new_tokens"),
    Case("dpo-sample", "n 0", [*SAMPLE, "n=0"], PROMPTS, names="n must"),
    Case("dpo-sample", "binary prompts file", SAMPLE, {"p.txt": bytes(range(256))}, names="p.txt"),
    Case("dpo-sample", "missing prompts file", SAMPLE, names="p.txt"),
    Case("dpo-sample", "no prompt in the file", SAMPLE, {"p.txt": b"   \n"}, names="p.txt: no prompts"),
    Case("dpo-score", "missing input", ["input={d}/s.jsonl", "paths.log_dir={d}"], names="s.jsonl"),
    Case("dpo-score", "malformed input", ["input={d}/s.jsonl", "paths.log_dir={d}"], {"s.jsonl": ["{not json"]},
         names="s.jsonl:1"),
    Case("dpo-score", "binary input", ["input={d}/s.jsonl", "paths.log_dir={d}"], {"s.jsonl": b"\x80\xff"},
         names="UTF-8"),
    Case("dpo-score", "completions not a list", ["input={d}/s.jsonl", "paths.log_dir={d}"],
         {"s.jsonl": [{"prompt": "p", "completions": "x"}]}, names="s.jsonl:1"),
    Case("dpo-score", "unknown reward", ["input={d}/s.jsonl", "reward.name=nope", "paths.log_dir={d}"],
         {"s.jsonl": [GOOD]}, names="nope"),
    pair("Infinity reward", ['{"prompt": "a", "completions": ["x", "y"], "rewards": [Infinity, 0]}'], "finite"),
    pair("NaN reward", ['{"prompt": "a", "completions": ["x", "y"], "rewards": [NaN, 0]}'], "finite"),
    pair("bool reward", ['{"prompt": "a", "completions": ["x", "y"], "rewards": [true, 0]}'], "finite"),
    pair("missing rewards", ['{"prompt": "a", "completions": ["x", "y"]}'], "rewards"),
    pair("length mismatch", ['{"prompt": "a", "completions": ["x", "y"], "rewards": [1]}'], "2 completions"),
    pair("identical completions", [{"prompt": "a", "completions": ["x", "x"], "rewards": [1, 0]}], "identical"),
    pair("min_margin -1", [GOOD], "min_margin", "min_margin=-1"),
    pair("val_fraction 1.5", [GOOD], "val_fraction", "val_fraction=1.5"),
    pair("ties first", [GOOD], "ties", "ties=first"),
    pair("valid", [GOOD], bad=False),
    pair("U+2028 in a completion", [{**GOOD, "completions": [" A\u2028film.", " Dull."]}], bad=False),
    pair("CRLF and a BOM", [b"\xef\xbb\xbf".decode() + json.dumps(GOOD) + "\r"], bad=False),
    Case("dpo-best-of-n", "NaN reward", ["input={d}/s.jsonl", "ns=[1]", "paths.log_dir={d}"],
         {"s.jsonl": ['{"prompt": "a", "completions": ["x"], "rewards": [NaN]}']}, names="finite"),
    Case("dpo-best-of-n", "ns [0]", ["input={d}/s.jsonl", "ns=[0]", "paths.log_dir={d}"], {"s.jsonl": [GOOD]},
         names="ns"),
    Case("dpo-best-of-n", "ns beyond samples", ["input={d}/s.jsonl", "ns=[8]", "paths.log_dir={d}"],
         {"s.jsonl": [GOOD]}, names="8"),
    *[Case("dpo-eval", f"api {o}", [*EVAL_API, o], names=o.split("=")[0].split(".")[-1])
      for o in ("judge.base_url=localhost:8000/v1", "judge.timeout_s=0", "judge.max_retries=-1",
                "judge.max_concurrency=0", "judge.max_run_s=-1", "judge.orders=sideways", "judge.max_tokens=0")],
    Case("dpo-eval", "api key typed as its variable", [*EVAL_API, "judge.api_key_env=sk-live-0123456789"],
         names="api_key_env"),
    Case("dpo-eval", "n_prompts 0", [*EVAL, "n_prompts=0"], names="n_prompts"),
    Case("dpo-eval", "negative temperature", [*EVAL, "temperatures=[-1]"], names="temperatures"),
    Case("dpo-eval", "malformed completions", EVAL, {"c.jsonl": ["{oops"]}, names="c.jsonl:1"),
    Case("dpo-report", "missing folder", ["{d}/none"], names="no such folder"),
    Case("dpo-report", "malformed metrics.csv", ["{d}/r", "--out", "{d}/f"],
         {"r/csv/metrics.csv": b"step,train/loss\n0,oops\n"}, names="metrics.csv:2"),
    Case("dpo-report", "torn eval.jsonl", ["{d}/e", "--out", "{d}/f"], {"e/eval.jsonl": b'{"kl": 0.1, "reward"'},
         names="eval.jsonl:1"),
    Case("dpo-report", "binary results.jsonl", ["{d}/w", "--out", "{d}/f"], {"w/results.jsonl": b"\xff\xfe"},
         names="results.jsonl"),
    Case("dpo-dashboard", "unknown key", ["colour=red"], names="colour"),
    Case("dpo-dashboard", "malformed spec", ["spec={d}/s.json", "publish=true"], {"s.json": b"{"}, names="s.json"),
    Case("dpo-dashboard", "missing spec", ["spec={d}/none.json", "publish=true"], names="none.json"),
]


def verdict(case: Case, rc: int | None, out: str) -> str:
    if rc is None:
        return "HANG"
    if not case.bad:
        return "ok" if rc == 0 else "REFUSED"
    if rc == 0:
        return "ACCEPTED"
    if "Traceback (most recent call last)" in out:
        return "TRACEBACK"
    return "clean" if re.search(case.names, out) else "UNNAMED"


def last_error(out: str) -> str:
    lines = [x for x in out.strip().splitlines() if x.strip() and not x.startswith(("wandb:", "  warnings.warn"))]
    line = lines[-1] if lines else ""
    return line.split("] - ", 1)[-1][:150].replace("|", "/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="one command's cases (e.g. pair, train)")
    parser.add_argument("--out", type=Path, default=HERE / "cases.md")
    args = parser.parse_args()
    cases = [c for c in CASES if args.only is None or c.command == f"dpo-{args.only}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    rows, started = [], time.time()
    bindir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases):
            folder = Path(tmp) / f"case{i}"
            folder.mkdir()
            env["DPO_CACHE_DIR"] = str(folder / "cache")
            cmd = [str(bindir / case.command), *case.argv(folder)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=folder)
                rc, out = proc.returncode, proc.stdout + proc.stderr
            except subprocess.TimeoutExpired:
                rc, out = None, ""
            v = verdict(case, rc, out)
            rows.append((case, v, last_error(out) if v != "ok" else ""))
            print(f"{case.command:14} {case.name:32} {v}", flush=True)
    counts = {v: sum(r[1] == v for r in rows) for v in ("clean", "ok", "TRACEBACK", "ACCEPTED", "UNNAMED", "REFUSED",
                                                        "HANG")}  # fmt: skip
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    head = f"`python experiments/fuzz/fuzz_commands.py` ({time.strftime('%Y-%m-%d')}, {len(rows)} cases, "
    lines = [f"# Bad input against every command\n\n{head}{time.time() - started:.0f} s): {summary}.\n",
             "| command | case | input | verdict | what the user saw (last line) |", "|---|---|---|---|---|"]
    lines += [f"| {c.command} | {c.name} | {'bad' if c.bad else 'valid'} | {v} | {e} |" for c, v, e in rows]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(summary)


if __name__ == "__main__":
    main()
