"""A trained policy as an ordinary Hugging Face model folder (the run's ``hf`` export): safetensors
weights, the tokenizer, and a model card (``README.md``) saying what made it, as the Hub expects.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo.runtime.io import atomic_write

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
"""A Hugging Face Hub model id (``gpt2``, ``EleutherAI/pythia-2.8b``)."""


def export_pretrained(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path, write: bool = True
) -> Path | None:
    """Save model (safetensors) and tokenizer so ``AutoModelForCausalLM.from_pretrained(path)`` works.

    A LoRA policy is merged into its base first, so the export is an ordinary model. A model
    sharded by FSDP2 is gathered into a full state dict; every rank must call this (the gather
    is collective) and only the one with ``write=True`` writes.

    Returns:
        The export folder, or None on ranks that don't write.
    """
    from torch.distributed.tensor import DTensor

    if hasattr(model, "merge_and_unload"):  # a PEFT LoRA policy: export base + merged adapter
        model = model.merge_and_unload()
    state_dict = None
    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not write:
        return None
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    if not any(path.glob("*.safetensors")):
        raise RuntimeError(f"export to {path} wrote no safetensors file")
    return path


def model_card(config: dict[str, Any], method: str, summary_text: str, command: str) -> str:
    """The export's ``README.md``: Hub metadata (base model, library, tags) and what made the model:
    the method, base model, data, loss and its parameters, steps, final metrics and the command.

    Args:
        config: the run's resolved config (``config.yaml``, secrets redacted).
        method: what trained it, as its system names it (e.g. ``loss=dpo(beta=0.1)``).
        summary_text: the run summary (:meth:`dpo.report.summary.RunSummary.render`).
        command: the command line that trained it.
    """
    model, data, system = config.get("model", {}), config.get("data", {}), config.get("system", {})
    base = model.get("pretrained")
    source = data.get("source", {})
    described = source.get("path") or ", ".join(f"{k}: {v}" for k, v in (source.get("splits") or {}).items())
    kind = system.get("kind", "dpo")
    head = ["---", "library_name: transformers", f"tags: [dpo-lightning, {kind}]"]
    if base and HUB_ID.fullmatch(str(base)) and not Path(str(base)).exists():
        head.append(f"base_model: {base}")  # a hub id (a local folder or a pypi-gguf: spec is no Hub link)
    lines = [*head, "---", "", f"# {config.get('task_name', 'dpo')}: {kind} policy", "",
             f"Trained with dpo-lightning: `{method}`.", "",
             f"- base model: `{base}`" if base else "- base model: none (built from a config, random weights)",
             f"- data: `{described}` (format `{source.get('format')}`)",
             f"- batch size {data.get('batch_size')}, max length {data.get('max_length')}, "
             f"max prompt length {data.get('max_prompt_length')}",
             f"- optimizer: `{config.get('optim', {}).get('optimizer', {}).get('_target_')}`, "
             f"lr {config.get('optim', {}).get('optimizer', {}).get('lr')}", f"- seed {config.get('seed')}", "",
             "## Result", "", "```", summary_text.strip(), "```", "",
             "## Command", "", "```bash", command, "```", ""]  # fmt: skip
    return "\n".join(lines)


def write_model_card(folder: Path, config: dict[str, Any], method: str, summary_text: str, command: str) -> Path:
    """Write :func:`model_card` as ``folder/README.md`` (atomically); returns its path."""
    path = Path(folder) / "README.md"
    text = model_card(config, method, summary_text, command)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path
