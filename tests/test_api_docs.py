"""The public API documents itself, and the README example runs as written."""

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import ctsft_lens

ROOT = Path(__file__).resolve().parents[1]


def _public_objects():
    for info in pkgutil.walk_packages(ctsft_lens.__path__, "ctsft_lens."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield f"{module.__name__}.{name}", obj


def test_every_public_function_and_class_has_a_docstring():
    missing = [name for name, obj in _public_objects() if not (obj.__doc__ or "").strip()]
    assert not missing, missing


def test_api_doc_mentions_every_exported_name():
    """Each exported name appears as code (`name` or `name(`), not merely as a substring of prose."""
    text = (ROOT / "docs" / "api.md").read_text()
    for module in ("ctsft_lens", "ctsft_lens.cdt", "ctsft_lens.scoring", "ctsft_lens.train"):
        for name in importlib.import_module(module).__all__:
            assert re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", _code(text)), f"{module}.{name} missing from docs/api.md"


def _code(markdown: str) -> str:
    """The code of a markdown page: fenced blocks and inline `spans` only."""
    blocks = re.findall(r"```.*?\n(.*?)```", markdown, re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", markdown, flags=re.S))
    return "\n".join(blocks + spans)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## In Python\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "readme" / "mask.json").exists()
