"""What the rest of the code knows about a training system: :class:`SystemSpec`, one per file in
``dpo/systems`` (its ``SPEC``), listed in :data:`dpo.systems.SYSTEMS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dpo.systems.base import System


@dataclass(frozen=True)
class SystemSpec:
    """Everything the rest of the code knows about one training system; each system's file exports
    its own (``SPEC``) and :data:`dpo.systems.SYSTEMS` lists them by ``system.kind``.

    Attributes:
        config: its ``conf/system`` schema (range checks in its ``__post_init__``).
        build: ``(cfg, start, tokenizer) -> System``: its LightningModule, weights loaded.
        uses_loss: it trains with the ``conf/loss`` choice (else that group is ignored).
        data: what its batches hold: ``pairs`` (chosen and rejected), ``chosen`` (SFT rows),
            ``prompts`` (prompts only: it samples its own responses) or ``unpaired`` (KTO's labelled
            completions, :mod:`dpo.data.unpaired`); None: the loss decides.
        samples: it has a causal LM that the sampling callbacks can sample from.
        references: the ``reference.kind`` choices it runs with (None: the loss decides).
        check: its own cross-field checks of the composed config, before anything loads (ConfigError).
        describe: ``cfg -> str``: what the run summary's first line calls the run.
        family: ``config.yaml as a dict -> (family, label)``: where a finished run's points go in the
            figures (e.g. ``("DPO", "DPO b=0.1")``).
        shardable: it trains under FSDP2 (``trainer=fsdp``); else the config check refuses it.
        steps_per_batch: optimizer steps it makes per global batch, from the composed config.
        manual_steps: it steps and clips its optimizer itself (PPO): Lightning neither accumulates nor
            clips (``trainer.gradient_clip_val`` reaches the system instead).
        classifier: its model (``policy``) is a one-label sequence classifier, not a causal LM.
        checkpoint_extras: name prefixes of its own modules beside the policy in a checkpoint.
        sequences_per_example: ``cfg -> int``: sequences one example of a micro-batch becomes in its
            forward (PPO: ``samples_per_prompt`` rollouts); None: 2 for pairs, 1 otherwise.
    """

    config: type
    build: Callable[[Any, Any, Any], System]
    uses_loss: bool
    data: str | None
    samples: bool
    references: tuple[str, ...] | None
    check: Callable[[Any], None] = lambda cfg: None
    describe: Callable[[Any], str] = lambda cfg: f"system={cfg.system.kind}"
    family: Callable[[dict[str, Any]], tuple[str, str]] = lambda cfg: (cfg["system"]["kind"],) * 2
    shardable: bool = True
    steps_per_batch: Callable[[Any], int] = lambda cfg: 1
    manual_steps: bool = False
    classifier: bool = False
    checkpoint_extras: tuple[str, ...] = ()
    sequences_per_example: Callable[[Any], int] | None = None
