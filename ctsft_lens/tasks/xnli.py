"""XNLI: natural-language inference in 15 languages (CC BY-NC 4.0; not bundled).

Sources: ``data_dir=None`` loads ``facebook/xnli`` from the hub (train/validation/test). A local
folder is read in one of two layouts:

* ``dev-<lang>.tsv`` (the XTREME layout of ``shared/data/xnli``: premise, hypothesis, label, no
  header). Only the labelled dev split exists there, so it is cut **by line index, the same way
  for every language** (the files are parallel): lines ``[0, 1490)`` train pool, ``[1490, 1990)``
  valid, ``[1990, 2490)`` test. Translations of a training pair never reach an evaluation split.
* ``{train,valid,test}-<lang>.tsv``: the same three columns, one file per split.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ctsft_lens.errors import TaskError
from ctsft_lens.tasks.base import Example, Task

LABELS = ("entailment", "neutral", "contradiction")
LABEL_WORDS = (" True", " Neither", " False")
TEMPLATE = "Premise: {premise}\nHypothesis: {hypothesis}\nTrue, False, or Neither? Answer:"
HUB_NAME = "facebook/xnli"
LANGUAGES = {
    "ar": "arabic", "bg": "bulgarian", "de": "german", "el": "greek", "en": "english",
    "es": "spanish", "fr": "french", "hi": "hindi", "ru": "russian", "sw": "swahili",
    "th": "thai", "tr": "turkish", "ur": "urdu", "vi": "vietnamese", "zh": "chinese",
}
DEV_CUTS = {"train": (0, 1490), "valid": (1490, 1990), "test": (1990, 2490)}


def canonical_language(language: str) -> str:
    """The canonical key of a language given by name or code; TaskError if unknown."""
    lang = language.lower()
    names = {v: k for k, v in LANGUAGES.items()}
    lang = names.get(lang, lang)
    if lang not in LANGUAGES:
        raise TaskError(f"unknown XNLI language {language!r}; choose from {sorted(LANGUAGES)} (or their names)")
    return lang


def load(language: str, data_dir: str | Path | None = None) -> Task:
    """Load one language (see the module docstring for sources); use ``tasks.load_task``."""
    lang = canonical_language(language)
    if data_dir is None or data_dir == "hub":
        splits, source = _from_hub(lang), f"hub:{HUB_NAME}"
    else:
        root = Path(data_dir).expanduser()
        splits, source = _from_folder(root, lang), str(root)
    return Task("xnli", lang, LABELS, LABEL_WORDS, splits, source)


def _example(premise: str, hypothesis: str, label: str, lang: str, uid: str, where: str) -> Example:
    if label not in LABELS:
        raise TaskError(f"{where}: unknown label {label!r} (expected one of {LABELS})")
    fields = (("premise", premise.strip()), ("hypothesis", hypothesis.strip()))
    return Example(TEMPLATE.format(**dict(fields)), LABELS.index(label), lang, LABEL_WORDS, LABELS, uid, TEMPLATE, fields)


def _read_tsv(path: Path, lang: str, split: str) -> list[Example]:
    """Rows of one TSV; ids ``xnli/<lang>/<split>/<line index>`` are unique across split files
    (``split="dev"`` for the one-file layout, whose line index is shared by every language)."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for i, cols in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)):
                if len(cols) != 3:
                    raise TaskError(f"{path}:{i + 1}: expected 3 tab-separated columns (premise, hypothesis, label), got {len(cols)}")
                rows.append(_example(*cols, lang, f"xnli/{lang}/{split}/{i}", f"{path}:{i + 1}"))
    except UnicodeDecodeError as err:
        raise TaskError(f"{path} is not UTF-8 ({err.reason} at byte {err.start}); save it as UTF-8") from None
    return rows


def _from_folder(root: Path, lang: str) -> dict[str, tuple[Example, ...]]:
    if not root.is_dir():
        raise TaskError(f"XNLI data folder {root} does not exist")
    per_split = {s: root / f"{s}-{lang}.tsv" for s in DEV_CUTS}
    if all(p.exists() for p in per_split.values()):
        return {s: tuple(_read_tsv(p, lang, s)) for s, p in per_split.items()}
    dev = root / f"dev-{lang}.tsv"
    if not dev.exists():
        raise TaskError(f"XNLI folder {root} has neither dev-{lang}.tsv nor {{train,valid,test}}-{lang}.tsv")
    rows = _read_tsv(dev, lang, "dev")
    return {s: tuple(rows[a:b]) for s, (a, b) in DEV_CUTS.items()}


def _from_hub(lang: str) -> dict[str, tuple[Example, ...]]:
    from ctsft_lens import hub

    try:
        ds = hub.load_dataset(HUB_NAME, lang)
    except Exception as err:
        raise TaskError(f"could not load {HUB_NAME} ({lang}) from the hub: {err}; "
                        f"pass data_dir= a folder of dev-<lang>.tsv files instead") from None
    out = {}
    for split, hub_split in (("train", "train"), ("valid", "validation"), ("test", "test")):
        out[split] = tuple(
            _example(r["premise"], r["hypothesis"], LABELS[r["label"]], lang, f"xnli/{lang}/{split}/{i}", HUB_NAME)
            for i, r in enumerate(ds[hub_split])
        )
    return out
