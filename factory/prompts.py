"""Prompt sources for text-driven backbones: where the prompts of a build come from.

    text file      one prompt per line (blank lines and lines starting with '#' are skipped)
    JSONL          one object per line with a "prompt" key and optionally "classes" (a list of names)
    Parquet        a "prompt" column and optionally a "classes" column (list of strings)
    template       "a photo of a {attribute} {class}" expanded over class names x attribute lists,
                   shuffled with a fixed seed

Every source yields the same rows, `Prompt(index, text, classes)`, in a fixed order, so a prompt's row
index is as stable an identity as a seed. Bad rows are reported together, each with its file and line
(or row), and nothing is returned unless all rows are good.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from dataclasses import dataclass, field

from factory import storage


class PromptError(ValueError):
    """A prompt source has bad rows; the message lists each with its file and line or row."""


@dataclass(frozen=True)
class Prompt:
    index: int
    text: str
    classes: tuple[str, ...] = field(default_factory=tuple)


def _check(rows: list[tuple[str, object, object]], source: str, known: list[str] | None,
           problems: list[str] | None = None) -> list[Prompt]:
    """rows: (where, text, classes) -> prompts, or PromptError naming every bad row (with any
    `problems` the caller found while parsing)."""
    problems, prompts = list(problems or []), []
    for where, text, classes in rows:
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{where}: empty or missing prompt")
            continue
        if classes is None:
            classes = ()
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
            problems.append(f"{where}: classes must be a list of names, got {classes!r}")
            continue
        unknown = [c for c in classes if known is not None and c not in known]
        if unknown:
            problems.append(f"{where}: unknown classes {unknown} (labels are {known})")
            continue
        prompts.append(Prompt(len(prompts), text.strip(), tuple(classes)))
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise PromptError(f"{source}: {len(problems)} bad prompt rows: {shown}")
    if not prompts:
        raise PromptError(f"{source}: no prompts")
    return prompts


def from_text(url: str, known_classes: list[str] | None = None) -> list[Prompt]:
    lines = storage.read_bytes(url).decode("utf-8").splitlines()
    rows = [(f"{url}:{n}", line, None) for n, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")]
    return _check(rows, url, known_classes)


def from_jsonl(url: str, known_classes: list[str] | None = None) -> list[Prompt]:
    rows, problems = [], []
    for n, line in enumerate(storage.read_bytes(url).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{url}:{n}: not JSON ({e.msg})")
            continue
        if not isinstance(obj, dict) or "prompt" not in obj:
            problems.append(f"{url}:{n}: no \"prompt\" key")
            continue
        rows.append((f"{url}:{n}", obj["prompt"], obj.get("classes")))
    return _check(rows, url, known_classes, problems)


def from_parquet(url: str, known_classes: list[str] | None = None) -> list[Prompt]:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    if "prompt" not in table.column_names:
        raise PromptError(f"{url}: no 'prompt' column (columns: {table.column_names})")
    texts = table.column("prompt").to_pylist()
    classes = table.column("classes").to_pylist() if "classes" in table.column_names else [None] * len(texts)
    return _check([(f"{url} row {i}", t, c) for i, (t, c) in enumerate(zip(texts, classes))], url, known_classes)


def from_template(template: str, classes: list[str], attributes: dict[str, list[str]], seed: int = 0,
                  limit: int | None = None) -> list[Prompt]:
    """`template` with `{class}` and one `{name}` per attribute list, over every combination,
    shuffled with `seed`; each prompt's classes are the one it names."""
    names = list(attributes)
    missing = [n for n in ["class", *names] if "{" + n + "}" not in template]
    if missing:
        raise PromptError(f"template {template!r} lacks the placeholders {['{' + m + '}' for m in missing]}")
    if not classes or any(not attributes[n] for n in names):
        raise PromptError("template expansion needs at least one class and one value per attribute")
    combos = list(itertools.product(classes, *(attributes[n] for n in names)))
    random.Random(seed).shuffle(combos)
    rows = [(f"template combination {i}", template.format(**{"class": c[0], **dict(zip(names, c[1:]))}), [c[0]])
            for i, c in enumerate(combos[:limit])]
    return _check(rows, "template", classes)


def load(url: str, known_classes: list[str] | None = None) -> list[Prompt]:
    """Prompts from a file, chosen by extension: .txt, .jsonl, .parquet."""
    ext = os.path.splitext(url)[1].lower()
    readers = {".txt": from_text, ".jsonl": from_jsonl, ".parquet": from_parquet}
    if ext not in readers:
        raise PromptError(f"{url}: unknown prompt file type {ext!r}; use .txt, .jsonl or .parquet")
    return readers[ext](url, known_classes)
