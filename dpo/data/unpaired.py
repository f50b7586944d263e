"""KTO's rows: unpaired (prompt, completion, label) examples, each with a mismatched completion for
the KL reference point (Ethayarajh et al. 2024, arXiv 2402.01306, Sec. 4.1).

A KTO example travels as a :class:`~dpo.data.sources.PreferenceRow` whose ``chosen`` is its
completion, whose ``rejected`` is the mismatched completion (another example's, under this prompt)
and whose ``label`` says desirable or not; so it tokenizes, lays out and scores as a pair does
(:func:`dpo.maths.logprobs.scored_logps`: ``chosen`` the completion, ``rejected`` the KL term).
"""

from __future__ import annotations

from dataclasses import replace

from dpo.data.sources import PreferenceRow
from dpo.runtime.io import DataError


def unpaired(rows: list[PreferenceRow]) -> list[PreferenceRow]:
    """Labelled rows in their order; each preference pair as a desirable row (its chosen response)
    followed by an undesirable one (its rejected response).

    TRL 1.16's ``unpair_preference_dataset`` puts every chosen response first, then every rejected
    one; we interleave them, so every chunk of :func:`with_kl_completions` and every contiguous
    evaluation batch holds both kinds: in one-kind batches the KL reference point came from that
    kind's completions alone (a desirable batch's z rose with the desirable completions' likelihood,
    which showed as a held-out accuracy of 0.06 after 20 steps of the loss zoo's first KTO run).

    Raises:
        DataError: a row with one response and no label (SFT data), naming it.
    """
    out = []
    for row in rows:
        if row.label is not None:
            out.append(row)
        elif row.rejected is not None:
            undesirable = replace(row, chosen=row.rejected, rejected=None, label=False)
            out += [replace(row, rejected=None, label=True), undesirable]
        else:
            raise DataError(f"{row.where}: KTO trains on labelled completions or on preference pairs; this row has "
                            "one response and no label (an SFT source?)")  # fmt: skip
    return out


def with_kl_completions(rows: list[PreferenceRow], chunk: int) -> list[PreferenceRow]:
    """Each row with a mismatched completion in ``rejected``: within consecutive chunks of ``chunk``
    rows (the datamodule's: a global batch, the same on any number of ranks), the completion of the
    row before it, the first taking the chunk's last (TRL 1.16's rotation ``(x_1, y_n), (x_2, y_1),
    ...``), skipping back past rows of the same prompt so the pair is mismatched as the paper asks (a
    chunk of one prompt keeps the plain rotation)."""
    out = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        for i, row in enumerate(part):
            back = next((k for k in range(1, len(part)) if part[i - k].prompt != row.prompt), 1)
            out.append(replace(row, rejected=part[i - back].chosen))
    return out
