"""Prompt sources (groundwork for the text-driven backbone): every format, stable order, bad rows named;
prompts written once per dataset by a chat endpoint (a local stand-in server speaking the OpenAI protocol)."""

import dataclasses
import json
import os
import re
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from factory.config import PromptsConfig
from factory.data import prompts


def test_text_file_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# prompts\na red car\n\n  a cat on a sofa  \n")
    got = prompts.load(str(path))
    assert [(p.index, p.text, p.classes) for p in got] == [(0, "a red car", ()), (1, "a cat on a sofa", ())]


def test_jsonl_with_classes_and_bad_rows_named(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a car", "classes": ["car"]}\n{"prompt": "a road"}\n')
    assert [p.classes for p in prompts.load(str(good), ["background", "car"])] == [("car",), ()]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": ""}\n{"text": "no prompt key"}\nnot json\n{"prompt": "x", "classes": ["dog"]}\n')
    with pytest.raises(prompts.PromptError) as e:
        prompts.load(str(bad), ["background", "car"])
    message = str(e.value)  # every bad row at once, each with its file and line
    assert message.startswith(f"{bad}: 4 bad prompt rows")
    for where, what in ((1, "empty or missing prompt"), (2, 'no "prompt" key'), (3, "not JSON"),
                        (4, "unknown classes ['dog']")):
        assert f"{bad}:{where}: {what}" in message


def test_parquet_needs_a_prompt_column(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "classes": [["car"], []]}), path)
    assert [(p.text, p.classes) for p in prompts.load(str(path))] == [("a", ("car",)), ("b", ())]
    pq.write_table(pa.table({"caption": ["a"]}), path)
    with pytest.raises(prompts.PromptError, match="no 'prompt' column"):
        prompts.load(str(path))


def test_templates_expand_every_combination_in_a_seeded_order():
    got = prompts.from_template("a {color} {class} at {time}", ["car", "bus"],
                                {"color": ["red", "blue"], "time": ["noon", "night"]}, seed=1)
    assert len(got) == 8 and len({p.text for p in got}) == 8
    assert got == prompts.from_template("a {color} {class} at {time}", ["car", "bus"],
                                        {"color": ["red", "blue"], "time": ["noon", "night"]}, seed=1)
    assert [p.text for p in got] != [p.text for p in prompts.from_template(
        "a {color} {class} at {time}", ["car", "bus"], {"color": ["red", "blue"], "time": ["noon", "night"]}, seed=2)]
    assert all(p.classes[0] in p.text for p in got)
    with pytest.raises(prompts.PromptError, match=r"lacks the placeholders \['\{time\}'\]"):
        prompts.from_template("a {class}", ["car"], {"time": ["noon"]})
    scenes = prompts.from_template("a face with {hair} hair", ["skin", "hair"], {"hair": ["red", "grey"]})
    assert sorted(p.text for p in scenes) == ["a face with grey hair", "a face with red hair"]
    assert all(p.classes == () for p in scenes)  # no {class}: the prompt names no single class
    with pytest.raises(prompts.PromptError, match="no placeholders"):
        prompts.from_template("a face", ["skin"], {})


def test_unknown_file_type_and_empty_source(tmp_path):
    with pytest.raises(prompts.PromptError, match="unknown prompt file type '.csv'"):
        prompts.load(str(tmp_path / "p.csv"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(prompts.PromptError, match="no prompts"):
        prompts.load(str(empty))


# ---- prompts written by a chat model, against a local stand-in endpoint ---------------------------

class ChatServer:
    """A local OpenAI-compatible chat endpoint: POST /v1/chat/completions answers with prompt lines made
    from the class names in the request (deterministic, a code fence, a duplicate and an unknown-class
    line included), `garbage` prose, `repeat` (the same lines whatever the batch) or an error `status`.
    It keeps every request: path, Authorization header and JSON body."""

    def __init__(self):
        self.mode, self.status, self.requests, self.url = "good", 200, [], None

    def reply(self, body: dict) -> str:
        user = body["messages"][-1]["content"]
        classes = json.loads(re.search(r"^Class names: (\[.*\])$", user, re.M).group(1))
        count = int(re.search(r"Write (\d+) new", user).group(1))
        batch = 1 if self.mode == "repeat" else int(re.search(r"\(batch (\d+)\)", user).group(1))
        if self.mode == "garbage":
            return "Sure! Here are some prompts:\n\n1. a cat on a mat\n2. a dog in the café"
        rows = [{"prompt": f"a photo of {' and '.join(names)} in a café, scene {batch}.{i}", "classes": names}
                for i in range(count) for names in [sorted({classes[i % len(classes)],
                                                            classes[(i + batch) % len(classes)]})]]
        lines = [json.dumps(r, ensure_ascii=False) for r in rows]
        return "\n".join(["```json", *lines, "", lines[0], '{"prompt": "a unicorn", "classes": ["unicorn"]}',
                          "```"])

    def respond(self, request: dict) -> tuple[int, str]:
        if self.status != 200:
            return self.status, "Incorrect API key provided"
        return 200, self.reply(request["body"])


@pytest.fixture
def chat():
    from conftest import chat_endpoint

    state = ChatServer()
    with chat_endpoint(state.respond) as (url, requests):
        state.url, state.requests = f"{url}/v1", requests
        yield state


def test_endpoint_writes_n_prompts_in_batches_with_known_classes(chat, monkeypatch):
    monkeypatch.delenv("FACTORY_TEST_KEY", raising=False)
    got = prompts.expand_with_endpoint(["car", "bus", "tree"], 7, chat.url, "tiny-chat", "FACTORY_TEST_KEY", seed=5,
                                       batch_size=3)
    assert [p.index for p in got] == list(range(7)) and len({p.text for p in got}) == 7
    assert all(p.classes and set(p.classes) <= {"car", "bus", "tree"} for p in got)
    assert "unicorn" not in " ".join(p.text for p in got)  # the unknown-class line was skipped
    assert len(chat.requests) == 3  # 3 + 3 + 1
    first = chat.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["authorization"] == "Bearer unused"
    assert (first["body"]["model"], first["body"]["temperature"], first["body"]["seed"]) == ("tiny-chat", 0, 5)
    assert "a photo of" in chat.requests[2]["body"]["messages"][-1]["content"]  # earlier prompts quoted back
    assert got == prompts.expand_with_endpoint(["car", "bus", "tree"], 7, chat.url, "tiny-chat", "FACTORY_TEST_KEY",
                                               seed=5, batch_size=3)


def test_endpoint_key_comes_from_the_named_environment_variable(chat, monkeypatch):
    monkeypatch.setenv("FACTORY_TEST_KEY", "sk-test-123")
    prompts.expand_with_endpoint(["car"], 2, chat.url, "tiny-chat", "FACTORY_TEST_KEY", seed=0)
    assert [r["authorization"] for r in chat.requests] == ["Bearer sk-test-123"]


def test_resolve_asks_the_endpoint_once_per_dataset(chat, tmp_path):
    out, classes = str(tmp_path / "dataset"), ["background", "car", "bus"]
    cfg = PromptsConfig(endpoint=chat.url, model="tiny-chat", num_prompts=4, seed=3, api_key_env="FACTORY_TEST_KEY")

    def build(cfg):  # what generate.py does with them
        got, fresh = prompts.resolve(cfg, classes, out)
        prompts.write_jsonl(got, f"{out}/{prompts.PROMPTS_FILE}")
        if fresh:
            prompts.write_request_record(cfg, classes, out)
        return got, fresh

    first, fresh = build(cfg)
    assert fresh and len(first) == 4 and len(chat.requests) == 1
    assert "background" not in chat.requests[0]["body"]["messages"][-1]["content"]
    record = json.loads((tmp_path / "dataset" / prompts.REQUEST_FILE).read_text())
    assert record["num_prompts"] == 4 and record["classes"] == ["car", "bus"] and "sk-" not in json.dumps(record)
    again, fresh = build(cfg)
    assert (again, fresh, len(chat.requests)) == (first, False, 1)  # read back, endpoint not called
    more, fresh = build(dataclasses.replace(cfg, num_prompts=5))
    assert fresh and len(more) == 5 and len(chat.requests) == 2  # a changed request asks again
    (tmp_path / "dataset" / prompts.PROMPTS_FILE).write_text('{"prompt": "edited", "classes": []}\n')
    assert prompts.resolve(dataclasses.replace(cfg, num_prompts=5), classes, out)[1]  # a replaced file too
    assert len(chat.requests) == 3


def test_resolve_prefers_source_then_endpoint_then_template(chat, tmp_path):
    source = tmp_path / "p.txt"
    source.write_text("a red car\n")
    cfg = PromptsConfig(source=str(source), endpoint=chat.url)
    assert prompts.resolve(cfg, ["background", "car"], str(tmp_path)) == ([prompts.Prompt(0, "a red car")], False)
    got, fresh = prompts.resolve(PromptsConfig(), ["background", "car"], str(tmp_path))
    assert (got, fresh) == ([prompts.Prompt(0, "a photo of a car", ("car",))], False)
    assert chat.requests == []


def test_endpoint_garbage_reply_is_an_error_naming_the_endpoint(chat):
    chat.mode = "garbage"
    with pytest.raises(prompts.PromptError) as e:
        prompts.expand_with_endpoint(["car"], 3, chat.url, "tiny-chat", "FACTORY_TEST_KEY", seed=0, max_retries=0)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{chat.url}: reply 1 from 'tiny-chat'")
    assert "3 bad lines; the first: 'Sure! Here are some prompts:'" in message


def test_endpoint_that_only_repeats_itself_stops_after_a_few_requests(chat):
    chat.mode = "repeat"
    with pytest.raises(prompts.PromptError, match=r"added no new prompt in 3 requests in a row; have 2 of "
                                                  r"num_prompts=5"):
        prompts.expand_with_endpoint(["car"], 5, chat.url, "tiny-chat", "FACTORY_TEST_KEY", seed=0, batch_size=2)
    assert len(chat.requests) == 4


def test_unreachable_endpoint_and_bad_key_are_one_line_errors(chat, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(prompts.PromptError, match=f"^cannot reach {re.escape(closed)}: ") as e:
        prompts.expand_with_endpoint(["car"], 3, closed, "tiny-chat", "FACTORY_TEST_KEY", seed=0, max_retries=0)
    assert "\n" not in str(e.value)
    chat.status = 401
    monkeypatch.setenv("FACTORY_TEST_KEY", "sk-wrong")
    with pytest.raises(prompts.PromptError) as e:
        prompts.expand_with_endpoint(["car"], 3, chat.url, "tiny-chat", "FACTORY_TEST_KEY", seed=0, max_retries=0)
    assert str(e.value) == (f"{chat.url} answered 401: Incorrect API key provided "
                            "(check the key in environment variable FACTORY_TEST_KEY)")
    monkeypatch.delenv("FACTORY_TEST_KEY")
    with pytest.raises(prompts.PromptError, match="environment variable FACTORY_TEST_KEY is not set"):
        prompts.expand_with_endpoint(["car"], 3, chat.url, "tiny-chat", "FACTORY_TEST_KEY", seed=0, max_retries=0)


def test_write_jsonl_round_trips_through_from_jsonl(tmp_path):
    rows = [prompts.Prompt(0, "ein Straßenbahn-Foto, 東京, ünïcödé ☕", ("tram", "car")),
            prompts.Prompt(1, 'a "quoted" line\u2028with a separator', ()),
            prompts.Prompt(2, "a bus", ("bus",))]
    url = str(tmp_path / "out" / "prompts.jsonl")
    prompts.write_jsonl(rows, url)
    assert prompts.from_jsonl(url, ["tram", "car", "bus"]) == rows
    first = (tmp_path / "out" / "prompts.jsonl").read_bytes().splitlines()[0]
    assert first == '{"classes": ["tram", "car"], "prompt": "ein Straßenbahn-Foto, 東京, ünïcödé ☕"}'.encode()


def test_cli_expands_prompts_once_next_to_the_dataset_before_the_build(chat, tmp_path):
    from factory.cli import main
    from factory.dataset import layout

    configs = os.path.join(os.path.dirname(__file__), "..", "configs", "diffusion.yaml")
    args = [configs, f"workdir={tmp_path}", f"prompts.endpoint={chat.url}", "prompts.num_prompts=6"]
    assert main(["prompts", "expand", *args]) == 0
    rows = prompts.from_jsonl(str(tmp_path / "dataset" / prompts.PROMPTS_FILE))
    assert len(rows) == 6 and len(chat.requests) == 1
    assert all(set(r.classes) <= {"skin", "hair", "eye", "brow", "nose", "mouth", "ear"} for r in rows)
    assert main(["prompts", "expand", *args]) == 0 and len(chat.requests) == 1  # reused, not asked again
    # the build may start in a folder holding only its expanded prompts
    layout.prepare_output(str(tmp_path / "dataset"), "h", {}, overwrite=False)
    assert prompts.from_jsonl(str(tmp_path / "dataset" / prompts.PROMPTS_FILE)) == rows


@pytest.mark.parametrize(
    "ext, content, texts",
    [
        (".txt", b"\xef\xbb\xbfa face\r\nred hair\r\n", ["a face", "red hair"]),  # a BOM, Windows line ends
        (".txt", "a face\u2028with red hair\nsecond\x0cpage\n".encode(), ["a face\u2028with red hair", "second\x0cpage"]),
        (".txt", b"# a comment\n  # an indented one\nprompt # not a comment\n", ["prompt # not a comment"]),
        (".jsonl", b'\xef\xbb\xbf{"prompt": "a face"}\r\n', ["a face"]),
        (".jsonl", '{"prompt": "a\u2028b"}\n'.encode(), ["a\u2028b"]),
    ],
    ids=["txt-bom-crlf", "txt-u2028-formfeed", "txt-comments", "jsonl-bom", "jsonl-u2028"],
)
def test_text_sources_split_at_newlines_only_and_drop_a_bom(tmp_path, ext, content, texts):
    path = tmp_path / f"p{ext}"
    path.write_bytes(content)
    assert [p.text for p in prompts.load(str(path))] == texts


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("p.txt", b"a face\ncaf\xe9 face\n", r"p\.txt:2: not UTF-8 text \(byte 0xe9"),
        ("p.parquet", b"PAR1 garbage not parquet", r"p\.parquet: not a readable Parquet file"),
        ("p.parquet", b"", r"p\.parquet: not a readable Parquet file"),
    ],
    ids=["latin1", "parquet-corrupt", "parquet-empty"],
)
def test_unreadable_sources_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(prompts.PromptError, match=message):
        prompts.load(str(path))


@pytest.mark.parametrize("template, message", [
    ("a {face} with {hair} hair", ("template 'a {face} with {hair} hair': unknown field {face}; it fills {class} "
                                   "and the prompts.attributes names ['hair']")),
    ("a {hair} face {0}", ("template 'a {hair} face {0}': positional field {0}; name {class} or an attribute of "
                           "prompts.attributes ['hair']")),
    ("a {hair} face {}", ("template 'a {hair} face {}': positional field {}; name {class} or an attribute of "
                          "prompts.attributes ['hair']")),
    ("a face with {{hair}} hair", "template 'a face with {{hair}} hair' lacks the placeholders ['{hair}']"),
    ("a {hair!r} face", "template 'a {hair!r} face': field {hair!r} has a conversion or format spec; write {hair}"),
    ("a {hair face", "template 'a {hair face': expected '}' before end of string; write a literal brace as {{ or }}"),
], ids=["unknown", "positional", "auto-numbered", "escaped", "conversion", "unclosed"])
def test_template_fields_are_parsed_as_format_reads_them(template, message):
    """An unknown field was a KeyError traceback, a positional one an IndexError, and `{{hair}}` (a
    literal brace) counted as the placeholder {hair} and was never filled; now one line, exit 2."""
    from factory.cli import _exit_code

    with pytest.raises(prompts.PromptError) as e:
        prompts.from_template(template, ["face"], {"hair": ["red"]})
    assert str(e.value) == message and _exit_code(e.value) == 2
    literal = prompts.from_template("a {{tag}} {class} with {hair} hair", ["face"], {"hair": ["red"]})
    assert [p.text for p in literal] == ["a {tag} face with red hair"]


def test_a_long_prompt_is_named_by_its_line_and_first_words(tmp_path):
    """Line 4 of the file is a comment: the long prompt is on line 7, not "prompt 4"."""
    from factory.backbones.diffusion import check_prompt_lengths

    path = tmp_path / "p.txt"
    path.write_text("a red car\n\na cat\n# a comment\na dog\n\n" + "a very long prompt " + "word " * 100 + "\n")
    rows = prompts.load(str(path))
    assert [p.where for p in rows] == [f"{path}:1", f"{path}:3", f"{path}:5", f"{path}:7"]
    with pytest.raises(ValueError) as e:
        check_prompt_lengths(None, [p.text for p in rows], str(path), [p.where for p in rows])
    assert re.fullmatch(re.escape(f"{path}: 1 prompts longer than the text encoder's 77 tokens: {path}:7 (") +
                        r"\d+ tokens: 'a very long prompt word word \.\.\.'\); shorten them", str(e.value)), str(e.value)


@pytest.mark.parametrize("name, write, message", [
    ("p.parquet", lambda p: pq.write_table(pa.table({"prompt": [1, 2]}), p),
     "row 0: the prompt is not text, got int 1"),
    ("p.txt", lambda p: Path(p).write_text("a cat\n\u200b\u200b\n", encoding="utf-8"),
     "p.txt:2: the prompt has no visible characters (only U+200B)"),
], ids=["parquet-integers", "zero-width-space"])
def test_prompts_that_are_not_text_or_show_nothing_are_named(tmp_path, name, write, message):
    write(str(tmp_path / name))
    with pytest.raises(prompts.PromptError, match=re.escape(message)):
        prompts.load(str(tmp_path / name))


@pytest.mark.parametrize("values, message", [
    ("[red,red]", "prompts.attributes.hair lists 'red' twice: ['red', 'red']"),
    ("[red,'']", "prompts.attributes.hair holds an empty value: ['red', '']"),
])
def test_attribute_values_are_distinct_and_not_empty(values, message):
    from factory.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [f"prompts.attributes={{hair: {values}}}"])
