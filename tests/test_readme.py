"""Every README table is generated from bench/results/*.json (bench/readme.py)."""

import json

import pytest

from bench import readme


def test_readme_tables_match_the_results_files():
    text = readme.README.read_text()
    assert text.count("<!-- results ") >= 5
    assert readme.render(text) == text, "README is stale: run `python -m bench.readme`"


def test_a_number_typed_into_a_table_is_caught(tmp_path):
    (tmp_path / "x.json").write_text(
        json.dumps(
            {
                "environment": {"gpu": "G", "torch": "T", "date": "D", "command": "C"},
                "tables": [{"heading": "h", "columns": ["a", "b"], "rows": [{"a": 1, "b": 0.5}]}],
            }
        )
    )
    block = '<!-- results x columns="a;b" where="a:1" -->\n'
    text = readme.render(block + "<!-- /results -->", tmp_path)
    assert "| 1 | 0.5 |" in text
    assert readme.render(text.replace("0.5", "0.6"), tmp_path) != text.replace("0.5", "0.6")
    with pytest.raises(ValueError, match="no column"):
        readme.render('<!-- results x columns="a;c" -->\n<!-- /results -->', tmp_path)
