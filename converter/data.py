"""Offline text for calibration and perplexity: Wikipedia articles from the gensim wheel.

The gensim wheel ships a shortened English Wikipedia export (MediaWiki XML, bz2). We keep the
main-namespace, non-redirect pages in file order, turn their markup into WikiText-style prose
(` = Title = `, ` = = Section = = `, one paragraph a line, blank lines between) and split them
*by article* with a fixed rule: article `i` (0-based) is evaluation text iff
`i % eval_every == eval_every - 1`, calibration text otherwise, so the two never overlap.
The cleaned splits are cached in the user cache dir and verified by SHA-256 on every load.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mwparserfromhell
import torch
from mwparserfromhell.nodes import ExternalLink, Heading, HTMLEntity, Tag, Template, Text, Wikilink
from mwparserfromhell.wikicode import Wikicode

from converter.errors import RespinError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when cleaning or file layout changes: old caches are then rebuilt
GENSIM_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

# Sections that are lists of sources or links, not prose; dropped with their subsections.
DROPPED_SECTIONS = frozenset(
    {"references", "external links", "see also", "notes", "further reading", "bibliography",
     "sources", "citations", "footnotes", "works cited", "notes and references"}
)
# Tags whose contents are not prose (citations, formulas, tables, media, layout).
DROPPED_TAGS = frozenset(
    {"ref", "references", "math", "table", "gallery", "imagemap", "timeline", "score", "chem",
     "ce", "syntaxhighlight", "source", "pre", "hiero", "graph", "mapframe", "templatedata"}
)
# Wikilink namespaces that render as media, categories or interlanguage links, not as text.
DROPPED_LINK_PREFIXES = ("file:", "image:", "media:", "category:")
_INTERWIKI = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)?:")
# Citations are a large share of the markup: cutting them before parsing saves a fifth of the
# build time and keeps a malformed citation from swallowing the prose after it. Self-closing refs
# go first so that `<ref name="x"/>` cannot open a paired match.
_REF_SELF_CLOSING = re.compile(r"<ref(\s[^>]*)?/>", re.IGNORECASE)
_REF_PAIRED = re.compile(r"<ref(\s[^>]*)?>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_DISAMBIGUATION = re.compile(r"\{\{\s*(disambiguation|disambig|dab|geodis|hndis)\s*[|}]", re.I)
_BEHAVIOUR_SWITCH = re.compile(r"__[A-Z]+__")
_QUOTE_MARKUP = re.compile(r"'{2,}")  # '' italic, ''' bold, ''''' both; '''' is ' + bold
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]*\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:])(?=\s|$)")


class CorpusError(RespinError, ValueError):
    """Missing corpus source or text too short for the requested windows."""


@dataclass(frozen=True)
class CorpusConfig:
    eval_every: int = 5  # article i goes to evaluation iff i % eval_every == eval_every - 1
    cache_dir: Path | None = None  # None: $XDG_CACHE_HOME/respin-export or ~/.cache/respin-export

    def __post_init__(self) -> None:
        if self.eval_every < 2:
            raise CorpusError(
                f"eval_every must be >= 2 (got {self.eval_every}): both splits need articles")

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base) / "respin-export"


@dataclass(frozen=True)
class CorpusSplit:
    calibration: str
    evaluation: str
    rule: str
    n_calibration_articles: int
    n_evaluation_articles: int
    calibration_sha256: str
    evaluation_sha256: str
    source: str

    def describe(self) -> dict[str, object]:
        """JSON-able summary of the split: everything but the texts, plus their sizes."""
        return {
            "source": self.source,
            "rule": self.rule,
            "n_calibration_articles": self.n_calibration_articles,
            "n_evaluation_articles": self.n_evaluation_articles,
            "calibration_chars": len(self.calibration),
            "evaluation_chars": len(self.evaluation),
            "calibration_sha256": self.calibration_sha256,
            "evaluation_sha256": self.evaluation_sha256,
        }


# --- markup → prose ---------------------------------------------------------------------------

def _plain(code: Wikicode | None) -> str:
    """Visible prose of a wikicode fragment; templates, comments, refs, tables and media vanish."""
    if code is None:
        return ""
    parts: list[str] = []
    for node in code.nodes:
        if isinstance(node, Text):
            parts.append(str(node.value))
        elif isinstance(node, Wikilink):
            title = str(node.title).strip().lower()
            interlanguage = _INTERWIKI.match(title) is not None and node.text is None
            if title.startswith(DROPPED_LINK_PREFIXES) or interlanguage:
                continue
            parts.append(_plain(node.text) if node.text is not None else _plain(node.title))
        elif isinstance(node, Tag):
            tag = str(node.tag).strip().lower()
            if tag == "br":
                parts.append(" ")
            elif tag not in DROPPED_TAGS and not node.self_closing:
                parts.append(_plain(node.contents))  # list markers (* # : ;) have no contents
        elif isinstance(node, ExternalLink):
            parts.append(_plain(node.title))  # bare URLs have no title and are dropped
        elif isinstance(node, HTMLEntity):
            parts.append(node.normalize())
        elif isinstance(node, Heading):
            parts.append(_plain(node.title))
        elif isinstance(node, Template):
            parts.append(_template_text(node))
        # Comment, Argument: not prose
    return "".join(parts)


# Inline templates that stand for words in a sentence ("a {{convert|40|acre}} ranch"); every other
# template (infoboxes, citations, navigation, maintenance tags) is dropped.
_TEXT_TEMPLATES = {"lang": 1, "nihongo": 0, "quote": 0, "nowrap": 0, "nobr": 0, "small": 0,
                   "smaller": 0, "vanchor": 0, "flag": 0, "transl": -1}
_RANGE_WORDS = {"-": "–", "–": "–", "to": "to", "and": "and", "or": "or", "by": "by",
                "x": "×"}


def _template_text(node: Template) -> str:
    name = str(node.name).strip().lower()
    args = [_plain(p.value).strip() for p in node.params if not p.showkey]
    if name in ("convert", "cvt") and args:  # {{convert|1|to|2|km|mi}} -> "1 to 2 km"
        words, i = [args[0]], 1
        while i + 1 < len(args) and args[i] in _RANGE_WORDS:
            words += [_RANGE_WORDS[args[i]], args[i + 1]]
            i += 2
        return " ".join(words + args[i : i + 1])
    if name == "as of" and args:
        return f"As of {args[0]}"
    index = 0 if name.startswith("lang-") else _TEXT_TEMPLATES.get(name)
    if index is None or not args or index >= len(args):
        return ""
    return args[index]


def _drop_quote_markup(line: str) -> str:
    """Remove the '' / ''' / ''''' runs of one line. As in MediaWiki, an odd count of bold with an
    odd count of italic runs makes the first ''' an apostrophe + italic ("Proposal'''s" -> "'s")."""
    runs = [len(r) for r in _QUOTE_MARKUP.findall(line)]
    apostrophe = sum(r in (2, 5) for r in runs) % 2 == 1 and sum(r in (3, 5) for r in runs) % 2 == 1

    def repl(m: re.Match[str]) -> str:
        nonlocal apostrophe
        n = len(m.group())
        if n == 3 and apostrophe:
            apostrophe = False
            return "'"
        return "'" * (n - 3 if n == 4 else max(n - 5, 0))

    return _QUOTE_MARKUP.sub(repl, line)


def _tidy_line(line: str) -> str:
    line = _BEHAVIOUR_SWITCH.sub("", line)
    line = _drop_quote_markup(line)
    line = _EMPTY_PARENS.sub("", line)  # "Albedo ({{IPAc-en|...}}) or" leaves "()"
    line = " ".join(line.split())  # also turns &nbsp; (U+00A0) into a plain space
    return _SPACE_BEFORE_PUNCT.sub(r"\1", line)


def _is_junk(line: str) -> bool:
    """Leftovers of lists and unparsed tables/templates: no words, or table/template syntax."""
    return not any(ch.isalnum() for ch in line) or line.startswith(("{|", "|", "!", "{{", "}}"))


def _heading_line(level: int, title: str) -> str:
    marks = " ".join(["="] * max(level, 2))  # level 1 inside an article reads as a section
    return f" {marks} {title} {marks} "


def clean_wikitext(markup: str) -> str:
    """MediaWiki markup of one article body → WikiText-style prose.

    Paragraphs become single lines separated by blank lines; `==Sec==` becomes ` = = Sec = = `
    and `===Sub===` ` = = = Sub = = = `. Reference-like sections (`DROPPED_SECTIONS`) are dropped
    together with their subsections. Wikilinks keep their display text.
    """
    blocks: list[tuple[int, str]] = []  # (heading level, or 0 for a paragraph; line)
    pending: list[str] = []
    skip_below: int | None = None  # inside a dropped section of this level

    def flush() -> None:
        for line in "".join(pending).split("\n"):
            line = _tidy_line(line)
            if line and not _is_junk(line):
                blocks.append((0, line))
        pending.clear()

    markup = _REF_PAIRED.sub("", _REF_SELF_CLOSING.sub("", _COMMENT.sub("", markup)))
    # skip_style_tags: an unbalanced '' or ''' would otherwise swallow whole sections, headings
    # included; MediaWiki closes them at the end of the line, we simply drop the quote runs.
    for node in mwparserfromhell.parse(markup, skip_style_tags=True).nodes:
        if isinstance(node, Heading):
            flush()
            title = _tidy_line(_plain(node.title))
            if skip_below is not None and node.level > skip_below:
                continue
            skip_below = node.level if title.lower() in DROPPED_SECTIONS else None
            if skip_below is None and title:
                blocks.append((node.level, _heading_line(node.level, title)))
        elif skip_below is None:
            pending.append(_plain(Wikicode([node])))
    flush()
    # A heading whose section lost all its content (only a table, gallery, ...) is noise.
    kept: list[tuple[int, str]] = []
    for level, line in reversed(blocks):
        next_level = kept[-1][0] if kept else 1
        if level == 0 or next_level == 0 or next_level > level:
            kept.append((level, line))
    return "\n\n".join(line for _, line in reversed(kept))


# --- the gensim Wikipedia export ---------------------------------------------------------------

def gensim_wiki_path() -> Path:
    """Path of the Wikipedia export inside the installed gensim wheel (gensim is not imported)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            "the calibration corpus needs the 'gensim' package: pip install gensim==4.4.0")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    path = package_dir / "test" / "test_data" / GENSIM_WIKI_FILE
    if not path.is_file():
        raise CorpusError(f"gensim is installed but its Wikipedia test file is missing: {path}")
    return path


def iter_wiki_articles(source: Path | None = None) -> Iterator[tuple[str, str]]:
    """(title, text) of main-namespace, non-redirect pages of a MediaWiki XML export, in file order.

    `text` is the whole cleaned article, starting with its ` = Title = ` line. Disambiguation pages
    (link lists) and pages left empty by cleaning are skipped. `source` defaults to the gensim file.
    """
    path = source if source is not None else gensim_wiki_path()
    with bz2.open(path, "rb") as f:
        ns_uri = ""
        for event, elem in ET.iterparse(f, events=("start", "end")):
            if event == "start":
                if not ns_uri and elem.tag.startswith("{"):
                    ns_uri = elem.tag[: elem.tag.index("}") + 1]  # export-0.10 or any other version
                continue
            if elem.tag != f"{ns_uri}page":
                continue
            title = elem.findtext(f"{ns_uri}title", "").strip()
            ns = elem.findtext(f"{ns_uri}ns", "").strip()
            redirect = elem.find(f"{ns_uri}redirect") is not None
            markup = elem.findtext(f"{ns_uri}revision/{ns_uri}text", "")
            elem.clear()  # keep memory flat over the whole file
            if ns != "0" or redirect or markup.lstrip().upper().startswith("#REDIRECT"):
                continue
            if _DISAMBIGUATION.search(markup):  # lists of links to other pages, not prose
                continue
            body = clean_wikitext(markup)
            if body:
                yield title, f" = {title} = \n\n{body}"


# --- split + cache -----------------------------------------------------------------------------

def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _rule(eval_every: int) -> str:
    return ("gensim enwiki export, main-namespace articles (no redirects, no disambiguation "
            f"pages) in file order, 0-based i: evaluation iff i % {eval_every} == "
            f"{eval_every - 1}, else calibration")


def _build_split(cfg: CorpusConfig) -> CorpusSplit:
    path = gensim_wiki_path()
    calibration: list[str] = []
    evaluation: list[str] = []
    for i, (_, text) in enumerate(iter_wiki_articles(path)):
        (evaluation if i % cfg.eval_every == cfg.eval_every - 1 else calibration).append(text)
    if not calibration or not evaluation:
        raise CorpusError(f"{path} gave {len(calibration) + len(evaluation)} articles: too few for "
                          f"eval_every={cfg.eval_every}")
    cal, ev = "\n\n".join(calibration), "\n\n".join(evaluation)
    return CorpusSplit(cal, ev, _rule(cfg.eval_every), len(calibration), len(evaluation),
                       _sha256(cal), _sha256(ev), str(path))


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cache_paths(cfg: CorpusConfig) -> tuple[Path, Path, Path]:
    d = cfg.resolved_cache_dir() / f"wiki-v{FORMAT_VERSION}-every{cfg.eval_every}"
    return d / "calibration.txt", d / "evaluation.txt", d / "meta.json"


def _read_cache(cfg: CorpusConfig) -> CorpusSplit | None:
    """The cached split, or None when missing, from another format or failing its checksums."""
    cal_path, ev_path, meta_path = _cache_paths(cfg)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        cal = cal_path.read_text(encoding="utf-8")
        ev = ev_path.read_text(encoding="utf-8")
        split = CorpusSplit(cal, ev, meta["rule"], int(meta["n_calibration_articles"]),
                            int(meta["n_evaluation_articles"]), meta["calibration_sha256"],
                            meta["evaluation_sha256"], meta["source"])
        ok = (meta["format_version"] == FORMAT_VERSION and meta["eval_every"] == cfg.eval_every
              and _sha256(cal) == split.calibration_sha256
              and _sha256(ev) == split.evaluation_sha256)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # ValueError: bad JSON or UTF-8
        logger.warning("corpus cache %s unreadable (%s); rebuilding", meta_path.parent, exc)
        return None
    if not ok:
        logger.warning("corpus cache %s failed its checks; rebuilding", meta_path.parent)
        return None
    return split


def load_corpus(cfg: CorpusConfig = CorpusConfig()) -> CorpusSplit:
    """The calibration/evaluation split, from the cache when valid, else built and cached."""
    cached = _read_cache(cfg)
    if cached is not None:
        logger.debug("corpus loaded from cache %s", _cache_paths(cfg)[2].parent)
        return cached
    t0 = time.perf_counter()
    split = _build_split(cfg)
    cal_path, ev_path, meta_path = _cache_paths(cfg)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(cal_path, split.calibration)
    _write_atomic(ev_path, split.evaluation)
    meta = {"format_version": FORMAT_VERSION, "eval_every": cfg.eval_every, **split.describe()}
    _write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")  # last: it commits the cache
    logger.info("built corpus (%d calibration / %d evaluation articles) in %.1f s, cached in %s",
                split.n_calibration_articles, split.n_evaluation_articles,
                time.perf_counter() - t0, meta_path.parent)
    return split


# --- tokens ------------------------------------------------------------------------------------

def _token_ids(tokenizer, text: str) -> torch.Tensor:
    # verbose=False: the whole corpus is far longer than model_max_length, which is fine here.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def evaluation_tokens(tokenizer, text: str, seq_len: int, max_tokens: int) -> torch.LongTensor:
    """[n, seq_len] consecutive non-overlapping windows from the start of `tokenizer(text)`.

    n = min(max_tokens, n_tokens) // seq_len; the remainder is dropped, so every row is a full
    context (the usual WikiText perplexity protocol).
    """
    if seq_len < 1 or max_tokens < 1:
        raise CorpusError(f"seq_len and max_tokens must be positive (got {seq_len}, {max_tokens})")
    ids = _token_ids(tokenizer, text)
    n = min(max_tokens, ids.numel()) // seq_len
    if n == 0:
        raise CorpusError(f"no evaluation window: the text has {ids.numel()} tokens and "
                          f"max_tokens is {max_tokens}, both must be at least seq_len={seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def calibration_batches(
    tokenizer, text: str, n_samples: int, seq_len: int, seed: int = 0
) -> torch.LongTensor:
    """[n_samples, seq_len] windows of `tokenizer(text)` at random starts (GPTQ's calibration).

    Starts are uniform in [0, n_tokens - seq_len], drawn from a `torch.Generator` seeded with
    `seed`, so the batches depend only on (text, tokenizer, n_samples, seq_len, seed).
    """
    if n_samples < 1 or seq_len < 1:
        raise CorpusError(f"n_samples and seq_len must be positive (got {n_samples}, {seq_len})")
    ids = _token_ids(tokenizer, text)
    if ids.numel() < seq_len:
        raise CorpusError(
            f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
