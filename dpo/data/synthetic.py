"""The bundled preference data set: short film reviews, written by this project.

Each prompt asks for a review of an invented film. The chosen response is a coherent positive
review that names the film; the rejected response is either a negative review or a degenerate one
(repetitive, off-topic). The task mirrors the paper's IMDB setting (prefer positive sentiment) at a
size a tiny model learns in a minute on a CPU, so the default run can show that DPO works.

The files under ``dpo/data/files/`` are the output of ``python -m dpo.data.synthetic``; a test
regenerates them and checks they are unchanged. :func:`labelled_reviews` gives labelled positive
and negative reviews from the same templates (the TF-IDF reward's default training text).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FILES_DIR = Path(__file__).parent / "files"
TRAIN_FILE = "reviews_train.jsonl"
VAL_FILE = "reviews_val.jsonl"

_TITLE_A = [
    "Silent",
    "Crimson",
    "Last",
    "Hidden",
    "Broken",
    "Golden",
    "Distant",
    "Midnight",
    "Paper",
    "Electric",
    "Frozen",
    "Wild",
    "Quiet",
    "Burning",
    "Northern",
    "Hollow",
    "Velvet",
    "Iron",
]
_TITLE_B = [
    "Harbor",
    "Garden",
    "Letter",
    "Station",
    "River",
    "Kingdom",
    "Summer",
    "Mirror",
    "Orchard",
    "Signal",
    "Voyage",
    "Lantern",
    "Island",
    "Promise",
    "Frontier",
    "Carnival",
    "Tide",
    "Archive",
]
_GENRES = ["drama", "comedy", "thriller", "western", "musical", "mystery", "romance", "war film"]
_ASPECTS = [
    "acting",
    "script",
    "score",
    "camera work",
    "pacing",
    "dialogue",
    "ending",
    "cast",
    "direction",
    "editing",
    "story",
    "lead performance",
]
_POS_ADJ = [
    "superb",
    "moving",
    "brilliant",
    "gripping",
    "wonderful",
    "beautiful",
    "sharp",
    "warm",
    "delightful",
    "powerful",
    "clever",
    "charming",
    "stunning",
    "heartfelt",
]
_NEG_ADJ = [
    "dull",
    "clumsy",
    "tedious",
    "flat",
    "lifeless",
    "awful",
    "messy",
    "bland",
    "shallow",
    "boring",
    "weak",
    "tiresome",
    "forgettable",
    "painful",
]
_POS_OPEN = [
    "{title} is a {adj} {genre}.",
    "I loved {title}.",
    "{title} is one of the best films of the year.",
    "What a {adj} {genre} {title} turned out to be.",
    "{title} left me smiling.",
]
_NEG_OPEN = [
    "{title} is a {adj} {genre}.",
    "I disliked {title}.",
    "{title} is one of the worst films of the year.",
    "What a {adj} {genre} {title} turned out to be.",
    "{title} left me bored.",
]
_POS_BODY = [
    "The {aspect} is {adj} and the {aspect2} is {adj2}.",
    "Every scene feels {adj}, and the {aspect} never lets go.",
    "The {aspect} is {adj}; I would happily watch it again.",
    "Its {aspect} is {adj} from start to finish.",
    "A {adj} {aspect} carries it, and the {aspect2} is {adj2} too.",
]
_NEG_BODY = [
    "The {aspect} is {adj} and the {aspect2} is {adj2}.",
    "Every scene feels {adj}, and the {aspect} falls apart.",
    "The {aspect} is {adj}; I would never watch it again.",
    "Its {aspect} is {adj} from start to finish.",
    "A {adj} {aspect} sinks it, and the {aspect2} is {adj2} too.",
]
_POS_CLOSE = ["Highly recommended.", "A must see.", "Go and see it.", "I will remember it.", ""]
_NEG_CLOSE = ["Not recommended.", "Skip it.", "A waste of time.", "I want my money back.", ""]
_PROMPTS = [
    'Write a short review of the {genre} "{title}".\n',
    'Review the {genre} "{title}" in a few sentences.\n',
    'What did you think of "{title}", the new {genre}?\n',
]


def _review(rng: random.Random, title: str, genre: str, positive: bool) -> str:
    adjs = _POS_ADJ if positive else _NEG_ADJ
    opener = rng.choice(_POS_OPEN if positive else _NEG_OPEN)
    aspects = rng.sample(_ASPECTS, 2)
    adj, adj2 = rng.sample(adjs, 2)
    sentences = [opener.format(title=title, adj=adj, genre=genre)]
    for body in rng.sample(_POS_BODY if positive else _NEG_BODY, rng.randint(1, 2)):
        adj, adj2 = rng.sample(adjs, 2)
        sentences.append(body.format(aspect=aspects[0], aspect2=aspects[1], adj=adj, adj2=adj2))
    sentences.append(rng.choice(_POS_CLOSE if positive else _NEG_CLOSE))
    return " ".join(s for s in sentences if s)


def _degenerate(rng: random.Random, title: str, genre: str) -> str:
    """A rejected response of the kind sampling from a weak model gives: loops and drift."""
    word = rng.choice(_ASPECTS + [title.split()[0], "film", "movie"])
    if rng.random() < 0.5:
        return " ".join([word] * rng.randint(6, 14)) + "."
    other = f"{rng.choice(_TITLE_A)} {rng.choice(_TITLE_B)}"
    return f"{other} {other} is a {genre}. The {genre} is a {genre} about a {genre}."


def make_rows(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` preference rows ``{"prompt", "chosen", "rejected"}``, deterministic in ``seed``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        title = f"The {rng.choice(_TITLE_A)} {rng.choice(_TITLE_B)}"
        genre = rng.choice(_GENRES)
        prompt = rng.choice(_PROMPTS).format(title=title, genre=genre)
        chosen = _review(rng, title, genre, positive=True)
        if rng.random() < 0.75:
            rejected = _review(rng, title, genre, positive=False)
        else:
            rejected = _degenerate(rng, title, genre)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def labelled_reviews(n: int, seed: int) -> list[dict[str, str | int]]:
    """``n`` short film reviews labelled 1 (positive) or 0 (negative), half each, deterministic in
    ``seed``: the default training text of the TF-IDF reward (``reward=tfidf``)."""
    rng = random.Random(seed)
    rows: list[dict[str, str | int]] = []
    for i in range(n):
        title = f"The {rng.choice(_TITLE_A)} {rng.choice(_TITLE_B)}"
        positive = i % 2 == 0
        rows.append({"text": _review(rng, title, rng.choice(_GENRES), positive), "label": int(positive)})
    return rows


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    """Write rows as UTF-8 JSON lines."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    """Regenerate the bundled files (train: 2000 pairs, validation: 256 pairs, disjoint seeds)."""
    FILES_DIR.mkdir(parents=True, exist_ok=True)
    write_jsonl(make_rows(2000, seed=0), FILES_DIR / TRAIN_FILE)
    write_jsonl(make_rows(256, seed=1), FILES_DIR / VAL_FILE)


if __name__ == "__main__":
    main()
