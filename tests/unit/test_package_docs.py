"""The committed man pages and shell completions (hooks/man, hooks/completion) are what
scripts/gen_docs.py makes from the parsers now: a new flag without a regeneration fails here."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("argparse_manpage", reason="argparse-manpage (the test extra) is missing")
pytest.importorskip("shtab", reason="shtab (the test extra) is missing")


def gen_docs():
    """scripts/gen_docs.py as a module."""
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_pages_and_completions_are_fresh():
    """Regenerating changes nothing (else: run scripts/gen_docs.py and commit)."""
    assert gen_docs().stale() == []


def test_a_stale_copy_is_noticed(tmp_path):
    """The check can fail: a page missing a flag, and a missing file, are both stale."""
    module = gen_docs()
    for path, text in module.outputs().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    page = tmp_path / "man" / "offld.1"
    page.write_text(page.read_text().replace("fallback", "fall-back"))
    (tmp_path / "completion" / "zsh" / "_offloadd").unlink()
    assert module.stale(tmp_path) == ["man/offld.1", "completion/zsh/_offloadd"]


def test_every_program_has_a_page_and_both_completions():
    """Each page documents its program's flags; each completion names them."""
    out = gen_docs().outputs()
    assert r"\-\-fallback" in out[Path("man/offld.1")]
    assert "serve" in out[Path("man/offloadd.1")] and "offloadfs 0.1" in out[Path("man/offld.1")]
    assert "--load-balancer" in out[Path("completion/bash/offloadfs")]
    assert out[Path("completion/zsh/_offld")].startswith("#compdef offld")
    assert r"HOST[\:PORT]" in out[Path("completion/zsh/_offld")]   # zsh's spec stays whole


def test_the_width_of_the_terminal_does_not_matter(monkeypatch):
    """argparse wraps usage at $COLUMNS: the generator fixes it, and puts it back."""
    module = gen_docs()
    monkeypatch.setenv("COLUMNS", "40")
    narrow = module.outputs()
    assert os.environ["COLUMNS"] == "40"
    monkeypatch.setenv("COLUMNS", "200")
    assert module.outputs() == narrow
