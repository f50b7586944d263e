"""Bad (and unusual but valid) input against every command, as a user types it.

One list serves two runners: ``tests/test_bad_input_commands.py`` runs each case in this process
through the command's Hydra entry (the suite's slow tier), and ``experiments/fuzz/fuzz_commands.py``
runs each as the real console command in a subprocess and writes the table of verdicts
(``experiments/fuzz/cases.md``).

Verdicts of a bad input: ``clean`` (exit status 1, no traceback, the error matches ``names``),
``TRACEBACK`` (a raw exception), ``ACCEPTED`` (exit 0: a silent misread), ``UNNAMED`` (refused without
naming what), ``HANG`` (no answer in time). Of a valid input: ``ok`` or ``REFUSED``. Issue 23 wants
none of the capitals.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

COMMANDS = {
    "dpo-train": "dpo.commands.train",
    "dpo-sample": "dpo.commands.sample",
    "dpo-score": "dpo.commands.score",
    "dpo-pair": "dpo.commands.pair",
    "dpo-best-of-n": "dpo.commands.best_of_n",
    "dpo-eval": "dpo.commands.evaluate",
    "dpo-report": "dpo.commands.report_figures",
    "dpo-dashboard": "dpo.commands.dashboard",
}
"""Console command -> the module whose ``main`` is its entry (``pyproject.toml``'s scripts)."""


@dataclass
class Case:
    """One command line. ``args`` may hold ``{d}``, the case's own folder, where ``files`` are written
    first (a list is written as JSONL rows, a str row as it is; bytes as they are)."""

    command: str
    name: str
    args: list[str]
    files: dict[str, bytes | list | dict] = field(default_factory=dict)
    bad: bool = True  # a bad input (must be refused) or a valid one (must run)
    names: str = ""  # a regex the output must match when refused (what the error names)

    def argv(self, folder: Path) -> list[str]:
        for name, content in self.files.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, dict):  # a folder where a file is expected
                path.mkdir(parents=True, exist_ok=True)
                continue
            if isinstance(content, list):
                content = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in content).encode()
            path.write_bytes(content)
        return [a.replace("{d}", str(folder)) for a in self.args]

    @property
    def id(self) -> str:
        return f"{self.command}: {self.name}"


def verdict(case: Case, rc: int | None, out: str) -> str:
    """The case's verdict from the exit status (None: it hung) and everything it printed."""
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
    """The line a user reads: the last error line, else the last that is not a wandb or warnings line."""
    lines = [x for x in out.strip().splitlines() if x.strip() and not x.startswith(("wandb:", "  warnings.warn"))]
    errors = [x for x in lines if "Error" in x or "error" in x]  # the refusal, when later lines followed it
    line = (errors or lines or [""])[-1]
    return line.split("] - ", 1)[-1][:150].replace("|", "/")


GOOD = {"prompt": "Review it:", "completions": [" A warm film.", " Dull."], "rewards": [0.8, -0.2]}
PAIR_ROW = {"prompt": "Review the film:", "chosen": " A warm, clever film.", "rejected": " Dull and slow."}
TRAIN = ["experiment=tiny", "debug=fast", "data.source.max_rows=32", "callbacks.samples=null", "paths.log_dir={d}"]
PPO = [*TRAIN, "system=ppo", "system.minibatch_size=2"]
RM = [*TRAIN, "system=reward_model"]
ONLINE = [*TRAIN, "system=online_dpo"]
LOCAL = ["data=local", "data.source.splits.train={d}/t.jsonl", "data.source.splits.val={d}/t.jsonl",
         "data.max_length=64", "data.max_prompt_length=32"]  # fmt: skip
SAME = [{"prompt": f"p{i}", "chosen": " a", "rejected": " a"} for i in range(40)]
ROWS = [{**PAIR_ROW, "prompt": f"Review film {i}:"} for i in range(40)]
UNPAIRED = [{"prompt": f"Review film {i}:", "completion": " A fine film.", "label": i % 2 == 0} for i in range(40)]
KTO_LOCAL = ["system=kto", "data=local_unpaired"]
SAMPLE = ["model.pretrained=unused", "prompts.file={d}/p.txt", "paths.log_dir={d}"]
PROMPTS = {"p.txt": b"Review it:\n"}
SCORE = ["input={d}/s.jsonl", "paths.log_dir={d}"]
BON = ["input={d}/s.jsonl", "paths.log_dir={d}"]
EVAL_ANY = ["data=reviews", "template=positive", "completions={d}/c.jsonl", "paths.log_dir={d}"]
EVAL, EVAL_API = [*EVAL_ANY, "judge=reward"], [*EVAL_ANY, "judge=api", "judge.api_key_env=K"]
TEXTS = (("dpo", " A warm and wonderful film."), ("sft", " A dull film."))
COMPLETIONS = [{"policy": p, "temperature": 0.0, "prompt": f"Review film {i}:", "completion": c}
               for i in range(4) for p, c in TEXTS]  # fmt: skip
EVAL_FILES = {"c.jsonl": COMPLETIONS, "p.txt": "".join(f"Review film {i}:\n" for i in range(4)).encode()}
EVAL_VADER = ["template=positive", "judge=reward", "reward@judge.reward=vader", "prompts_file={d}/p.txt",
              "completions={d}/c.jsonl", "baseline=sft", "temperatures=[0.0]", "paths.log_dir={d}"]  # fmt: skip
REPORT = ["paths.log_dir={d}/logs", "out={d}/f"]
RUN_CSV = {"r/csv/metrics.csv": b"step,train/loss\n0,0.69\n1,0.6\n",
           "r/config.yaml": b"system: {kind: dpo}\nloss: {name: dpo, beta: 0.1}\n"}  # fmt: skip
DASH = ["paths.log_dir={d}/logs"]


def train(name: str, names: str, *extra: str, files: dict | None = None, bad: bool = True, base=TRAIN) -> Case:
    return Case("dpo-train", name, [*base, *extra], files or {}, bad, names)


def local(name: str, names: str, rows, *extra: str, bad: bool = True) -> Case:
    return train(name, names, *LOCAL, *extra, files={"t.jsonl": rows}, bad=bad)


def sample(name: str, names: str, *extra: str, files: dict | None = None) -> Case:
    return Case("dpo-sample", name, [*SAMPLE, *extra], PROMPTS if files is None else files, True, names)


def score(name: str, names: str, rows, *extra: str, bad: bool = True) -> Case:
    return Case("dpo-score", name, [*SCORE, *extra], {} if rows is None else {"s.jsonl": rows}, bad, names)


def pair(name: str, rows, names: str = "", *extra: str, bad: bool = True) -> Case:
    files = {} if rows is None else {"s.jsonl": rows}
    return Case("dpo-pair", name, ["input={d}/s.jsonl", "output_dir={d}/p", "paths.log_dir={d}", *extra], files, bad,
                names)  # fmt: skip


def bon(name: str, names: str, rows, *extra: str, bad: bool = True) -> Case:
    return Case("dpo-best-of-n", name, [*BON, *extra], {} if rows is None else {"s.jsonl": rows}, bad, names)


def evaluate(name: str, names: str, *extra: str, files: dict | None = None, base=EVAL, bad: bool = True) -> Case:
    return Case("dpo-eval", name, [*base, *extra], files or {}, bad, names)


def report(name: str, names: str, *extra: str, files: dict | None = None, bad: bool = True) -> Case:
    return Case("dpo-report", name, [*REPORT, *extra], files or {}, bad, names)


def dashboard(name: str, names: str, *extra: str, files: dict | None = None, bad: bool = True) -> Case:
    return Case("dpo-dashboard", name, [*DASH, *extra], files or {}, bad, names)


CASES: list[Case] = [
    # dpo-train: run identity and checkpoints
    train("run_name empty", "run_name", "run_name="),
    train("run_name ../../x", "run_name", "run_name=../../x"),
    train("run_name absolute", "run_name", "run_name=/tmp/elsewhere"),
    train("run_name a/../../b", "run_name", "run_name=a/../../b"),
    train("ckpt_path missing", "ckpt_path", "ckpt_path={d}/no.ckpt"),
    train("ckpt_path a text file", r"x\.ckpt", "ckpt_path={d}/x.ckpt", files={"x.ckpt": b"hello"}),
    train("ckpt_path a folder", "ckpt_path", "ckpt_path={d}/folder.ckpt", files={"folder.ckpt/a": b""}),
    train("guard.data_changed maybe", "data_changed", "guard.data_changed=maybe"),
    # dpo-train: precision and strategy
    train("16-mixed on CPU", "16-mixed", "trainer.precision=16-mixed"),
    train("unknown precision", "precision", "trainer.precision=bf17"),
    train("gpu without CUDA", "accelerator", "trainer=gpu"),
    train("bf16-mixed trains", "", "trainer.precision=bf16-mixed", bad=False),
    train("fsdp tensor_parallel 2", "tensor_parallel", "trainer=fsdp_cpu", "data.batch_size=4",
          "trainer.strategy.tensor_parallel_size=2"),  # fmt: skip
    train("fsdp data_parallel 3", "data_parallel", "trainer=fsdp_cpu", "data.batch_size=4",
          "trainer.strategy.data_parallel_size=3"),  # fmt: skip
    train("accumulate_grad_batches set", "accumulate_grad_batches", "+trainer.accumulate_grad_batches=2"),
    train("unknown strategy", "strategy", "trainer.strategy=sideways"),
    train("trainer key typo", "max_step", "+trainer.max_step=3"),
    # dpo-train: the system's settings
    train("ppo clip_range -1", "clip_range", "system.clip_range=-1", base=PPO),
    train("ppo vf_coef -1", "vf_coef", "system.vf_coef=-1", base=PPO),
    train("ppo clip_range_value 0", "clip_range_value", "system.clip_range_value=0", base=PPO),
    train("ppo max_steps 1", "max_steps", "trainer.max_steps=1", base=PPO),
    train("ppo temperature -1", "temperature", "system.generation.temperature=-1", base=PPO),
    train("ppo ppo_epochs 0", "ppo_epochs", "system.ppo_epochs=0", base=PPO),
    train("ppo minibatch_size 0", "minibatch_size", "system.minibatch_size=0", base=PPO),
    train("ppo kl_coef -0.1", "kl_coef", "system.kl_coef=-0.1", base=PPO),
    train("ppo kl_target 0", "kl_target", "system.kl_target=0", base=PPO),
    train("ppo gamma 0", "gamma", "system.gamma=0", base=PPO),
    train("ppo lam 2", "lam", "system.lam=2", base=PPO),
    train("ppo max_new_tokens 0", "max_new_tokens", "system.generation.max_new_tokens=0", base=PPO),
    train("ppo top_p 0", "top_p", "system.generation.top_p=0", base=PPO),
    train("ppo samples_per_prompt 0", "samples_per_prompt", "system.samples_per_prompt=0", base=PPO),
    train("ppo with precomputed reference", "reference", "reference=precomputed", base=PPO),
    train("online samples_per_prompt 1", "samples_per_prompt", "system.samples_per_prompt=1", base=ONLINE),
    train("online pairs abc", "pairs", "system.pairs=abc", base=ONLINE),
    train("online epochs 0", "epochs", "system.epochs=0", base=ONLINE),
    train("online min_margin -1", "min_margin", "system.min_margin=-1", base=ONLINE),
    train("online rounds 0", "rounds", "system.rounds=0", base=ONLINE),
    train("online rounds not dividing max_steps", "max_steps", "system.rounds=2", base=ONLINE),
    train("online judge kind unknown", "judge.kind", "system.judge={kind: oracle}", base=ONLINE),
    train("online judge without template", "template", "system.judge={kind: self}", base=ONLINE),
    train("online judge and reward", "judge", "system.judge={kind: self}", "system.reward={name: vader}",
          base=ONLINE),
    train("online loss sft", "loss", "loss=sft", base=ONLINE),
    train("kto beta 0", "beta", "system=kto", "system.beta=0"),
    train("kto weight -1", "undesirable_weight", "system=kto", "system.undesirable_weight=-1"),
    train("kto micro batch 1", "micro_batch_size", "system=kto", "data.micro_batch_size=1", "data.batch_size=1"),
    train("kto reference none", "reference", "system=kto", "reference=none"),
    train("rm center_weight -1", "center_weight", "system=reward_model", "system.center_weight=-1"),
    train("rm center_weight abc", "center_weight", "system.center_weight=abc", base=RM),
    train("unknown system", "system", "system=nope"),
    # dpo-train: loss, optimizer, reference
    train("beta abc", "beta", "loss.beta=abc"),
    train("beta -0.1", "beta", "loss.beta=-0.1"),
    train("beta 0", "beta", "loss.beta=0"),
    train("unknown loss", "loss", "loss=nope"),
    train("loss key unknown", "nonsense", "+loss.nonsense=1"),
    train("nll_weight -1", "nll_weight", "loss.nll_weight=-1"),
    train("mix without terms", "loss.terms", "loss=mix"),
    train("mix unknown term", "loss.terms", "loss=mix", "loss.terms=[dpo,nope]"),
    train("mix weights too few", "loss.weights", "loss=mix", "loss.terms=[dpo,hinge]", "loss.weights=[1.0]"),
    train("exo eps 0", "label_smoothing", "loss=exo_pair", "loss.label_smoothing=0"),
    train("f-divergence unknown", "f_divergence_type", "loss.f_divergence_type=kl"),
    train("f-divergence on nca", "f_divergence_type", "loss=nca_pair", "loss.f_divergence_type=js_divergence"),
    train("ld_alpha 2", "ld_alpha", "loss.ld_alpha=2"),
    train("ld_alpha with precomputed", "ld_alpha", "loss.ld_alpha=0.5", "reference=precomputed"),
    train("use_weighting maybe", "use_weighting", "loss.use_weighting=maybe"),
    train("lr -1", "lr", "optim.optimizer.lr=-1"),
    train("lr abc", "lr", "optim.optimizer.lr=abc"),
    train("warmup -5", "warmup", "optim.warmup_steps=-5"),
    train("decay sideways", "decay", "optim.decay=sideways"),
    train("optimizer target missing", "optim.optimizer", "optim.optimizer._target_=torch.optim.Nope"),
    train("optimizer key typo", "betaz", "+optim.optimizer.betaz=[0.9,0.99]"),
    train("reference none for dpo", "reference", "reference=none"),
    train("reference sync_alpha 2", "sync_alpha", "reference=copy", "reference.sync_every=1",
          "reference.sync_alpha=2"),  # fmt: skip
    train("seed abc", "seed", "seed=abc"),
    # dpo-train: data settings
    train("batch_size 0", "batch_size", "data.batch_size=0"),
    train("batch_size 3 over micro 2", "batch_size", "data.batch_size=3"),
    train("micro_batch_size 0", "micro_batch_size", "data.micro_batch_size=0"),
    train("eval_batch_size -1", "eval_batch_size", "data.eval_batch_size=-1"),
    train("max_length 0", "max_length", "data.max_length=0"),
    train("max_prompt_length 0", "max_prompt_length", "data.max_prompt_length=0"),
    train("max_prompt_length beyond max_length", "max_prompt_length", "data.max_prompt_length=600"),
    train("max_length beyond the model", "max_length", "data.max_length=100000", "data.max_prompt_length=64"),
    train("max_rows 0", "max_rows", "data.source.max_rows=0"),
    train("num_workers -1", "num_workers", "data.num_workers=-1"),
    train("layout diagonal", "layout", "data.layout=diagonal"),
    train("truncation_side middle", "truncation_side", "data.truncation_side=middle"),
    train("on_bad_row ignore", "on_bad_row", "data.on_bad_row=ignore"),
    train("unknown data format", "format", "data.source.format=nope"),
    # dpo-train: callbacks
    train("samples n_prompts 0", "n_prompts", "callbacks.samples.n_prompts=0",
          base=[a for a in TRAIN if "samples" not in a]),  # fmt: skip
    train("checkpoint every -5", "every_n_train_steps", "callbacks.model_checkpoint.every_n_train_steps=-5"),
    train("reward_eval samples_per_prompt 0", "samples_per_prompt", "callbacks=reward_eval",
          "callbacks.reward_eval.samples_per_prompt=0", "callbacks.reward_eval.reward=${reward}"),  # fmt: skip
    train("reward_eval max_new_tokens 0", "max_new_tokens", "callbacks=reward_eval",
          "callbacks.reward_eval.generation.max_new_tokens=0"),  # fmt: skip
    train("reward_eval every_n_steps -1", "every_n_steps", "callbacks=reward_eval",
          "callbacks.reward_eval.every_n_steps=-1"),  # fmt: skip
    # dpo-train: the data file
    local("identical pairs", "same chosen and rejected", SAME),
    local("binary data file", r"t\.jsonl", bytes(range(256))),
    local("empty data file", r"t\.jsonl", b""),
    local("chosen missing", r"t\.jsonl:1", [{"prompt": "p", "rejected": " r"}, *ROWS]),
    local("chosen a number", r"t\.jsonl:1", [{**PAIR_ROW, "chosen": 3}, *ROWS]),
    local("rejected empty", r"t\.jsonl:1", [{**PAIR_ROW, "rejected": ""}, *ROWS]),
    local("prompt a list", r"t\.jsonl:1", [{**PAIR_ROW, "prompt": ["a"]}, *ROWS]),
    local("a torn line", r"t\.jsonl:10", [*ROWS[:9], '{"prompt": "p", "cho', *ROWS[9:]]),
    local("a JSON array per line", r"t\.jsonl:1", ["[1, 2]", *ROWS]),
    local("kto label a string", r"t\.jsonl:1.*'label' must be true or false",
          [{"prompt": "p", "completion": " c", "label": "yes"}, *UNPAIRED], *KTO_LOCAL),
    local("kto completion empty", r"t\.jsonl:2", [UNPAIRED[0], {**UNPAIRED[0], "completion": " "}, *UNPAIRED],
          *KTO_LOCAL),
    local("kto on sft rows", r"t\.jsonl:1: KTO trains on labelled completions", [{**r, "rejected": None} for r in ROWS],
          "system=kto", "data.source.options={rejected: null}"),
    local("data file a folder", r"t\.jsonl", {}),
    local("CRLF, a BOM, emoji and U+2028 train", "", [b"\xef\xbb\xbf".decode() + json.dumps(ROWS[0]) + "\r",
          *[{**r, "chosen": r["chosen"] + " \U0001f3ac\u2028ok"} for r in ROWS[1:]]], bad=False),  # fmt: skip
    local("over-long rows train", "", [{**r, "chosen": " long" * 500} for r in ROWS], bad=False),
    # dpo-sample
    sample("max_prompts 0", "max_prompts", "prompts.max_prompts=0"),
    sample("max_prompts -1", "max_prompts", "prompts.max_prompts=-1"),
    sample("max_prompts abc", "max_prompts", "prompts.max_prompts=abc"),
    sample("temperature -1", "temperature", "generation.temperature=-1"),
    sample("top_p 2", "top_p", "generation.top_p=2"),
    sample("top_k -3", "top_k", "generation.top_k=-3"),
    sample("max_new_tokens 0", "max_new_tokens", "generation.max_new_tokens=0"),
    sample("an empty stop string", "stop", "generation.stop=['']"),
    sample("n 0", "n=0 must", "n=0"),
    sample("batch_size 0", "batch_size", "batch_size=0"),
    sample("binary prompts file", r"p\.txt", files={"p.txt": bytes(range(256))}),
    sample("missing prompts file", r"p\.txt", files={}),
    sample("no prompt in the file", r"p\.txt: no prompts", files={"p.txt": b"   \n"}),
    sample("JSONL prompts without the field", r"p\.jsonl:1", "prompts.file={d}/p.jsonl",
           files={"p.jsonl": [{"text": "a"}]}),  # fmt: skip
    sample("no model", "pretrained", "model.pretrained=???"),
    sample("unknown key", "nonsense", "+nonsense=1"),
    sample("unknown prompts key", "nonsense", "+prompts.nonsense=1"),
    # dpo-score
    score("missing input", r"s\.jsonl", None),
    score("malformed input", r"s\.jsonl:1", ["{not json"]),
    score("binary input", "UTF-8", b"\x80\xff"),
    score("empty input", r"s\.jsonl", b""),
    score("completions not a list", r"s\.jsonl:1", [{"prompt": "p", "completions": "x"}]),
    score("prompt missing", r"s\.jsonl:1", [{"completions": ["x"]}]),
    score("a completion a number", r"s\.jsonl:1", [{"prompt": "p", "completions": ["x", 3]}]),
    score("unknown reward", "nope", [GOOD], "reward.name=nope"),
    score("batch_size 0", "batch_size", [GOOD], "batch_size=0"),
    score("include_prompt maybe", "include_prompt", [GOOD], "include_prompt=maybe"),
    score("input a folder", r"s\.jsonl", {}),
    score("unknown key", "nonsense", [GOOD], "+nonsense=1"),
    score("valid with vader", "", [GOOD], bad=False),
    # dpo-pair
    pair("Infinity reward", ['{"prompt": "a", "completions": ["x", "y"], "rewards": [Infinity, 0]}'], "finite"),
    pair("NaN reward", ['{"prompt": "a", "completions": ["x", "y"], "rewards": [NaN, 0]}'], "finite"),
    pair("bool reward", ['{"prompt": "a", "completions": ["x", "y"], "rewards": [true, 0]}'], "finite"),
    pair("string reward", ['{"prompt": "a", "completions": ["x", "y"], "rewards": ["1", 0]}'], "finite"),
    pair("missing rewards", ['{"prompt": "a", "completions": ["x", "y"]}'], "rewards"),
    pair("length mismatch", ['{"prompt": "a", "completions": ["x", "y"], "rewards": [1]}'], "2 completions"),
    pair("identical completions", [{"prompt": "a", "completions": ["x", "x"], "rewards": [1, 0]}], "identical"),
    pair("empty completions", [{"prompt": "a", "completions": ["", " "], "rewards": [1, 0]}], "empty completion"),
    pair("one completion per prompt", [{"prompt": "a", "completions": ["x"], "rewards": [1]}], "two completions"),
    pair("all ties", [{"prompt": "a", "completions": ["x", "y"], "rewards": [1, 1]}], "ties"),
    pair("missing input", None, r"s\.jsonl"),
    pair("empty input", b"", r"s\.jsonl"),
    pair("min_margin -1", [GOOD], "min_margin", "min_margin=-1"),
    pair("min_margin abc", [GOOD], "min_margin", "min_margin=abc"),
    pair("val_fraction 1.5", [GOOD], "val_fraction", "val_fraction=1.5"),
    pair("val_fraction -0.1", [GOOD], "val_fraction", "val_fraction=-0.1"),
    pair("ties first", [GOOD], "ties", "ties=first"),
    pair("seed abc", [GOOD], "seed", "seed=abc"),
    pair("unknown key", [GOOD], "nonsense", "+nonsense=1"),
    pair("valid", [GOOD], bad=False),
    pair("ties random valid", [{"prompt": "a", "completions": ["x", "y"], "rewards": [1, 1]}], "", "ties=random",
         bad=False),  # fmt: skip
    pair("U+2028 in a completion", [{**GOOD, "completions": [" A\u2028film.", " Dull."]}], bad=False),
    pair("CRLF and a BOM", [b"\xef\xbb\xbf".decode() + json.dumps(GOOD) + "\r"], bad=False),
    # dpo-best-of-n
    bon("NaN reward", "finite", ['{"prompt": "a", "completions": ["x"], "rewards": [NaN]}'], "ns=[1]"),
    bon("ns [0]", "ns", [GOOD], "ns=[0]"),
    bon("ns []", "ns", [GOOD], "ns=[]"),
    bon("ns abc", "ns", [GOOD], "ns=abc"),
    bon("ns beyond samples", "8", [GOOD], "ns=[8]"),
    bon("missing input", r"s\.jsonl", None, "ns=[1]"),
    bon("rewards missing", r"s\.jsonl:1", [{"prompt": "a", "completions": ["x"]}], "ns=[1]"),
    bon("rewards fewer than completions", r"s\.jsonl:1", [{**GOOD, "rewards": [1.0]}], "ns=[1]"),
    bon("unknown key", "nonsense", [GOOD], "+nonsense=1"),
    bon("valid", "", [GOOD], "ns=[1,2]", bad=False),
    # dpo-eval
    *[evaluate(f"api {o}", o.split("=")[0].split(".")[-1], o, base=EVAL_API)
      for o in ("judge.base_url=localhost:8000/v1", "judge.timeout_s=0", "judge.max_retries=-1",
                "judge.max_concurrency=0", "judge.max_run_s=-1", "judge.orders=sideways", "judge.max_tokens=0",
                "judge.max_requests=0", "judge.temperature=-1", "judge.backoff_s=-1")],  # fmt: skip
    evaluate("api key typed as its variable", "api_key_env", "judge.api_key_env=sk-live-0123456789", base=EVAL_API),
    evaluate("api key not set", "K", files={"c.jsonl": COMPLETIONS}, base=EVAL_API),
    evaluate("n_prompts 0", "n_prompts", "n_prompts=0"),
    evaluate("negative temperature", "temperatures", "temperatures=[-1]"),
    evaluate("no temperature", "temperatures", "temperatures=[]"),
    evaluate("batch_size 0", "batch_size", "batch_size=0", files=EVAL_FILES, base=EVAL_VADER),
    evaluate("unknown judge", "judge", "judge=nope"),
    evaluate("unknown template", "template", "template=nope"),
    evaluate("unknown dtype", "dtype", "dtype=float8"),
    evaluate("generation temperature (temperatures sweeps it)", "temperature", "generation.temperature=0.5"),
    evaluate("generation top_p 2", "top_p", "generation.top_p=2"),
    evaluate("generation max_new_tokens 0", "max_new_tokens", "generation.max_new_tokens=0"),
    evaluate("malformed completions", r"c\.jsonl:1", files={"c.jsonl": ["{oops"]}),
    evaluate("completions missing a key", r"c\.jsonl:1", files={"c.jsonl": [{"policy": "a", "prompt": "p"}]}),
    evaluate("completions missing", r"c\.jsonl"),
    evaluate("prompts_file missing", r"none\.txt", "prompts_file={d}/none.txt", files={"c.jsonl": COMPLETIONS},
             base=EVAL_VADER),  # fmt: skip
    evaluate("baseline not a policy", "baseline", *EVAL_VADER[:-2], "baseline=nobody", "temperatures=[0.0]",
             files=EVAL_FILES, base=[]),  # fmt: skip
    evaluate("unknown key", "nonsense", "+nonsense=1", files=EVAL_FILES, base=EVAL_VADER),
    evaluate("valid, reward judge", "", files=EVAL_FILES, base=EVAL_VADER, bad=False),
    # dpo-report
    report("runs not set", "runs"),
    report("runs empty list", "runs", "runs=[]"),
    report("missing folder", "no such folder", "runs=[{d}/none]"),
    report("a folder with no logs", "no run logs", "runs=[{d}/empty]", files={"empty/x.txt": b"x"}),
    report("malformed metrics.csv", r"metrics\.csv:2", "runs=[{d}/r]",
           files={"r/csv/metrics.csv": b"step,train/loss\n0,oops\n"}),  # fmt: skip
    report("torn eval.jsonl", r"eval\.jsonl:1", "runs=[{d}/e]", files={"e/eval.jsonl": b'{"kl": 0.1, "reward"'}),
    report("binary results.jsonl", r"results\.jsonl", "runs=[{d}/w]", files={"w/results.jsonl": b"\xff\xfe"}),
    report("malformed overrides.yaml", r"overrides\.yaml", "runs=[{d}/r]",
           files={**RUN_CSV, "r/.hydra/overrides.yaml": b"- a: ["}),  # fmt: skip
    report("unknown key", "colour", "colour=red"),
    report("added key", "colour", "runs={d}/r", "+colour=red", files=RUN_CSV),
    report("valid run folder", "", "runs={d}/r", files=RUN_CSV, bad=False),
    # dpo-dashboard
    dashboard("unknown key", "colour", "colour=red"),
    dashboard("added key", "colour", "entity=a", "project=b", "group=g", "+colour=red"),
    dashboard("entity missing", "entity", "project=dpo", "group=g"),
    dashboard("publish maybe", "publish", "entity=a", "project=b", "group=g", "publish=maybe"),
    dashboard("malformed spec", r"s\.json", "spec={d}/s.json", "publish=true", files={"s.json": b"{"}),
    dashboard("missing spec", r"none\.json", "spec={d}/none.json", "publish=true"),
    dashboard("spec without its key", r"s\.json", "spec={d}/s.json", files={"s.json": b'{"panels": []}'}),
    dashboard("spec a folder", r"sp", "spec={d}/sp", files={"sp/x": b""}),
    dashboard("valid, offline", "", "entity=a", "project=b", "group=g", "out={d}/dash.json", bad=False),
]
