"""Prompt sources (groundwork for the text-driven backbone): every format, stable order, bad rows named."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from factory import prompts


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


def test_unknown_file_type_and_empty_source(tmp_path):
    with pytest.raises(prompts.PromptError, match="unknown prompt file type '.csv'"):
        prompts.load(str(tmp_path / "p.csv"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(prompts.PromptError, match="no prompts"):
        prompts.load(str(empty))
