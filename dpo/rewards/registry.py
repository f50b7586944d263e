"""Ground-truth reward functions: text in, one float per text out.

The IMDB experiment scores completions with a sentiment reward. ``conf/reward/<name>.yaml`` picks one:

* ``vader``: VADER's compound score in [-1, 1] (``vaderSentiment``, MIT; its lexicon ships in the
  wheel, so it works offline). Fast and crude: it reads words, not reviews.
* ``tfidf``: a TF-IDF + logistic-regression sentiment classifier trained in seconds with
  scikit-learn on labelled reviews; the reward is the positive-class log-odds (or probability).
  The labelled text comes from a local JSONL file (``reward.train_file``, ``{"text", "label"}``)
  or, by default, from this project's own review templates; no third-party code runs to get it.
* ``hf_classifier``: a Hugging Face sequence classifier (paper: ``siebert/sentiment-roberta-large-english``);
  the reward is the positive class's logit, its probability or the logit margin over the other class.
* ``learned_rm``: a reward model this project trained on preference pairs (``dpo-train
  system=reward_model``, RLHF's reward model), scored as its training scored (:mod:`dpo.rewards.learned`).

Every reward is built by :func:`build_reward` from its config and called as ``reward(texts)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from dpo.runtime.io import DataError, read_jsonl
from dpo.runtime.log import get_logger

log = get_logger(__name__)

Reward = Callable[[list[str]], list[float]]
"""A batch of texts to one float each (higher is better)."""

REWARDS: dict[str, Callable[..., Reward]] = {}


def register(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    def wrap(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        REWARDS[name] = factory
        return factory

    return wrap


def build_reward(name: str, **params: Any) -> Reward:
    """The reward ``name`` built with its config ``params`` (``conf/reward/<name>.yaml`` less ``name``)."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
    return REWARDS[name](**params)


def reward_from_config(config: Mapping[str, Any]) -> Reward:
    """The reward a ``conf/reward`` node (a mapping with ``name``) describes."""
    params = {str(k): v for k, v in config.items()}
    return build_reward(params.pop("name"), **params)


@register("vader")
def vader() -> Reward:
    """VADER compound sentiment in [-1, 1]."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return lambda texts: [analyzer.polarity_scores(t)["compound"] for t in texts]


def read_labelled(path: str | Path) -> tuple[list[str], list[int]]:
    """``{"text", "label"}`` JSONL (label 1 positive, 0 negative), checked row by row
    (:func:`dpo.runtime.io.read_jsonl`)."""
    rows = read_jsonl(path, {"text": str, "label": int})
    for i, row in enumerate(rows, 1):
        if not row["text"].strip() or row["label"] not in (0, 1):
            raise DataError(f"{path}: row {i}: 'text' must be a non-empty string and 'label' 0 or 1")
    labels = [row["label"] for row in rows]
    if len(set(labels)) < 2:
        raise DataError(f"{path}: needs both positive (1) and negative (0) rows")
    return [row["text"] for row in rows], labels


@register("tfidf")
def tfidf(train_file: str | None = None, output: str = "logit", seed: int = 0) -> Reward:
    """TF-IDF (word 1-2 grams) + logistic regression; reward = positive-class log-odds or probability.

    Args:
        train_file: ``{"text", "label"}`` JSONL of labelled text (e.g. IMDB reviews); None: 2000
            labelled reviews from this project's review templates (:func:`dpo.data.synthetic.labelled_reviews`),
            a small corpus that knows the templates' sentiment words and little else.
        output: ``logit`` (log-odds, unbounded) or ``prob`` (in [0, 1]).
        seed: seed of the held-out split used to report the classifier's accuracy.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    if output not in ("logit", "prob"):
        raise ValueError(f"reward.output must be logit or prob, got {output!r}")
    if train_file is None:
        from dpo.data.synthetic import labelled_reviews

        rows = labelled_reviews(2000, seed=2)
        texts, labels, path = [r["text"] for r in rows], [r["label"] for r in rows], "dpo.data.synthetic"
    else:
        texts, labels = read_labelled(train_file)
        path = train_file
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    cut = max(1, len(order) // 10)
    held, fit = order[:cut], order[cut:]
    clf = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2 if len(texts) > 200 else 1, sublinear_tf=True),
        LogisticRegression(C=4.0, max_iter=2000),
    )
    clf.fit([texts[i] for i in fit], [labels[i] for i in fit])
    accuracy = clf.score([texts[i] for i in held], [labels[i] for i in held])
    log.info(f"tfidf reward: {len(fit)} training texts from {path}, held-out accuracy {accuracy:.3f}")

    def score(batch: list[str]) -> list[float]:
        if output == "prob":
            return clf.predict_proba(batch)[:, 1].tolist()
        return clf.decision_function(batch).tolist()

    return score


class ClassifierReward:
    """A sequence classifier's score for one class, batched; ``to(device)`` places it (each rank its own)."""

    def __init__(self, tokenizer: Any, model: Any, index: int, output: str, batch_size: int, max_length: int) -> None:
        self.tokenizer, self.model, self.index, self.output = tokenizer, model.eval(), index, output
        self.batch_size, self.max_length = batch_size, max_length
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> ClassifierReward:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size], padding=True, truncation=True, max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)  # fmt: skip
            logits = self.model(**enc).logits.float()  # (N, C)
            out += classifier_reward(logits, self.index, self.output).tolist()
        return out


@register("hf_classifier")
def hf_classifier(
    pretrained: str,
    positive_label: str | int = "POSITIVE",
    output: str = "prob",
    batch_size: int = 32,
    max_length: int = 512,
    device: str = "auto",
    revision: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
) -> ClassifierReward:
    """A Hugging Face sequence classifier's score for the positive class.

    Args:
        pretrained: hub id or local directory (paper: ``siebert/sentiment-roberta-large-english``).
        positive_label: the positive class's name in ``config.id2label`` or its index.
        output: ``prob`` (the softmax probability of the positive class: the paper's IMDB reward,
            whose Fig. 2 axis runs between about 0.4 and 1), ``logit`` (the positive logit; pairs
            ranked by it are not ranked as by the probability) or ``margin`` (positive logit minus
            the largest other logit).
        device: ``auto``: built on the CPU and placed by its user (the evaluation callback puts it
            on its rank's device; ``dpo-score`` on the GPU if there is one); or a device name.
        token: hub token for a gated model; give it as ``${oc.env:HF_TOKEN}``, never literally
            (dpo.config.validate refuses literal secrets); None uses the environment's login.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dpo.models.load import hub_kwargs

    if output not in ("logit", "prob", "margin"):
        raise ValueError(f"reward.output must be logit, prob or margin, got {output!r}")
    kwargs = hub_kwargs(pretrained, revision, what="reward classifier", key="reward.pretrained") | {
        "trust_remote_code": trust_remote_code, **({"token": token} if token else {}),
    }  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(pretrained, **kwargs)
    model = AutoModelForSequenceClassification.from_pretrained(pretrained, **kwargs)
    index = positive_index(model.config.id2label, positive_label)
    reward = ClassifierReward(tokenizer, model, index, output, batch_size, max_length)
    return reward if device == "auto" else reward.to(device)


@register("learned_rm")
def learned_rm(path: str, batch_size: int = 32, max_length: int | None = None, device: str = "auto") -> Any:
    """A learned reward model's scalar score of prompt + completion (:class:`dpo.rewards.learned.LearnedReward`).

    Args:
        path: the ``hf`` export of a ``dpo-train system=reward_model`` run.
        max_length: most tokens scored (a longer text keeps its end); None: no limit.
        device: ``auto``: placed by its user (the evaluation callback, ``dpo-score``); or a device name.
    """
    from dpo.rewards.learned import LearnedReward

    reward = LearnedReward(path, batch_size, max_length)
    return reward if device == "auto" else reward.to(device)


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU (a single process's device, e.g. ``dpo-score``'s)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def positive_index(id2label: dict[int, str], positive: str | int) -> int:
    """Index of the positive class, by name (case-insensitive) or index."""
    if isinstance(positive, int):
        if positive not in id2label:
            raise ValueError(f"reward.positive_label {positive} is not a class index of {id2label}")
        return positive
    for i, name in id2label.items():
        if str(name).lower() == str(positive).lower():
            return int(i)
    raise ValueError(f"reward.positive_label {positive!r} not among the classifier's labels {id2label}")


def classifier_reward(logits: torch.Tensor, index: int, output: str) -> torch.Tensor:
    """(N, C) classifier logits to (N,) rewards for class ``index``: its logit, probability or margin."""
    if output == "logit":
        return logits[:, index]
    if output == "prob":
        return logits.softmax(-1)[:, index]
    others = torch.cat([logits[:, :index], logits[:, index + 1 :]], dim=1)  # (N, C-1)
    return logits[:, index] - others.max(-1).values
