"""The bad-input table (benchmarks/bad_input.py), one test per case, each through `factory.cli.main`:
exit 2 (or 1 for a failed run), one line naming the input, no traceback, nothing published."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bad_input", os.path.join(ROOT, "benchmarks", "bad_input.py"))
bad_input = sys.modules.setdefault("bad_input", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(bad_input)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, s3_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="bad-input")
    return bad_input.prepare(tmp_path_factory.mktemp("bad-input"), s3_endpoint, "bad-input")


def test_the_table_covers_every_category():
    categories = [category for category, _ in bad_input.CASES.values()]
    assert len(categories) >= 30
    assert set(categories) == {"config", "labels", "prompts", "weights", "storage", "dataset"}


@pytest.mark.parametrize("name", list(bad_input.CASES))
def test_bad_input_is_refused_by_the_rule(name, inputs):
    outcome = bad_input.run_case(name, inputs)
    assert outcome.ok, f"{name}: {'; '.join(outcome.problems)} (stderr: {outcome.stderr!r})"
