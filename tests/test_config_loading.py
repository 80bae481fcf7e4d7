"""Loading what users write: a list where a mapping goes (or the reverse) and a file that is not a
mapping are one `ConfigError` naming the key and the file or override; a config shipped to Ray
workers (`to_dict` -> `from_dict`) comes back exactly as the driver holds it, a literal `${` too."""

import pytest

from factory.config import ConfigError, from_dict, load_config, to_dict

DM = "configs/demo_dm.yaml"


@pytest.mark.parametrize("text, says", [
    ("labels:\n  classes:\n    0: bg\n    1: fg\n", "labels.classes is a list, got a mapping"),
    ("backbone:\n  feature_resolutions: {16: true}\n", "backbone.feature_resolutions is a list, got a mapping"),
    ("prompts:\n  attributes: [hair]\n", "prompts.attributes is a mapping (key: value), got a list"),
    ("prompts:\n  attributes:\n    hair: {a: b}\n", "prompts.attributes.hair is a list, got a mapping"),
])
def test_a_list_where_a_mapping_goes_names_the_file_and_key(tmp_path, text, says):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value).startswith(f"{path}: {says}") and "\n" not in str(e.value)


@pytest.mark.parametrize("override, says", [
    ("labels.classes.0=z", "override 'labels.classes.0=z': labels.classes is a list, got a mapping"),
    ("prompts.attributes=[hair]", "override 'prompts.attributes=[hair]': prompts.attributes is a mapping"),
    ("backbone.feature_resolutions={16: true}",
     "override 'backbone.feature_resolutions={16: true}': backbone.feature_resolutions is a list"),
])
def test_an_override_of_the_wrong_container_names_itself(override, says):
    with pytest.raises(ConfigError, match="^" + says.replace("[", r"\[").replace("{", r"\{")):
        load_config(DM, [override])


@pytest.mark.parametrize("text, held", [
    ("42\n", "the single value '42'"), ("true\n", "the single value 'true'"), ("3.5\n", "the single value '3.5'"),
    ("just a string\n", "the single value 'just a string'"), ("- a\n- b\n", "a list"),
])
def test_a_file_that_is_not_a_mapping_says_so(tmp_path, text, held):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value) == f"{path}: a config file is a mapping of sections (key: value), this one holds {held}"


def test_the_config_shipped_to_workers_keeps_literal_interpolations(tmp_path):
    values = {"name": "run ${nope}", "card.license": r"a \${x} and \\${y} and ${oc.env:HOME}",
              "prompts.template": "a photo of a {class}, ${", "nightly.root": str(tmp_path / "${date}")}
    cfg = load_config(DM, [f"workdir={tmp_path}", r"name=run \${nope}"])  # the driver reads an escaped `${`
    assert cfg.name == "run ${nope}"
    cfg.card.license, cfg.prompts.template = values["card.license"], values["prompts.template"]
    cfg.nightly.root = values["nightly.root"]
    back = from_dict(to_dict(cfg))
    assert back.name == values["name"] and back.card.license == values["card.license"]
    assert back.prompts.template == values["prompts.template"] and back.nightly.root == values["nightly.root"]
    assert to_dict(back) == to_dict(cfg)
