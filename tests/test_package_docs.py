"""What the package says about itself points at what is there."""

import re
from pathlib import Path

import lorakit

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_docstring_names_files_that_exist():
    named = set(re.findall(r"\b[\w/.-]+\.md\b", lorakit.__doc__))
    assert named, "the docstring names no document"
    assert [name for name in sorted(named) if not (ROOT / name).is_file()] == []
