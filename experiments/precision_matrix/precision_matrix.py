"""The precision-and-strategy matrix: every training system with each reference it takes, under the
GPU users' trainer configs forced onto the CPU, in three precisions, with both optimizers.

    python experiments/precision_matrix/precision_matrix.py              # the full product -> results.md
    python experiments/precision_matrix/precision_matrix.py --pairwise   # the covering set (tests/ runs it)

Factors (each read from the code, so a system, reference or trainer added later joins the matrix):

* system x reference: :data:`dpo.systems.SYSTEMS`, each with the ``reference.kind`` choices it takes
  (``references=None``: the loss decides, so every kind of :data:`dpo.systems.reference.REFERENCES`, with
  ``reference=none`` trained by a reference-free loss; ``()``: it takes none);
* trainer: ``trainer=gpu``, ``ddp`` and ``fsdp`` (what a GPU user types) with
  ``trainer.accelerator=cpu``; the multi-process ones on 2 processes (gloo). The other
  conf/trainer files are these with the accelerator already CPU (``cpu``, ``default``,
  ``ddp_cpu``, ``fsdp_cpu``): :data:`SAME_AS` says which.
* precision: ``32-true``, ``bf16-mixed``, ``bf16-true``;
* optimizer: ``optim=adamw`` (fused, the default) and ``optim=rmsprop`` (the paper's).

Each combination runs `dpo-train` on a tiny model for 3 optimizer steps (global batch 4; one
process accumulates 2 micro-batches, two processes take 2 each) and passes when it finishes with
finite losses, its trainable weights moved, its frozen ones (the reference, LoRA's base weights)
bit-identical, and the trained weights in the precision's dtype; or when it is refused before
any weights load with a one-line reason (PPO under FSDP2).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import lightning.pytorch as pl
import torch

HERE = Path(__file__).resolve().parent
TRAINERS = ("gpu", "ddp", "fsdp")
SAME_AS = {"cpu": "gpu", "default": "gpu", "ddp_cpu": "ddp", "fsdp_cpu": "fsdp"}
"""conf/trainer files that equal a matrix trainer once the accelerator is the CPU (precision is a factor)."""
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
OPTIMIZERS = ("adamw", "rmsprop")
REFERENCE_FREE_LOSS = "simpo"  # trains the DPO system with reference=none
TINY = [
    "experiment=tiny", "model.architecture.n_layer=1", "model.architecture.n_embd=32", "model.architecture.n_head=2",
    "model.tokenizer.bpe_vocab_size=300", "data.max_length=64", "data.max_prompt_length=32", "data.source.max_rows=64",
    "data.eval_batch_size=4", "logger=csv", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
    "++trainer.limit_val_batches=1", "optim.warmup_steps=0", "callbacks.samples=null",
    "callbacks.model_checkpoint.every_n_train_steps=null",
]  # fmt: skip
SYSTEM_OVERRIDES = {
    "ppo": ["system.generation.max_new_tokens=8", "system.ppo_epochs=1", "system.minibatch_size=2"],
    # TF-IDF labels: VADER scores nearly every sample of a random tiny model 0, which pairs nothing
    "online_dpo": ["system.generation.max_new_tokens=8", "system.samples_per_prompt=8", "reward=tfidf"],
    # one step per batch: a batch is 2 prompts x 4 samples a rank
    "grpo": ["system.generation.max_new_tokens=8", "system.minibatch_size=8", "reward=tfidf"],
    "rloo": ["system.generation.max_new_tokens=8", "system.minibatch_size=8", "reward=tfidf"],
}
"""What a system that samples its own data needs to run 3 steps on the tiny model."""


@dataclass(frozen=True)
class Case:
    system: str
    reference: str
    trainer: str
    precision: str
    optim: str

    @property
    def name(self) -> str:
        return "-".join((self.system, self.reference, self.trainer, self.precision, self.optim))

    def overrides(self) -> list[str]:
        from dpo.systems import SYSTEMS

        world = 1 if self.trainer == "gpu" else 2
        # a system that steps itself takes one batch of prompts per iteration (no accumulation); the others
        # accumulate 2 on one process
        spec = SYSTEMS[self.system]
        batch = 2 * world if spec.manual_steps else 4
        out = [*TINY, f"system={self.system}", f"reference={self.reference}", f"trainer={self.trainer}",
               "trainer.accelerator=cpu", f"trainer.devices={world}", f"trainer.precision={self.precision}",
               f"optim={self.optim}", "optim.optimizer.lr=5e-4", "optim.warmup_steps=0",
               f"data.batch_size={batch}", "data.micro_batch_size=2"]  # fmt: skip
        if self.reference == "none" and spec.uses_loss:  # a loss that needs no reference
            out.append(f"loss={REFERENCE_FREE_LOSS}")
        elif self.reference == "none" and "kl_coef" in {f.name for f in fields(spec.config)}:  # no KL term
            out.append("system.kl_coef=0")
        return out + SYSTEM_OVERRIDES.get(self.system, [])


def system_references() -> list[tuple[str, str]]:
    """(system, reference kind) pairs, from the systems and references registries."""
    from dpo.systems import SYSTEMS
    from dpo.systems.reference import REFERENCES

    out = []
    for kind, spec in SYSTEMS.items():
        refs = list(REFERENCES) if spec.references is None else list(spec.references) or ["none"]
        out += [(kind, ref) for ref in refs]
    return out


def full_product() -> list[Case]:
    return [Case(s, r, t, p, o) for (s, r), t, p, o in itertools.product(system_references(), TRAINERS, PRECISIONS,
                                                                       OPTIMIZERS)]  # fmt: skip


def factors(case: Case) -> tuple[str, ...]:
    return case.system, case.reference, case.trainer, case.precision, case.optim


def covered_pairs(cases: list[Case]) -> set[tuple]:
    """Every (factor i, value, factor j, value) that some case holds."""
    return {(i, a, j, b) for c in cases for (i, a), (j, b) in itertools.combinations(enumerate(factors(c)), 2)}


def refused(case: Case) -> bool:
    """A case the config check refuses before weights load: a system that can't shard under FSDP2."""
    from dpo.systems import SYSTEMS

    return case.trainer == "fsdp" and not SYSTEMS[case.system].shardable


def pairwise() -> list[Case]:
    """Cases that train, holding every pair of factor values that some such case holds, then one
    refused case per refused system. Greedy: each step takes the case of the full product that covers
    the most pairs not yet covered, ties broken by product order, so the set is the same everywhere."""
    cases = [c for c in full_product() if not refused(c)]
    missing = covered_pairs(cases)
    chosen = []
    while missing:
        best = max(cases, key=lambda c: len(covered_pairs([c]) & missing))
        chosen.append(best)
        missing -= covered_pairs([best])
    refusals = {c.system: c for c in reversed(full_product()) if refused(c)}
    return chosen + sorted(refusals.values(), key=full_product().index)


class Probe(pl.Callback):
    """Writes ``<out>/probe_rank<r>.json``: how many trainable tensors moved, which frozen ones changed,
    the trained weights' dtype."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    @staticmethod
    def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Whole parameters: FSDP2's sharded DTensors gathered (every rank calls this at the same hook),
        as FSDP2 leaves a root unit gathered after its forward (plain, whole tensors)."""
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p) for n, p in module.named_parameters()}

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        self.before = {n: t.detach().clone() for n, t in self._params(module).items()}

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        now = self._params(module)
        changed = {n for n, t in now.items() if not torch.equal(t.detach(), self.before[n])}
        dtypes = sorted({str(now[n].dtype).removeprefix("torch.") for n in self.trainable})
        self.out.mkdir(parents=True, exist_ok=True)
        result = {"trainable": len(self.trainable), "moved": len(changed & self.trainable),
                  "frozen": len(now) - len(self.trainable), "frozen_changed": sorted(changed - self.trainable),
                  "dtypes": dtypes}  # fmt: skip
        (self.out / f"probe_rank{trainer.global_rank}.json").write_text(json.dumps(result))


@dataclass
class Result:
    case: Case
    verdict: str  # ok, refused, FAILED
    seconds: float
    losses: list[float] = field(default_factory=list)
    moved: str = ""
    frozen_unchanged: bool | None = None
    dtypes: str = ""
    message: str = ""


# A trainable tensor moves unless all of it gets a zero gradient or updates that round away (tensors
# are compared whole, so unused embedding rows don't count). Two kinds don't move, by design: the
# reward model's final LayerNorm bias adds the same w.b to both scores of a pair, which the
# Bradley-Terry loss cancels (zero gradient; the full product shows 94% moved), and under bf16-true
# AdamW's first steps (about lr = 5e-4) round away on weights near 1 (LayerNorm gains; bf16's spacing
# at 1 is 2^-7): 81-83% moved, while RMSprop's larger first steps move 100%. Half is the bar.
MOVED_FRACTION = 0.5
WEIGHT_DTYPE = {"32-true": "float32", "bf16-mixed": "float32", "bf16-true": "bfloat16"}


def run_case(case: Case, work: Path) -> Result:
    """Run one case in a subprocess (DDP re-launches it) and judge it."""
    out = work / case.name
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", DPO_CACHE_DIR=str(work / "cache"),
               OMP_NUM_THREADS="1", PYTHONPATH=path)  # fmt: skip
    cmd = [sys.executable, "-m", "dpo.commands.train", f"hydra.run.dir={out}", *case.overrides(),
           "+callbacks.probe._target_=precision_matrix.Probe", f"+callbacks.probe.out={out / 'probe'}"]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    seconds = round(time.perf_counter() - started, 1)
    text = (proc.stdout + proc.stderr).strip()
    if proc.returncode:
        last = text.splitlines()[-1] if text else ""
        loaded = any((out / "checkpoints").glob("*")) or (out / "probe").exists()
        one_line = "[ERROR] - " in last and "DPO_FULL_ERROR=1 shows the traceback" in last and "Traceback" not in text
        verdict = "refused" if one_line and not loaded else "FAILED"
        message = last.split("] - ", 1)[-1][:300] if one_line else text[-3000:]  # the log line's text alone
        return Result(case, verdict, seconds, message=message)
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    probes = [json.loads(p.read_text()) for p in sorted((out / "probe").glob("probe_rank*.json"))]
    moved = sum(p["moved"] for p in probes) / max(1, sum(p["trainable"] for p in probes))
    unchanged = not any(p["frozen_changed"] for p in probes)
    dtypes = sorted({d for p in probes for d in p["dtypes"]})
    problems = []
    if len(losses) != 3 or not all(math.isfinite(x) for x in losses):
        problems.append(f"losses {losses}")
    if moved < MOVED_FRACTION:
        problems.append(f"only {moved:.0%} of trainable tensors moved")
    if not unchanged:
        problems.append(f"frozen weights changed: {probes[0]['frozen_changed'][:3]}")
    if dtypes != [WEIGHT_DTYPE[case.precision]]:
        problems.append(f"trained weights in {dtypes}, expected {WEIGHT_DTYPE[case.precision]}")
    return Result(case, "FAILED" if problems else "ok", seconds, losses, f"{moved:.0%}", unchanged, "/".join(dtypes),
                  "; ".join(problems))  # fmt: skip


# The first step's loss under bf16-mixed against 32-true, same system and reference. The optimizer has
# not acted yet and every trainer sees the same global batch (the loss is its mean), so any 32-true
# case of the pair is the twin (the full product's 32-true first losses are equal to the last digit
# across trainers and optimizers). A loss that compares the policy with its reference starts at
# policy == reference, both scored in the same precision: exact (measured gap 0). A loss of the
# policy's scores alone (the reward model, a reference-free loss) moves with bf16's rounding of every
# matmul input (8 significant bits) while accumulation stays fp32, with or without bf16 units, so
# the rounding is the same on every CPU: measured 3e-5 (reward model) and 7e-5 (SimPO); 1e-3 is a
# 14x margin. The first loss of a system that samples its own data (PPO, online DPO) depends on the
# sampled tokens, which bf16 logits can change: not compared.
def first_loss_tolerance(case: Case) -> float | None:
    from dpo.systems import SYSTEMS

    if SYSTEMS[case.system].data == "prompts":
        return None
    return 1e-5 if SYSTEMS[case.system].uses_loss and case.reference != "none" else 1e-3


def first_loss_gaps(results: list[Result]) -> dict[str, float]:
    """|first loss (bf16-mixed) - first loss (32-true)| per bf16-mixed case name that has a twin."""
    twins = {}
    for r in results:
        if r.case.precision == "32-true" and r.losses:
            twins.setdefault((r.case.system, r.case.reference), r.losses[0])
    return {r.case.name: abs(r.losses[0] - twins[(r.case.system, r.case.reference)]) for r in results
            if r.case.precision == "bf16-mixed" and first_loss_tolerance(r.case) is not None and r.losses
            and (r.case.system, r.case.reference) in twins}  # fmt: skip


def over_tolerance(results: list[Result]) -> dict[str, float]:
    """The first-loss gaps above their case's tolerance."""
    tol = {r.case.name: first_loss_tolerance(r.case) for r in results}
    return {name: gap for name, gap in first_loss_gaps(results).items() if gap > tol[name]}


def table(results: list[Result]) -> str:
    gaps = first_loss_gaps(results)
    head = ("| system | reference | trainer | precision | optim | verdict | s | loss step 1 -> 3 | |bf16-fp32| step 1 "
            "| moved | frozen same | weights | note |")
    lines = [head, "|" + "|".join(["---"] * 13) + "|"]
    for r in results:
        c = r.case
        loss = f"{r.losses[0]:.4f} -> {r.losses[-1]:.4f}" if r.losses else ""
        gap = f"{gaps[c.name]:.1e}" if c.name in gaps else ""
        same = "" if r.frozen_unchanged is None else ("yes" if r.frozen_unchanged else "NO")
        note = r.message.replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {c.system} | {c.reference} | {c.trainer} | {c.precision} | {c.optim} | {r.verdict} | "
                     f"{r.seconds:.0f} | {loss} | {gap} | {r.moved} | {same} | {r.dtypes} | {note} |")  # fmt: skip
    return "\n".join(lines)


def run_and_record(case: Case, work: Path, progress: str) -> Result:
    """:func:`run_case`, printed and appended to ``<work>/results.jsonl``."""
    result = run_case(case, work)
    print(f"{progress} {case.name}: {result.verdict} ({result.seconds:.0f} s) {result.message[:200]}", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    with (work / "results.jsonl").open("a") as f:
        f.write(json.dumps(asdict(result)) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairwise", action="store_true", help="the covering set only")
    parser.add_argument("--work", type=Path, default=Path("outputs/precision_matrix"))
    parser.add_argument("--out", type=Path, default=None, help="markdown table (default: results.md beside this file)")
    parser.add_argument("--only", nargs="*", default=None, help="case names (system-reference-trainer-precision-optim)")
    parser.add_argument("--render", action="store_true", help="only write the table of <work>/results.jsonl")
    args = parser.parse_args()
    cases = pairwise() if args.pairwise else full_product()
    if args.only:
        cases = [c for c in cases if c.name in args.only]
    if args.render:
        rows = [json.loads(x) for x in (args.work / "results.jsonl").read_text().split("\n") if x]
        results = [Result(**(r | {"case": Case(**r["case"])})) for r in rows]
    else:
        results = [run_and_record(case, args.work, f"[{i}/{len(cases)}]") for i, case in enumerate(cases, 1)]
    gaps = first_loss_gaps(results)
    bad_gaps = over_tolerance(results)
    verdicts = {v: sum(r.verdict == v for r in results) for v in ("ok", "refused", "FAILED")}
    summary = (f"{len(results)} cases: {verdicts['ok']} ok, {verdicts['refused']} refused before weights load, "
               f"{verdicts['FAILED']} failed; first-step loss bf16-mixed vs 32-true: max gap "
               f"{max(gaps.values(), default=0):.1e} over {len(gaps)} twins, "
               f"{len(bad_gaps)} over tolerance")  # fmt: skip
    print(summary)
    out = args.out or HERE / ("results_pairwise.md" if args.pairwise else "results.md")
    machine = _machine()
    command = "python experiments/precision_matrix/precision_matrix.py" + (" --pairwise" if args.pairwise else "")
    minutes = sum(r.seconds for r in results) / 60
    out.write_text(f"# Precision-and-strategy matrix\n\n`{command}` ({minutes:.0f} minutes of runs) on {machine}, "
                   f"{time.strftime('%Y-%m-%d')}.\n\n{summary}\n\n{table(results)}\n")  # fmt: skip
    sys.exit(1 if verdicts["FAILED"] or bad_gaps else 0)


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")  # fmt: skip
    bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    return f"{cpu}, {os.cpu_count()} cores, {'with' if bf16 else 'without'} avx512_bf16, torch {torch.__version__}"


if __name__ == "__main__":
    main()
