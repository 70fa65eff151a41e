"""data_pipelines' Gopher, C4, FineWeb and URL filters against datatrove 0.10.1.

Nothing here needs datatrove or spaCy: their answers are recorded.
- tests/data/filters_fixture.jsonl.gz holds 150 documents of the web sample from
  permissively licensed sources (Python, PostgreSQL and Django docs, fortunes) picked so
  that every filter keeps and drops some, and tests/data/filters_golden.json datatrove's
  decisions for them (and the sha1 of C4's output text), both written by
  `python tools/datatrove_agreement.py --write-fixture ... --write-golden ...`.
- The tokenizer cases are spaCy 3.8's output (`datatrove.utils.text.split_into_words` /
  `split_into_sentences`), pasted as literals.
- Each filter rule has a hand-written case whose decision datatrove gives too
  (checked when the cases were written).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.document import Document
from data_pipelines.filters import quality, url
from data_pipelines.text import (
    count_sentences,
    count_words,
    spacy_rules,
    split_sentences,
    split_words,
    tokenize_chunk,
)

DATA = Path(__file__).parent / "data"
FILTERS = ["url_filter", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality"]
CONFIGS = {
    "url_filter": url.URLFilterConfig,
    "gopher_repetition": quality.GopherRepetitionConfig,
    "gopher_quality": quality.GopherQualityConfig,
    "c4_quality": quality.C4QualityConfig,
    "fineweb_quality": quality.FineWebQualityConfig,
}
CLASSES = {
    "url_filter": url.URLFilter,
    "gopher_repetition": quality.GopherRepetition,
    "gopher_quality": quality.GopherQuality,
    "c4_quality": quality.C4Quality,
    "fineweb_quality": quality.FineWebQuality,
}
# Documents of the fixture on which we knowingly differ from datatrove: none.
KNOWN_EXCEPTIONS: dict[str, set[str]] = {name: set() for name in FILTERS}


def make_filter(name: str, **params):
    return CLASSES[name](CONFIGS[name](type=name, **params))


def run(name: str, text: str, url_: str = "https://example.com/page", **params) -> tuple[str | None, str]:
    """(decision, text after the filter) of filter `name` for one document."""
    doc = Document(id="t", text=text, metadata={"url": url_})
    return make_filter(name, **params)(doc), doc.text


# --------------------------------------------------------------------------- fixture agreement


@pytest.fixture(scope="module")
def fixture_docs() -> list[dict]:
    with gzip.open(DATA / "filters_fixture.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads((DATA / "filters_golden.json").read_text())["filters"]


def test_fixture_is_permissive_and_covers_keep_and_drop(fixture_docs, golden):
    permissive = {"python3.11-doc", "postgresql-doc-15", "python-django-doc", "fortunes", "fortunes-min"}
    assert len(fixture_docs) >= 100
    assert {d["source"] for d in fixture_docs} <= permissive
    for name in FILTERS:
        decisions = golden[name]["decisions"]
        assert set(decisions) == {d["id"] for d in fixture_docs}
        kept = sum(keep for keep, _, _ in decisions.values())
        assert 0 < kept < len(decisions), name


@pytest.mark.parametrize("name", FILTERS)
def test_fixture_agrees_with_datatrove(name, fixture_docs, golden):
    f = make_filter(name)
    wrong = {}
    for d in fixture_docs:
        doc = Document(id=d["id"], text=d["text"], metadata={"url": d["url"]})
        got = f(doc)
        keep, reason, text_sha1 = golden[name]["decisions"][d["id"]]
        expected = None if keep else reason
        if got != expected:
            wrong[d["id"]] = (expected, got)
        elif keep and text_sha1 is not None and hashlib.sha1(doc.text.encode()).hexdigest() != text_sha1:
            wrong[d["id"]] = ("text", "differs")
    assert set(wrong) == KNOWN_EXCEPTIONS[name], wrong


# --------------------------------------------------------------------------- tokenizer

# spaCy 3.8 (spacy.blank("en"), as datatrove's split_into_words) on tricky strings.
WORD_CASES = [
    ("I haven't seen it, don't you know?",
     ["I", "have", "n't", "seen", "it", ",", "do", "n't", "you", "know", "?"]),
    ("Can't stop: won't stop! We'll see; they'd've gone.",
     ["Ca", "n't", "stop", ":", "wo", "n't", "stop", "!", "We", "'ll", "see", ";", "they", "'d", "'ve", "gone", "."]),
    ("e.g. the U.S. and i.e. etc. vs. Mr. Smith (e.g.) Ph.D.,",
     ["e.g.", "the", "U.S.", "and", "i.e.", "etc", ".", "vs.", "Mr.", "Smith", "(", "e.g.", ")", "Ph.D.", ","]),
    ("Visit https://www.example.com/path?q=1&x=2. Or www.example.org!",
     ["Visit", "https://www.example.com/path?q=1&x=2", ".", "Or", "www.example.org", "!"]),
    ("well-known self-driving 3-4 pages and/or 10km 5km/h w/o",
     ["well", "-", "known", "self", "-", "driving", "3", "-", "4", "pages", "and/or", "10", "km", "5", "km/h", "w/o"]),
    ("(parenthesized) [bracketed] {braced} \"quoted\" 'single'",
     ["(", "parenthesized", ")", "[", "bracketed", "]", "{", "braced", "}", '"', "quoted", '"', "'", "single", "'"]),
    ("Hello...world \u2026 wait... ok", ["Hello", "...", "world", "\u2026", "wait", "...", "ok"]),
    ("C++ x=1 a/b a<b f(x) foo.bar() obj.Method self.assertEqual(a,b)",
     ["C++", "x=1", "a", "/", "b", "a", "<", "b", "f(x", ")", "foo.bar", "(", ")", "obj", ".", "Method",
      "self.assertEqual(a", ",", "b", ")"]),
    ("$100 \u20ac5 US$10 100% 50\u00b0F. 3.14 1,000,000",
     ["$", "100", "\u20ac", "5", "US$", "10", "100", "%", "50", "\u00b0", "F", ".", "3.14", "1,000,000"]),
    ("gonna gotta cannot dont Im y'all it's John's",
     ["gon", "na", "got", "ta", "can", "not", "do", "nt", "I", "m", "y'", "all", "it", "'s", "John", "'s"]),
    ("emoticons :) :-( ;) <3 x:) (: ^_^", ["emoticons", ":)", ":-(", ";)", "<3", "x", ":)", "(:", "^_^"]),
    ("email: someone@example.com, path /usr/local/bin/python3.",
     ["email", ":", "someone@example.com", ",", "path", "/usr", "/", "local", "/", "bin", "/", "python3", "."]),
    ("Stra\u00dfe na\u00efve caf\u00e9 \u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059\u3002 "
     "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",
     ["Stra\u00dfe", "na\u00efve", "caf\u00e9", "\u6771\u4eac\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059",
      "\u3002", "\u041f\u0440\u0438\u0432\u0435\u0442", ",", "\u043c\u0438\u0440", "!"]),
    ("hello.World this.is a.m. 10a.m. p.m.)", ["hello", ".", "World", "this.is", "a.m.", "10", "a.m.", "p.m.", ")"]),
    ("--option --- \u2014 \u2013 ~ a--b a\u2014b",
     ["--option", "---", "\u2014", "\u2013", "~", "a", "--", "b", "a", "\u2014", "b"]),
    ("line1\nline2\n\n  indented\ttab\u00a0nbsp", ["line1", "line2", "indented", "tab", "nbsp"]),
    ("SELECT * FROM t WHERE a >= 1; -- comment",
     ["SELECT", "*", "FROM", "t", "WHERE", "a", ">", "=", "1", ";", "--", "comment"]),
    ("\"Don't,\" she said. 'Twas 'bout time\u2019s up.",
     ['"', "Do", "n't", ",", '"', "she", "said", ".", "'", "Twas", "'bout", "time", "\u2019s", "up", "."]),
]

# spaCy's sentencizer (datatrove's split_into_sentences).
SENTENCE_CASES = [
    ("Hello world. This is it! Next one... ok? yes", ["Hello world.", " This is it!", " Next one... ok?", " yes"]),
    ("Dr. Smith went to Washington. He arrived at 10 a.m. today.",
     ["Dr. Smith went to Washington.", " He arrived at 10 a.m. today."]),
    ('Is this it?! Yes. "Quoted." Then (parenthetical.) More',
     ["Is this it?!", ' Yes. "', 'Quoted."', " Then (parenthetical.)", " More"]),
    ("No final punctuation here", ["No final punctuation here"]),
    ("Version 3.11. Released 2023. See https://python.org. Done.",
     ["Version 3.11.", " Released 2023.", " See https://python.org.", " Done."]),
    ("One.  Two.\tThree .  )", ["One.", "  Two.", "\tThree .", "  )"]),
    ("\u6771\u4eac\u3002\u5927\u962a\u3002 Ok!", ["\u6771\u4eac\u3002\u5927\u962a\u3002", " Ok!"]),
]


@pytest.mark.parametrize("text,expected", WORD_CASES)
def test_words_match_spacy(text, expected):
    assert split_words(text) == expected
    assert count_words(text) == len(expected)
    # the uncached algorithm gives the same as the cached fast paths
    assert [t for chunk in text.split() for t in tokenize_chunk(chunk)] == expected


@pytest.mark.parametrize("text,expected", SENTENCE_CASES)
def test_sentences_match_spacy(text, expected):
    assert split_sentences(text) == expected
    assert count_sentences(text) == len(expected)


def test_sentences_of_empty_text():
    assert count_sentences("") == 0
    assert split_sentences("") == [""]


def _all_chars(pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000 and regex.fullmatch(chr(c))]


def test_letter_runs_are_single_tokens():
    """The letters-only fast path is exact: no prefix, suffix or infix rule of spaCy's
    can match at, or around, any letter (so runs of letters are never split), and the
    infix pre-check is exact: no infix rule matches around any word character."""
    r = spacy_rules()
    for ch in _all_chars(r"[^\W\d_]"):
        assert not r.prefix_search(ch) and not r.suffix_search(ch) and not r.suffix_search("a" + ch), repr(ch)
    for ch in _all_chars(r"\w"):
        for probe in ("a" + ch + "a", "1" + ch + "1", ch * 3, "A" + ch + "A"):
            assert next(r.infix_finditer(probe), None) is None, repr(ch)


# --------------------------------------------------------------------------- n-gram helpers
# datatrove's functions (gopher_repetition_filter.py, Apache-2.0), as references.


def _dt_find_duplicates(x):
    unique, chars, elements = set(), 0, 0
    for e in x:
        if e in unique:
            chars += len(e)
            elements += 1
        else:
            unique.add(e)
    return elements, chars


def _dt_top_duplicate(words, n):
    grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    top = Counter(grams).most_common(1)[0]
    return len(top[0]) * top[1]


def _dt_find_all_duplicate(words, n):
    unique, repeated, idx = set(), 0, 0
    while idx < len(words) - n + 1:
        gram = "".join(words[idx : idx + n])
        if gram in unique:
            repeated += len(gram)
            idx += n
        else:
            unique.add(gram)
            idx += 1
    return repeated


@pytest.mark.parametrize("seed", range(40))
def test_ngram_counts_match_datatrove(seed):
    rng = random.Random(seed)
    # a small vocabulary whose concatenations collide ("ab"+"c" == "a"+"bc")
    vocab = ["a", "b", "ab", "c", "bc", "abc", "the", "cat", "\u00e9t\u00e9", "\U0001f600"][: rng.randint(2, 10)]
    words = [rng.choice(vocab) for _ in range(rng.randint(1, 120))]
    assert quality.duplicate_stats(words) == _dt_find_duplicates(words)
    for sep in (" ", ""):
        hashes = quality.NGramHashes(words, sep)
        for n in range(1, 11):
            if len(words) < n:
                continue
            h, lengths = hashes.ngrams(n)
            if sep == " ":
                assert quality.top_ngram_chars(h, lengths) == _dt_top_duplicate(words, n)
            else:
                assert quality.repeated_ngram_chars(h, lengths, n) == _dt_find_all_duplicate(words, n)
        ns = [n for n in range(1, 11) if n <= len(words)]
        grams = {n: [sep.join(words[i : i + n]) for i in range(len(words) - n + 1)] for n in ns}
        counts = {n: Counter(grams[n]) for n in ns}
        expected = (
            [max(counts[n].values()) for n in ns],
            [max(len(g) * k for g, k in counts[n].items()) for n in ns],
            [sum(len(g) * (k - 1) for g, k in counts[n].items()) for n in ns],
        )
        assert hashes.summary(ns) == expected


@pytest.mark.parametrize("seed", range(60))
def test_repetition_rules_match_datatrove(seed):
    """The filter's shortcuts (bounds from the batched summary) decide as datatrove's loop,
    on texts with copied stretches and random thresholds."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(rng.randint(5, 100))] + ["ab", "c", "a", "bc"]
    words: list[str] = []
    while len(words) < rng.randint(5, 300):
        if words and rng.random() < 0.3:
            start = rng.randrange(len(words))
            words += words[start : start + rng.randint(3, 12)]
        else:
            words.append(rng.choice(vocab))
    text = " ".join(words)
    top = tuple((n, rng.uniform(0.0, 0.6)) for n in (2, 3, 4)) if seed % 2 else ()
    dup = tuple((n, rng.uniform(0.0, 0.5)) for n in range(5, 11))
    f = quality.GopherRepetition(quality.GopherRepetitionConfig(
        type="gopher_repetition", dup_line_frac=None, dup_para_frac=None, dup_line_char_frac=None,
        dup_para_char_frac=None, top_n_grams=top, dup_n_grams=dup))
    expected = None
    for n, frac in top:
        if len(words) >= n and _dt_top_duplicate(words, n) / len(text) > frac:
            expected = f"top_{n}_gram"
            break
    else:
        for n, frac in dup:
            if _dt_find_all_duplicate(words, n) / len(text) > frac:
                expected = f"duplicated_{n}_n_grams"
                break
    assert f(Document("d", text)) == expected


@pytest.mark.parametrize("frac", [-0.5, 0.0, 0.1, 0.18, 0.2, 1 / 3, 1.0, 2.5])
@pytest.mark.parametrize("text_len", [1, 3, 7, 10, 100, 12345])
def test_bound(frac, text_len):
    bound = quality._bound(frac, text_len)
    assert bound / text_len <= frac < (bound + 1) / text_len


def test_repeated_ngrams_compare_concatenations():
    # the same characters split differently still repeat, as with datatrove's "".join
    words = ["ab", "c", "d", "e", "f", "x", "a", "bc", "d", "e", "f"]
    h, lengths = quality.NGramHashes(words, "").ngrams(5)
    assert quality.repeated_ngram_chars(h, lengths, 5) == _dt_find_all_duplicate(words, 5) == len("abcdef")


# --------------------------------------------------------------------------- one case per rule
# Decisions checked against datatrove 0.10.1 when written.

PARAGRAPH = (
    "The committee met on Tuesday to review the budget and the schedule for the new library. "
    "Members agreed that the reading rooms should stay open later in the evening, and they asked "
    "the architect to revise the plans for the children's wing before the next meeting. "
    "Several residents spoke in favour of a larger garden with benches and shade trees."
)
SENTENCES = [s.strip() + "." for s in PARAGRAPH.split(".") if s.strip()]
NO_STOP_WORDS = " ".join(
    ["Members", "agreed", "reading", "rooms", "should", "stay", "open", "later", "evening",
     "residents", "spoke", "in", "favour", "larger", "garden", "benches", "shade", "trees."] * 4
)


def _filler(count: int, start: int = 0) -> list[str]:
    """Distinct words."""
    return [f"w{i:03d}" for i in range(start, start + count)]


def _repeated_phrase_text(phrase: list[str], times: int, filler_per_copy: int) -> str:
    words: list[str] = []
    for k in range(times):
        words += phrase + _filler(filler_per_copy, start=k * filler_per_copy)
    return " ".join(words)


RULE_CASES = [
    # Gopher quality
    ("gopher_quality", {}, "The cat sat on the mat.", "gopher_short_doc"),
    ("gopher_quality", {"max_doc_words": 20}, PARAGRAPH, "gopher_long_doc"),
    ("gopher_quality", {}, " ".join(["it is an ox to be or so we go"] * 6) + ".", "gopher_below_avg_threshold"),
    ("gopher_quality", {}, " ".join(["internationalization", "characteristically", "the", "of",
                                     "responsibilities", "disproportionately"] * 10), "gopher_above_avg_threshold"),
    ("gopher_quality", {}, PARAGRAPH + " " + " ".join(["#tag"] * 20), "gopher_too_many_hashes"),
    ("gopher_quality", {}, PARAGRAPH + " wait..." * 15, "gopher_too_many_ellipsis"),
    ("gopher_quality", {}, "\n".join("- " + s for s in SENTENCES * 3), "gopher_too_many_bullets"),
    ("gopher_quality", {}, "\n".join(s[:-1] + "..." if i % 2 else s for i, s in enumerate(SENTENCES * 2)),
     "gopher_too_many_end_ellipsis"),
    ("gopher_quality", {}, PARAGRAPH + " " + " ".join(str(i) for i in range(100, 400)), "gopher_below_alpha_threshold"),
    ("gopher_quality", {}, NO_STOP_WORDS, "gopher_enough_stop_words"),
    # "haven't" gives the stop word "have" (spaCy splits it as "have" "n't")
    ("gopher_quality", {}, NO_STOP_WORDS + " We haven't seen the end.", None),
    ("gopher_quality", {}, PARAGRAPH, None),
    # Gopher repetition
    ("gopher_repetition", {}, "", "empty"),
    ("gopher_repetition", {}, "Alpha paragraph here.\n\n" * 3 + "Beta paragraph.", "dup_para_frac"),
    ("gopher_repetition", {}, "\n\n".join([PARAGRAPH, "Short one.", "Short two.", PARAGRAPH]), "dup_para_char_frac"),
    ("gopher_repetition", {}, "\n".join(["a line", "b line", "a line", "c line", "a line", "d line", "a line",
                                         "e line", "a line", "f line"]), "dup_line_frac"),
    ("gopher_repetition", {}, "\n".join([PARAGRAPH, "x one", "x two", "x three", PARAGRAPH]), "dup_line_char_frac"),
    ("gopher_repetition", {}, " ".join(f"new york w{i}" for i in range(30)), "top_2_gram"),
    ("gopher_repetition", {}, _repeated_phrase_text(["aaaaaaaa", "bbbbbbbb", "cccccccc"], 10, 14), "top_3_gram"),
    ("gopher_repetition", {}, _repeated_phrase_text(["aaaaaaaa", "bbbbbbbb", "cccccccc", "dddddddd"], 10, 26),
     "top_4_gram"),
    ("gopher_repetition", {}, " ".join(SENTENCES[1].split() * 2 + _filler(20)), "duplicated_5_n_grams"),
    *[("gopher_repetition", {"top_n_grams": [], "dup_n_grams": [[n, 0.05]]},
       " ".join(SENTENCES[0].split() * 2 + _filler(60)), f"duplicated_{n}_n_grams") for n in range(5, 11)],
    ("gopher_repetition", {"top_n_grams": [], "dup_n_grams": [[10, 0.05]]},
     " ".join(SENTENCES[0].split()[:9] * 2 + _filler(60)), None),
    ("gopher_repetition", {}, PARAGRAPH, None),
    # C4
    ("c4_quality", {}, PARAGRAPH + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", "lorem_ipsum"),
    ("c4_quality", {}, PARAGRAPH + "\nUse the {braces} in this line.", "curly_bracket"),
    ("c4_quality", {}, "This is one line.\nThis is another line.", "too_few_sentences"),
    ("c4_quality", {}, "One sentence here. Two sentences here. Three here. Four here. Five here.", None),
    ("c4_quality", {"min_num_sentences": 6}, "One sentence here. Two sentences here. Three here. Four here. Five here.",
     "too_few_sentences"),
    # FineWeb
    ("fineweb_quality", {}, "  \n\n \n", "empty"),
    ("fineweb_quality", {}, "\n".join(f"A line number {i} without an end mark" for i in range(10)), "line_punct_ratio"),
    ("fineweb_quality", {}, "\n".join(f"Short line {i}." for i in range(10)), "short_line_ratio"),
    ("fineweb_quality", {}, "\n".join(SENTENCES + SENTENCES[:1]), "char_dup_ratio"),
    ("fineweb_quality", {}, "\n".join(f"Internationalization_{i}_configuration_value." for i in range(10)),
     "list_ratio"),
    ("fineweb_quality", {}, "\n".join(SENTENCES), None),
]

URL_CASES = [
    ({}, "https://0-1sex.com/page", "domain"),
    ({}, "http://000iblogchix.blogspot.com/2010/01/post.html", "subdomain"),
    ({"extra_urls": ["https://example.com/private/page.html"], "use_integrated_lists": False},
     "https://example.com/private/page.html", "url"),
    ({}, "https://shop.example.com/buy-cialis-now", "hard_blacklisted"),
    ({}, "https://example.com/babes/brunette-gallery", "soft_blacklisted"),
    ({}, "https://example.com/babes/gallery", None),
    ({"soft_word_threshold": 1}, "https://example.com/babes/gallery", "soft_blacklisted"),
    ({}, "https://example.com/thebluewaffles", "blacklisted_subword"),
    ({"extra_domains": ["example.net"], "use_integrated_lists": False}, "https://www.example.net/x", "domain"),
    ({"extra_domains": ["www.example.net"], "use_integrated_lists": False}, "https://www.example.net/x", "subdomain"),
    ({"banned_subwords": ["pyth"], "use_integrated_lists": False}, "https://docs.python.org/3/", "blacklisted_subword"),
    ({}, "https://docs.python.org/3/library/re.html", None),
]


@pytest.mark.parametrize("name,params,text,expected", RULE_CASES)
def test_rule(name, params, text, expected):
    assert run(name, text, **params)[0] == expected


@pytest.mark.parametrize("params,url_,expected", URL_CASES)
def test_url_rule(params, url_, expected):
    assert run("url_filter", "text", url_, **params)[0] == expected


def test_c4_keeps_only_good_lines():
    text = "\n".join([
        "This is a good first line.",
        "short line.",
        "This line has no end punctuation",
        "This line mentions JavaScript which is dropped.",
        "Read our privacy policy for the details.",
        "Another good line here [1].",
        "Third good line here too!",
        "A line with a " + "x" * 1001 + " word.",
        "Fourth good line: yes?",
        'Fifth good line with "quotes".',
        "A line that trails off...",
        "Sixth good line, citation needed[citation needed].",
    ])
    decision, out = run("c4_quality", text)
    assert decision is None
    assert out == "\n".join([
        "This is a good first line.",
        "Another good line here .",
        "Third good line here too!",
        "Fourth good line: yes?",
        'Fifth good line with "quotes".',
        "Sixth good line, citation needed.",
    ])


def test_c4_sentence_mode():
    decision, out = run("c4_quality", "One two three. Four five six! Short. Seven eight nine?", split_paragraph=False,
                        min_num_sentences=2)
    assert decision is None
    assert out == "One two three. Four five six! Seven eight nine?"


def test_url_filter_rejects_a_document_without_url_instead_of_crashing():
    url_filter = make_filter("url_filter", use_integrated_lists=False)
    assert url_filter(Document("d", "text", {})) == "missing_url"
    assert url_filter(Document("d", "text", {"url": None})) == "missing_url"


# --------------------------------------------------------------------------- configs and lists


def test_config_defaults_are_datatrove_defaults():
    g = quality.GopherQualityConfig(type="gopher_quality")
    assert (g.min_doc_words, g.max_doc_words, g.min_avg_word_length, g.max_avg_word_length) == (50, 100000, 3, 10)
    assert (g.max_symbol_word_ratio, g.max_bullet_lines_ratio, g.max_ellipsis_lines_ratio) == (0.1, 0.9, 0.3)
    assert (g.max_non_alpha_words_ratio, g.min_stop_words, g.stop_words) == (0.8, 2, None)
    r = quality.GopherRepetitionConfig(type="gopher_repetition")
    assert (r.dup_line_frac, r.dup_para_frac, r.dup_line_char_frac, r.dup_para_char_frac) == (0.3, 0.3, 0.2, 0.2)
    assert r.top_n_grams == ((2, 0.2), (3, 0.18), (4, 0.16))
    assert r.dup_n_grams == ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    c = quality.C4QualityConfig(type="c4_quality")
    assert (c.min_num_sentences, c.min_words_per_line, c.max_word_length) == (5, 3, 1000)
    assert all([c.split_paragraph, c.remove_citations, c.filter_no_terminal_punct, c.filter_lorem_ipsum,
                c.filter_javascript, c.filter_curly_bracket, c.filter_policy])
    f = quality.FineWebQualityConfig(type="fineweb_quality")
    assert (f.line_punct_thr, f.line_punct_exclude_zero, f.stop_chars, f.short_line_thr) == (0.12, False, None, 0.67)
    assert (f.short_line_length, f.char_duplicates_ratio, f.new_line_ratio) == (30, 0.01, 0.3)
    u = url.URLFilterConfig(type="url_filter")
    assert (u.soft_word_threshold, u.use_integrated_lists) == (2, True)


@pytest.mark.parametrize("name", FILTERS)
def test_configs_round_trip_and_reject_unknown_keys(name):
    cfg = CONFIGS[name](type=name)
    assert CONFIGS[name].model_validate_json(cfg.model_dump_json()) == cfg
    assert CLASSES[name].type == name
    with pytest.raises(ValueError):
        CONFIGS[name](type=name, no_such_parameter=1)


def test_custom_stop_words():
    assert run("gopher_quality", NO_STOP_WORDS, stop_words=["garden", "benches"])[0] is None


def test_word_lists_follow_datatrove_parsing():
    assert url.parse_list(["#comment\n", "Blow Job\n", "x-y\n"]) == {"blowjob", "xy"}
    assert url.parse_list(["#c\n", " a.com \n", "\n"], do_normalize=False) == {"a.com", ""}
    assert "cialis" in url.integrated_words("banned_words")
    assert len(url.integrated_urls()) > 10000


def test_domain_list_keys():
    assert url.domain_list_keys(b"a.com\nb.org\n") == [b"a.com", b"b.org"]
    assert url.domain_list_keys(b"a.com\nb.org") == [b"a.com", b"b.org"]
    irregular = b"#c\n a.com \r\n\nb.org"
    assert sorted(url.domain_list_keys(irregular)) == [b"", b"a.com", b"b.org"]


def test_domain_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    asset = tmp_path / "domains.xz"
    asset.write_bytes(lzma.compress(b"bad.example\nworse.example\nbad.example\n"))
    hashes = url.integrated_domain_hashes.__wrapped__(asset)
    assert isinstance(hashes, np.memmap) and len(hashes) == 2 and np.all(hashes[:-1] < hashes[1:])
    (cached,) = (tmp_path / "cache" / "maxllm").glob("ut1_domains-*.npy")
    assert set(hashes.tolist()) == {url.hash64("bad.example"), url.hash64("worse.example")}
    assert not list(cached.parent.glob("*.tmp"))
    again = url.integrated_domain_hashes.__wrapped__(asset)  # read back, not rebuilt
    assert np.array_equal(hashes, again)
