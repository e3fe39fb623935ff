"""NusaX-Senti: three-way sentiment in Indonesian, English and 10 local languages.

Sources: the copy bundled with this package (default, offline; CC BY-SA 4.0, Winata et al.,
EACL 2023), a local folder with the same layout (``<language>/{train,valid,test}.csv``, columns
``id,text,label``), or ``data_dir="hub"`` for ``indonlp/NusaX-senti`` through ``datasets``.
"""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

from ctsft_lens.errors import TaskError
from ctsft_lens.tasks.base import Example, Task

LABELS = ("negative", "neutral", "positive")
LABEL_WORDS = (" negative", " neutral", " positive")
TEMPLATE = "Text: {text}\nSentiment:"
HUB_NAME = "indonlp/NusaX-senti"
LANGUAGES = {  # name -> code used on the hub
    "acehnese": "ace", "balinese": "ban", "banjarese": "bjn", "buginese": "bug",
    "english": "eng", "indonesian": "ind", "javanese": "jav", "madurese": "mad",
    "minangkabau": "min", "ngaju": "nij", "sundanese": "sun", "toba_batak": "bbc",
}
SPLITS = ("train", "valid", "test")


def bundled_dir() -> Path:
    """Folder of the NusaX-Senti copy shipped inside the package."""
    return Path(str(resources.files("ctsft_lens") / "data" / "nusax_senti"))


def texts(split: str = "train", data_dir: str | Path | None = None) -> dict[str, dict[str, str]]:
    """Unlabelled text of one split for every language, ``{language: {row id: text}}``.

    What the offline tiny tokenizer and the default model are trained on (train split only, so
    no evaluation text reaches them); read through the same files as :func:`load`.
    """
    root = bundled_dir() if data_dir is None else Path(data_dir).expanduser()
    out: dict[str, dict[str, str]] = {}
    for lang in sorted(LANGUAGES):
        with open(root / lang / f"{split}.csv", newline="", encoding="utf-8") as f:
            out[lang] = {r["id"]: r["text"] for r in csv.DictReader(f)}
    return out


def canonical_language(language: str) -> str:
    """The canonical key of a language given by name or code; TaskError if unknown."""
    lang = language.lower().replace("-", "_").replace(" ", "_")
    codes = {v: k for k, v in LANGUAGES.items()}
    lang = codes.get(lang, lang)
    if lang not in LANGUAGES:
        raise TaskError(f"unknown NusaX-Senti language {language!r}; choose from {sorted(LANGUAGES)}")
    return lang


def load(language: str, data_dir: str | Path | None = None) -> Task:
    """Load one language (see the module docstring for sources); use ``tasks.load_task``."""
    lang = canonical_language(language)
    if data_dir == "hub":
        splits, source = _from_hub(lang), f"hub:{HUB_NAME}"
    else:
        root = bundled_dir() if data_dir is None else Path(data_dir).expanduser()
        splits, source = _from_folder(root, lang), str(root)
    return Task("nusax-senti", lang, LABELS, LABEL_WORDS, splits, source)


def _row(text: str, label: str, lang: str, uid: str, where: str) -> Example:
    if label not in LABELS:
        raise TaskError(f"{where}: unknown label {label!r} (expected one of {LABELS})")
    return Example(TEMPLATE.format(text=text.strip()), LABELS.index(label), lang, LABEL_WORDS, LABELS, uid,
                   TEMPLATE, (("text", text.strip()),))


def _from_folder(root: Path, lang: str) -> dict[str, tuple[Example, ...]]:
    if not root.is_dir():
        raise TaskError(f"NusaX-Senti data folder {root} does not exist")
    folder = root / lang
    if not folder.is_dir():
        raise TaskError(f"NusaX-Senti folder {root} has no language folder {lang!r}")
    splits = {}
    for split in SPLITS:
        path = folder / f"{split}.csv"
        if not path.exists():
            raise TaskError(f"missing NusaX-Senti file {path}")
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                    raise TaskError(f"{path} must have columns id,text,label; it has {reader.fieldnames}")
                splits[split] = tuple(_row(r["text"], r["label"], lang, f"{lang}/{split}/{r.get('id', i)}", str(path))
                                      for i, r in enumerate(reader))
        except UnicodeDecodeError as err:
            raise TaskError(f"{path} is not UTF-8 ({err.reason} at byte {err.start}); save it as UTF-8") from None
    return splits


def _from_hub(lang: str) -> dict[str, tuple[Example, ...]]:
    from ctsft_lens import hub

    try:
        ds = hub.load_dataset(HUB_NAME, LANGUAGES[lang])
    except Exception as err:  # network, missing cache, renamed dataset: one clear line
        raise TaskError(f"could not load {HUB_NAME} ({LANGUAGES[lang]}) from the hub: {err}") from None
    out = {}
    for split, hub_split in zip(SPLITS, ("train", "validation", "test")):
        part = ds[hub_split]
        names = getattr(part.features["label"], "names", None)
        out[split] = tuple(
            _row(r["text"], names[r["label"]] if names else r["label"], lang, f"{lang}/{split}/{r.get('id', i)}", HUB_NAME)
            for i, r in enumerate(part)
        )
    return out
