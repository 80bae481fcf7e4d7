"""Prompt sources for text-driven backbones: where the prompts of a build come from.

    text file      one prompt per line, UTF-8 (a byte order mark is dropped); lines end at \n or \r\n
                   only; blank lines and lines whose first non-blank character is '#' (comments)
                   are skipped
    JSONL          one object per line with a "prompt" key and optionally "classes" (a list of names)
    Parquet        a "prompt" column and optionally a "classes" column (list of strings)
    template       "a photo of a {attribute} {class}" expanded over class names x attribute lists,
                   shuffled with a fixed seed
    endpoint       an OpenAI-compatible chat API writes `num_prompts` prompts, each with the classes it
                   shows, once per dataset (`resolve` reuses them from the dataset's folder)

Every source yields the same rows, `Prompt(index, text, classes)`, in a fixed order, so a prompt's row
index is as stable an identity as a seed. Bad rows are reported together, each with its file and line
(or row), and nothing is returned unless all rows are good.

A build's prompts live next to its dataset: `<output>/prompts.jsonl` (`write_jsonl`, read back by
`from_jsonl`) and, for endpoint prompts, `<output>/prompts.request.json`: the request that wrote them
(endpoint, model, num_prompts, seed, classes; never the key) and the sha256 of the file it vouches
for. `factory generate` and `factory prompts expand` both do

    prompts, fresh = resolve(cfg, classes, output)
    store(prompts, fresh, cfg, classes, output)  # the file, then the record that vouches for it

so a rebuild (a resume, a retry) never asks the endpoint again, and a changed request always does.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import string
import unicodedata
from dataclasses import dataclass, field

from factory import storage, textfile
from factory.config import PromptsConfig
from factory.config.checks import classes_hint

log = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.jsonl"
"""A build's prompts, next to its dataset: `<output>/prompts.jsonl`."""
REQUEST_FILE = "prompts.request.json"
"""The endpoint request that wrote `PROMPTS_FILE` (endpoint, model, num_prompts, seed, classes)."""
BACKGROUND = "background"
"""The label no prompt is written about: left out of template expansion and endpoint requests."""
BATCH_SIZE = 50
"""Prompts asked for per chat request: long replies are slow and more often cut off."""
MAX_FRUITLESS_REQUESTS = 3
"""Requests in a row that add no new prompt before `expand_with_endpoint` gives up."""


class PromptError(ValueError):
    """A prompt source has bad rows; the message lists each with its file and line or row."""


@dataclass(frozen=True)
class Prompt:
    index: int
    text: str
    classes: tuple[str, ...] = field(default_factory=tuple)
    where: str = field(default="", compare=False)
    """Where the row came from, for messages (`prompts.txt:7`, `p.parquet row 3`); not part of its identity."""


def _visible(text: str) -> bool:
    """Whether `text` shows anything: not only spaces, zero-width or control characters."""
    return any(not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf", "Zs", "Zl", "Zp") for c in text)


def _check(rows: list[tuple[str, object, object]], source: str, known: list[str] | None,
           problems: list[str] | None = None) -> list[Prompt]:
    """rows: (where, text, classes) -> prompts, or PromptError naming every bad row (with any
    `problems` the caller found while parsing)."""
    problems, prompts = list(problems or []), []
    for where, text, classes in rows:
        if text is not None and not isinstance(text, str):
            problems.append(f"{where}: the prompt is not text, got {type(text).__name__} {text!r}")
            continue
        if text is None or not text.strip():
            problems.append(f"{where}: empty or missing prompt")
            continue
        if not _visible(text):
            shown = " ".join(f"U+{ord(c):04X}" for c in dict.fromkeys(text.strip()))
            problems.append(f"{where}: the prompt has no visible characters (only {shown})")
            continue
        if classes is None:
            classes = ()
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
            problems.append(f"{where}: classes must be a list of names, got {classes!r}")
            continue
        unknown = [c for c in classes if known is not None and c not in known]
        if unknown:
            problems.append(f"{where}: unknown classes {unknown} ({classes_hint(known, unknown)})")
            continue
        prompts.append(Prompt(len(prompts), text.strip(), tuple(classes), where))
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise PromptError(f"{source}: {len(problems)} bad prompt rows: {shown}")
    if not prompts:
        raise PromptError(f"{source}: no prompts")
    return prompts


def describe_source(cfg: PromptsConfig) -> str:
    """Where the build's prompts come from, for messages (rows are numbered in it)."""
    return cfg.source or (f"prompts from {cfg.endpoint}" if cfg.endpoint else f"prompts.template {cfg.template!r}")


def _lines(url: str) -> list[str]:
    """The lines of a UTF-8 text file (a byte order mark dropped), split at \n and \r\n only:
    str.splitlines would also split at U+2028, U+0085 and form feeds, which a prompt may hold."""
    try:
        content = textfile.decode(storage.read_bytes(url), url)
    except textfile.NotText as e:
        raise PromptError(str(e)) from None
    return [line.removesuffix("\r") for line in content.split("\n")]


def from_text(url: str, known_classes: list[str] | None = None) -> list[Prompt]:
    """One prompt per line; blank lines and comments (lines whose first non-blank character is '#')
    are skipped, so a prompt cannot start with '#'."""
    rows = [(f"{url}:{n}", line, None) for n, line in enumerate(_lines(url), 1)
            if line.strip() and not line.lstrip().startswith("#")]
    return _check(rows, url, known_classes)


def from_jsonl(url: str, known_classes: list[str] | None = None) -> list[Prompt]:
    rows, problems = [], []
    for n, line in enumerate(_lines(url), 1):
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError)):
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PromptError(f"{url}: not a readable Parquet file ({reason})") from None
    if "prompt" not in table.column_names:
        raise PromptError(f"{url}: no 'prompt' column (columns: {table.column_names})")
    texts = table.column("prompt").to_pylist()
    classes = table.column("classes").to_pylist() if "classes" in table.column_names else [None] * len(texts)
    return _check([(f"{url} row {i}", t, c) for i, (t, c) in enumerate(zip(texts, classes))], url, known_classes)


def from_template(template: str, classes: list[str], attributes: dict[str, list[str]], seed: int = 0,
                  limit: int | None = None) -> list[Prompt]:
    """`template` with one `{name}` per attribute list, and optionally `{class}`, over every
    combination, shuffled with `seed`; each prompt's classes are the one it names (none without
    `{class}`: a scene whose parts are all the classes, like a face)."""
    names = list(attributes)
    fields = _template_fields(template, names)
    missing = [n for n in names if n not in fields]
    if missing:
        raise PromptError(f"template {template!r} lacks the placeholders {['{' + m + '}' for m in missing]}")
    with_class = "class" in fields
    if not names and not with_class:
        raise PromptError(f"template {template!r} has no placeholders: give it {{class}} or attribute lists")
    if (with_class and not classes) or any(not attributes[n] for n in names):
        raise PromptError("template expansion needs at least one class and one value per attribute")
    combos = list(itertools.product(classes if with_class else [None], *(attributes[n] for n in names)))
    random.Random(seed).shuffle(combos)
    rows = [(f"template combination {i}", template.format(**{"class": c[0], **dict(zip(names, c[1:]))}),
             [c[0]] if with_class else None)
            for i, c in enumerate(combos[:limit])]
    return _check(rows, "template", classes)


def _template_fields(template: str, names: list[str]) -> set[str]:
    """The fields `template` fills, parsed as `str.format` reads it (`{{x}}` is a literal brace, not a
    field); a field that is not `{class}` or an attribute name, a positional one (`{}`, `{0}`) or one
    with a conversion or format spec is refused, naming it."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise PromptError(f"template {template!r}: {e}; write a literal brace as {{{{ or }}}}") from None
    fields = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if name == "" or name.isdigit():
            raise PromptError(f"template {template!r}: positional field {shown}; name {{class}} or an attribute "
                              f"of prompts.attributes {names}")
        if name != "class" and name not in names:
            raise PromptError(f"template {template!r}: unknown field {shown}; it fills {{class}} and the "
                              f"prompts.attributes names {names}")
        if spec or conversion:
            raise PromptError(f"template {template!r}: field {shown} has a conversion or format spec; write {{{name}}}")
        fields.add(name)
    return fields


def load(url: str, known_classes: list[str] | None = None) -> list[Prompt]:
    """Prompts from a file, chosen by extension: .txt, .jsonl, .parquet."""
    ext = os.path.splitext(url)[1].lower()
    readers = {".txt": from_text, ".jsonl": from_jsonl, ".parquet": from_parquet}
    if ext not in readers:
        raise PromptError(f"{url}: unknown prompt file type {ext!r}; use .txt, .jsonl or .parquet")
    return readers[ext](url, known_classes)


def to_jsonl(prompts: list[Prompt]) -> bytes:
    """One {"classes", "prompt"} object per line, UTF-8; `from_jsonl` reads the same rows back."""
    lines = [json.dumps({"classes": list(p.classes), "prompt": p.text}, ensure_ascii=False, sort_keys=True)
             for p in prompts]
    text = "".join(line + "\n" for line in lines)
    # JSON leaves these unescaped, but str.splitlines (in other readers of the file) breaks lines at them
    for char in ("\x85", "\u2028", "\u2029"):
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text.encode("utf-8")


def write_jsonl(prompts: list[Prompt], url: str) -> None:
    """`to_jsonl`, written atomically."""
    storage.write_bytes(url, to_jsonl(prompts))


# ---- prompts written by a chat model -------------------------------------------------------------

_INSTRUCTIONS = (
    "You write prompts for a text-to-image model; its images become a labeled training set. "
    "Reply with one JSON object per line and nothing else (no numbering, no prose): "
    '{"prompt": "...", "classes": ["..."]}. In "classes" list exactly the class names the image '
    "shows, spelled as given; use no other names."
)
_EARLIER_SHOWN = 100
"""Earlier prompts quoted back in a request, so later batches do not repeat them."""


def _request_text(classes: list[str], count: int, batch: int, earlier: list[str]) -> str:
    lines = [f"Class names: {json.dumps(classes, ensure_ascii=False)}",
             f"Write {count} new, diverse image-generation prompts (batch {batch}). Vary the scenes, "
             "viewpoints, lighting, styles and which of the classes appear together."]
    if earlier:
        lines += ["Do not repeat any of these earlier prompts:", *earlier[-_EARLIER_SHOWN:]]
    return "\n".join(lines)


def _one_line(text: object, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_line(line: str, by_name: dict[str, str]) -> tuple[str, tuple[str, ...]] | None:
    """(text, classes) of one reply line, or None when it is not a usable prompt row."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    text, names = obj.get("prompt"), obj.get("classes")
    if not isinstance(text, str) or not text.strip() or not isinstance(names, list):
        return None
    if not all(isinstance(n, str) and n.strip().casefold() in by_name for n in names):
        return None
    return " ".join(text.split()), tuple(dict.fromkeys(by_name[n.strip().casefold()] for n in names))


def _parse_reply(content: str, classes: list[str]) -> tuple[list[tuple[str, tuple[str, ...]]], list[str]]:
    """(good rows, bad lines) of a reply. Blank lines and code fences are skipped; a whole reply that
    is one JSON array is read as its items; class names match case-insensitively."""
    lines = [line.strip().rstrip(",").strip() for line in content.splitlines()]
    lines = [line for line in lines if line and not line.startswith("```") and line not in ("[", "]")]
    try:
        whole = json.loads("\n".join(lines))
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        lines = [json.dumps(item) for item in whole]
    by_name = {c.casefold(): c for c in classes}
    rows, bad = [], []
    for line in lines:
        row = _parse_line(line, by_name)
        if row is None:
            bad.append(line)
        else:
            rows.append(row)
    return rows, bad


def _ask(client, messages: list[dict], endpoint: str, model: str, api_key_env: str, seed: int) -> str:
    """One chat completion's text; every failure becomes a one-line PromptError naming `endpoint`."""
    import openai

    try:
        reply = client.chat.completions.create(model=model, messages=messages, temperature=0, seed=seed)
    except openai.APIConnectionError as e:
        cause = f" ({_one_line(e.__cause__)})" if e.__cause__ else ""
        raise PromptError(f"cannot reach {endpoint}: {_one_line(e.message)}{cause}") from None
    except openai.APIStatusError as e:
        body = e.body
        message = body.get("message") if isinstance(body, dict) else body
        message = _one_line(message if isinstance(message, str) and message else e.message)
        hint = ""
        if e.status_code in (401, 403):
            hint = (f" (check the key in environment variable {api_key_env})" if os.environ.get(api_key_env)
                    else f" (environment variable {api_key_env} is not set)")
        key = os.environ.get(api_key_env)
        if key:  # servers echo the key they refused; it never reaches an error message or a log line
            message = message.replace(key, "***")
        raise PromptError(f"{endpoint} answered {e.status_code}: {message}{hint}") from None
    except openai.APIError as e:
        raise PromptError(f"{endpoint}: unusable reply: {_one_line(e.message)}") from None
    choices = getattr(reply, "choices", None)
    if not choices:
        raise PromptError(f"{endpoint}: the reply is not a chat completion: {_one_line(reply)}")
    return choices[0].message.content or ""


def expand_with_endpoint(classes: list[str], num_prompts: int, endpoint: str, model: str, api_key_env: str,
                         seed: int, *, batch_size: int = BATCH_SIZE, max_retries: int = 2,
                         timeout: float = 300.0) -> list[Prompt]:
    """`num_prompts` prompts about `classes`, written by the chat model `model` at `endpoint` (an
    OpenAI-compatible base URL, e.g. http://localhost:8000/v1) with the key in `$api_key_env`.

    Asks in batches of `batch_size` (temperature 0, `seed`), quoting earlier prompts back so later
    batches differ, until enough distinct prompts are gathered. Lines that are not a prompt row, or
    name a class outside `classes`, are skipped (and logged); duplicates are dropped. A reply with no
    usable line at all, or `MAX_FRUITLESS_REQUESTS` replies in a row that add nothing new, raise
    PromptError, as does an unreachable endpoint or an error status; each message names `endpoint`.
    """
    import openai

    if not classes:
        raise PromptError(f"{endpoint}: no class names to write prompts about")
    if num_prompts < 1:
        raise PromptError(f"{endpoint}: num_prompts must be >= 1, got {num_prompts}")
    client = openai.OpenAI(base_url=endpoint, api_key=os.environ.get(api_key_env) or "unused",
                           max_retries=max_retries, timeout=timeout)
    rows: list[tuple[str, tuple[str, ...]]] = []
    seen: set[str] = set()
    requests = fruitless = 0
    while len(rows) < num_prompts:
        requests += 1
        count = min(batch_size, num_prompts - len(rows))
        messages = [{"role": "system", "content": _INSTRUCTIONS},
                    {"role": "user", "content": _request_text(classes, count, requests, [t for t, _ in rows])}]
        good, bad = _parse_reply(_ask(client, messages, endpoint, model, api_key_env, seed), classes)
        if not good:
            first = f"; the first: {_one_line(bad[0], 200)!r}" if bad else ""
            raise PromptError(f"{endpoint}: reply {requests} from {model!r} has no usable prompt lines "
                              f"({len(bad)} bad lines{first}); each line must be "
                              f'{{"prompt": "...", "classes": [...]}} with classes from {classes}')
        if bad:
            log.warning("%s: skipped %d bad lines of reply %d (the first: %r)", endpoint, len(bad), requests,
                        _one_line(bad[0], 200))
        added = 0
        for text, names in good:
            if text.casefold() not in seen and len(rows) < num_prompts:
                seen.add(text.casefold())
                rows.append((text, names))
                added += 1
        fruitless = 0 if added else fruitless + 1
        if fruitless >= MAX_FRUITLESS_REQUESTS:
            raise PromptError(f"{endpoint}: {model!r} added no new prompt in {fruitless} requests in a row; "
                              f"have {len(rows)} of num_prompts={num_prompts} (ask for fewer)")
    log.info("%s: %d prompts from %r in %d requests", endpoint, len(rows), model, requests)
    return [Prompt(i, text, names) for i, (text, names) in enumerate(rows)]


# ---- a build's prompts ---------------------------------------------------------------------------

def request_record(cfg: PromptsConfig, classes: list[str]) -> dict:
    """What identifies endpoint prompts (never the key): the same record means the same prompts."""
    return {"endpoint": cfg.endpoint, "model": cfg.model, "num_prompts": cfg.num_prompts, "seed": cfg.seed,
            "classes": [c for c in classes if c != BACKGROUND]}


def write_request_record(cfg: PromptsConfig, classes: list[str], output: str) -> None:
    """`<output>/prompts.request.json`: the request plus the sha256 of `<output>/prompts.jsonl`, so
    call it after writing that file; a file replaced later no longer matches its record."""
    data = storage.read_bytes(storage.join(output, PROMPTS_FILE))
    storage.write_json(storage.join(output, REQUEST_FILE),
                       {**request_record(cfg, classes), "prompts_sha256": hashlib.sha256(data).hexdigest()})


def _recorded(cfg: PromptsConfig, classes: list[str], output: str) -> bool:
    """Whether `<output>` holds prompts written by the same request (file and matching record)."""
    prompts_url, request_url = storage.join(output, PROMPTS_FILE), storage.join(output, REQUEST_FILE)
    if not (storage.exists(prompts_url) and storage.exists(request_url)):
        return False
    try:
        record = storage.read_json(request_url)
    except ValueError:
        return False
    digest = hashlib.sha256(storage.read_bytes(prompts_url)).hexdigest()
    return isinstance(record, dict) and record == {**request_record(cfg, classes), "prompts_sha256": digest}


def store(prompts: list[Prompt], fresh: bool, cfg: PromptsConfig, classes: list[str], output: str) -> None:
    """Keep the build's prompts with its dataset: `<output>/prompts.jsonl` (rewritten only when its
    content changes) and, for prompts an endpoint wrote, the request record that vouches for them."""
    storage.makedirs(output)
    url = storage.join(output, PROMPTS_FILE)
    data = to_jsonl(prompts)
    if fresh or not storage.exists(url) or storage.read_bytes(url) != data:
        storage.write_bytes(url, data)
    from_endpoint = bool(cfg.endpoint) and not cfg.source
    if from_endpoint and (fresh or not storage.exists(storage.join(output, REQUEST_FILE))):
        write_request_record(cfg, classes, output)


def sha256(prompts: list[Prompt]) -> str:
    """Identifies a list of prompts (texts and classes, in order) for the build hash."""
    rows = [[p.text, list(p.classes)] for p in prompts]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_texts(output: str) -> list[str] | None:
    """The texts of the build's prompts (`<output>/prompts.jsonl`), or None for a dataset without them."""
    url = storage.join(output, PROMPTS_FILE)
    return [p.text for p in from_jsonl(url)] if storage.exists(url) else None


def resolve(cfg: PromptsConfig, classes: list[str], output: str) -> tuple[list[Prompt], bool]:
    """The build's prompts and whether they came fresh from `cfg.endpoint` (then the caller writes
    `<output>/prompts.jsonl` and after it `write_request_record`; see the module docstring).

    `cfg.source` wins; else `cfg.endpoint` is asked once per dataset: when `<output>` already holds
    `prompts.jsonl` and a `prompts.request.json` recording the same request (and that file's sha256),
    the file is read and the endpoint is not called; else `cfg.template` is expanded. A class named
    "background" is left out of template expansion and endpoint requests.
    """
    names = [c for c in classes if c != BACKGROUND]
    if cfg.source:
        return load(cfg.source, classes), False
    if cfg.endpoint:
        if _recorded(cfg, classes, output):
            prompts_url = storage.join(output, PROMPTS_FILE)
            log.info("prompts: reusing %s (written by %s)", prompts_url, cfg.endpoint)
            return from_jsonl(prompts_url, names), False
        return expand_with_endpoint(names, cfg.num_prompts, cfg.endpoint, cfg.model, cfg.api_key_env,
                                    cfg.seed), True
    return from_template(cfg.template, names, cfg.attributes, cfg.seed), False
