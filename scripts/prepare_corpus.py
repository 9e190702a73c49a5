#!/usr/bin/env python3
"""Build the shipped text corpus (``compress/data``) and the offline lm-eval task data (``compress/tasks``).

Source: the World English Bible (public domain) as packaged by Debian in ``sword-text-web`` (SWORD module
``engWEB2015eb``), exported with ``diatheke``. The script is deterministic: rerunning it on the same export
gives byte-identical files (no clocks, no unordered iteration, no seeded PRNGs whose algorithm could change;
every "random" choice is a rank by SHA-256 of a fixed string).

What the raw ``diatheke -f plain`` export looks like (SWORD 1.9 / diatheke 4.8) and what this script does
about it:

* A verse starts with a reference ``Genesis 1:1: `` at the start of a line; poetry verses continue over
  several lines (and may contain blank lines between stanzas).
* Section headings (in this module: the psalm titles and the Hebrew-letter headings of Psalm 119) are
  printed on their own line before the verse, and diatheke keeps *repeating the last heading before every
  following verse* (e.g. "A praise psalm by David." before every verse of the Deuterocanon, and Psalm 151's
  title before every verse of the New Testament). Such a heading line is always the line right before a
  verse reference that is indented with spaces; that line is dropped.
* Verses that are empty in this module (NRSVA versification slots, e.g. Sirach 34:27-31, Greek Esther 11-16)
  are printed with raw OSIS markup of the last heading glued in front of the reference (``<title ...>A
  praise psalm by David.</title> <lg .../> <l .../>Sirach 34:27: ``); that fragment is dropped.
* With footnotes filtered out (diatheke's default) the words on either side of a footnote get glued together
  ("In the beginning, Godcreated the heavens"), so the export keeps footnotes (``-o f``), which renders them
  as ``[1:1 note text]`` with the surrounding spaces intact, and this script deletes them (and the empty
  ``[]`` markers). Square brackets that belong to the text itself (Greek Esther additions, 2 Esdras) are
  kept.
* The module's glossary follows the last verse (Revelation 22:21) after a blank line; it is dropped, as is
  the trailing ``(engWEB2015eb)`` module-name line.
* Verse references are stripped, lines of one verse are joined with spaces and runs of whitespace collapse
  to one space, so each verse is plain prose.

Documents are chapters: the cleaned verses of one chapter joined with single spaces. A chapter goes to the
eval part iff the first 8 bytes of SHA-256("<Book> <chapter>") (big-endian) are 0 mod 10; everything else is
calibration. The split is by whole chapters, never inside one.

Usage::

    python scripts/prepare_corpus.py                 # export with diatheke and (re)write all files
    python scripts/prepare_corpus.py --check         # rebuild in memory, exit 1 if a shipped file differs
    python scripts/prepare_corpus.py --raw web.txt   # use a saved export instead of running diatheke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

MODULE = "engWEB2015eb"
DEBIAN_PACKAGE = "sword-text-web"
EXPORT_RANGE = "Gen 1:1-Rev 22:21"
EXPORT_CMD = ["diatheke", "-b", MODULE, "-f", "plain", "-o", "f", "-k", EXPORT_RANGE]
EXPORT_CMD_TEXT = f"diatheke -b {MODULE} -f plain -o f -k '{EXPORT_RANGE}'"

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path("compress/data")
TASK_DIR = Path("compress/tasks")
CALIBRATION_FILE = DATA_DIR / "web_calibration.txt"
EVAL_FILE = DATA_DIR / "web_eval.txt"
SOURCE_FILE = DATA_DIR / "SOURCE.md"
PPL_FILE = TASK_DIR / "secateurs_web_ppl.jsonl"
MC_FILE = TASK_DIR / "secateurs_web_mc.jsonl"

EVAL_MODULUS = 10  # ~1/10 of the chapters are held out
CALIBRATION_MAX_BYTES = 5_000_000  # keep the whole calibration part if it fits, else subsample chapters
CALIBRATION_TARGET_BYTES = 4_000_000
PPL_DOCS = 20  # ~12k words, ~16k tokens: about a minute for a 135M model on 2 CPU cores
MC_ITEMS = 200
MC_CHOICES = 4
MC_MIN_WORDS, MC_MAX_WORDS = 12, 40
MC_DISTRACTOR_POOL = 24  # distractors come from the eval verses whose second half is closest in length

# Book names as diatheke prints them (NRSVA versification of the module, export order).
BOOKS: tuple[str, ...] = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "I Samuel",
    "II Samuel", "I Kings", "II Kings", "I Chronicles", "II Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
    "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel",
    "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah",
    "Haggai", "Zechariah", "Malachi", "Tobit", "Judith", "Esther (Greek)", "Wisdom", "Sirach", "Baruch",
    "Prayer of Azariah", "Susanna", "Bel and the Dragon", "I Maccabees", "II Maccabees", "I Esdras",
    "Prayer of Manasses", "Additional Psalm", "III Maccabees", "II Esdras", "IV Maccabees", "Matthew", "Mark",
    "Luke", "John", "Acts", "Romans", "I Corinthians", "II Corinthians", "Galatians", "Ephesians",
    "Philippians", "Colossians", "I Thessalonians", "II Thessalonians", "I Timothy", "II Timothy", "Titus",
    "Philemon", "Hebrews", "James", "I Peter", "II Peter", "I John", "II John", "III John", "Jude",
    "Revelation of John",
)  # fmt: skip
BOOK_INDEX = {b: i for i, b in enumerate(BOOKS)}

_BOOK_ALT = "|".join(re.escape(b) for b in sorted(BOOKS, key=len, reverse=True))
# A verse reference at the start of a line, optionally indented (=> the previous line is a repeated heading)
# or preceded by leaked OSIS heading markup (empty verses).
VERSE_RE = re.compile(rf"^(?P<pre>\s*|<title\b.*/>)(?P<book>{_BOOK_ALT}) (?P<ch>\d+):(?P<vs>\d+):(?: |$)")
ANY_REF_RE = re.compile(r"^\s*(?:[1-4I]+ )?[A-Z][A-Za-z() ]* \d+:\d+: ")
FOOTNOTE_START_RE = re.compile(r"\[\s*(?:\d+:\d+|\])")
WS_RE = re.compile(r"\s+")
NL = b"\n"
GLOSSARY_START = "The following words used in the World English Bible"


@dataclass(frozen=True)
class Verse:
    book: str
    chapter: int
    verse: int
    text: str

    @property
    def ref(self) -> str:
        return f"{self.book} {self.chapter}:{self.verse}"


@dataclass(frozen=True)
class Chapter:
    book: str
    chapter: int
    verses: tuple[Verse, ...]

    @property
    def key(self) -> str:
        return f"{self.book} {self.chapter}"

    @property
    def text(self) -> str:
        return " ".join(v.text for v in self.verses)


@dataclass
class ParseReport:
    headings: Counter  # heading text -> number of dropped heading lines
    glued_fragments: int = 0  # OSIS heading fragments glued before a reference
    empty_verses: int = 0
    footnotes: int = 0
    trailer_chars: int = 0


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stable_int(text: str) -> int:
    """First 8 bytes of SHA-256(text) as a big-endian integer: a platform- and version-independent hash."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def export_raw() -> str:
    """Run diatheke and return its UTF-8 output."""
    try:
        out = subprocess.run(
            EXPORT_CMD, check=True, capture_output=True, env={"LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"}
        )
    except FileNotFoundError as e:
        raise SystemExit("diatheke not found: apt-get install diatheke sword-text-web") from e
    return out.stdout.decode("utf-8")


def package_version(package: str = DEBIAN_PACKAGE) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], check=True, capture_output=True)
    except (FileNotFoundError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.decode().strip()


def strip_footnotes(text: str) -> tuple[str, int]:
    """Replace each footnote ``[c:v ...]`` (which may itself contain brackets) and each ``[]`` by a space."""
    out: list[str] = []
    pos = n = 0
    while (m := FOOTNOTE_START_RE.search(text, pos)) is not None:
        depth, i = 0, m.start()
        while i < len(text):
            depth += {"[": 1, "]": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        if depth:
            raise ValueError(f"unbalanced footnote bracket in {text[m.start() : m.start() + 120]!r}")
        out += [text[pos : m.start()], " "]
        pos, n = i + 1, n + 1
    out.append(text[pos:])
    return "".join(out), n


def clean_verse(lines: list[str], report: ParseReport) -> str:
    """Join the lines of one verse into plain prose: drop footnotes, collapse whitespace."""
    text, n = strip_footnotes(" ".join(lines))
    report.footnotes += n
    text = WS_RE.sub(" ", text).strip()
    if "<" in text or ">" in text or re.search(r"\[\d+:\d+", text):
        raise ValueError(f"markup or footnote left in cleaned verse text: {text[:200]!r}")
    return text


def parse_export(raw: str) -> tuple[list[Verse], ParseReport]:
    """Parse a ``diatheke -f plain -o f`` export into cleaned verses (empty ones dropped), in export order."""
    lines = raw.replace("\r\n", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or lines[-1].strip() != f"({MODULE})":
        raise ValueError(f"export does not end with the module-name line ({MODULE})")
    lines.pop()

    report = ParseReport(headings=Counter())
    raw_verses: list[tuple[str, int, int, list[str]]] = []
    for lineno, line in enumerate(lines, 1):
        m = VERSE_RE.match(line)
        if m is None:
            if ANY_REF_RE.match(line):
                raise ValueError(f"line {lineno}: verse reference of an unknown book: {line[:80]!r}")
            if not raw_verses:
                if line.strip():
                    raise ValueError(f"line {lineno}: text before the first verse reference: {line[:80]!r}")
                continue
            raw_verses[-1][3].append(line)
            continue
        pre = m.group("pre")
        if pre.startswith("<"):
            report.glued_fragments += 1
        elif pre and raw_verses:
            heading = raw_verses[-1][3].pop()
            if not heading.strip():
                raise ValueError(f"line {lineno}: indented verse reference without a heading line before it")
            report.headings[WS_RE.sub(" ", strip_footnotes(heading)[0]).strip()] += 1
        raw_verses.append((m.group("book"), int(m.group("ch")), int(m.group("vs")), [line[m.end() :]]))

    # The module's glossary follows the last verse after a blank line.
    last = raw_verses[-1][3]
    if "" in [x.strip() for x in last]:
        cut = [x.strip() for x in last].index("")
        trailer = "\n".join(last[cut:]).strip()
        if not trailer.startswith(GLOSSARY_START):
            raise ValueError(f"unexpected text after the last verse: {trailer[:80]!r}")
        report.trailer_chars = len(trailer)
        del last[cut:]

    verses: list[Verse] = []
    prev = (-1, 0, 0)
    for book, ch, vs, vlines in raw_verses:
        order = (BOOK_INDEX[book], ch, vs)
        if order <= prev:
            raise ValueError(f"verse {book} {ch}:{vs} out of order (after {prev})")
        prev = order
        text = clean_verse(vlines, report)
        if text:
            verses.append(Verse(book, ch, vs, text))
        else:
            report.empty_verses += 1

    # No dropped heading may survive inside the text (catches a heading we failed to recognise as one).
    for v in verses:
        for h in report.headings:
            if len(h) > 12 and h in v.text:
                raise ValueError(f"heading {h!r} left in {v.ref}")
    return verses, report


def group_chapters(verses: list[Verse]) -> list[Chapter]:
    chapters: list[Chapter] = []
    cur: list[Verse] = []
    for v in verses:
        if cur and (cur[-1].book, cur[-1].chapter) != (v.book, v.chapter):
            chapters.append(Chapter(cur[0].book, cur[0].chapter, tuple(cur)))
            cur = []
        cur.append(v)
    if cur:
        chapters.append(Chapter(cur[0].book, cur[0].chapter, tuple(cur)))
    return chapters


def is_eval_chapter(key: str) -> bool:
    """The split rule: a chapter ("<Book> <n>") is held out iff stable_int(key) % 10 == 0."""
    return stable_int(key) % EVAL_MODULUS == 0


def subsample_calibration(chapters: list[Chapter]) -> tuple[list[Chapter], str]:
    """Keep everything if it fits in CALIBRATION_MAX_BYTES; else keep the chapters with the smallest
    stable_int("calibration:<key>") until CALIBRATION_TARGET_BYTES, in canonical order."""
    size = sum(len(c.text.encode()) + 1 for c in chapters)
    if size <= CALIBRATION_MAX_BYTES:
        return chapters, f"all calibration chapters are kept ({size} bytes <= {CALIBRATION_MAX_BYTES})"
    ranked = sorted(chapters, key=lambda c: (stable_int("calibration:" + c.key), c.key))
    kept: set[str] = set()
    total = 0
    for c in ranked:
        n = len(c.text.encode()) + 1
        if total + n > CALIBRATION_TARGET_BYTES:
            break
        kept.add(c.key)
        total += n
    rule = (
        f"the full calibration part is {size} bytes (> {CALIBRATION_MAX_BYTES}), so chapters are "
        f'subsampled: sorted by SHA-256("calibration:<Book> <n>") (first 8 bytes, big-endian) and taken in '
        f"that order while the file stays <= {CALIBRATION_TARGET_BYTES} bytes; {len(kept)} of "
        f"{len(chapters)} chapters are kept, written in canonical order"
    )
    return [c for c in chapters if c.key in kept], rule


def build_ppl_rows(eval_chapters: list[Chapter]) -> list[dict]:
    """PPL_DOCS eval chapters evenly spaced over the canon (so every part of the corpus is represented)."""
    n = len(eval_chapters)
    idx = sorted({round(i * (n - 1) / (PPL_DOCS - 1)) for i in range(PPL_DOCS)}) if n > PPL_DOCS else range(n)
    return [{"id": eval_chapters[i].key, "text": eval_chapters[i].text} for i in idx]


def _halves(text: str) -> tuple[str, str]:
    words = text.split(" ")
    k = len(words) // 2
    return " ".join(words[:k]), " ".join(words[k:])


def build_mc_rows(eval_chapters: list[Chapter], calibration_chapters: list[Chapter]) -> list[dict]:
    """Verse completion: context = first half of an eval verse, choices = its true second half and three
    second halves of other eval verses of similar length; the gold position is fixed by a hash of the verse
    reference. Verses whose text also occurs verbatim in a calibration chapter (parallel passages) are not
    used."""
    calib_text = "\n".join(c.text for c in calibration_chapters)
    pool = [
        v
        for c in eval_chapters
        for v in c.verses
        if MC_MIN_WORDS <= len(v.text.split(" ")) <= MC_MAX_WORDS and v.text not in calib_text
    ]
    if len(pool) < MC_ITEMS + MC_DISTRACTOR_POOL:
        raise ValueError(f"only {len(pool)} eligible eval verses for the multiple-choice task")
    refs = [v.ref for v in pool]
    second = [_halves(v.text)[1] for v in pool]
    second_len = [len(x.split(" ")) for x in second]
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(second_len):
        by_len.setdefault(n, []).append(i)
    chosen = sorted(range(len(pool)), key=lambda i: (stable_int("mc-item:" + refs[i]), refs[i]))[:MC_ITEMS]
    rows = []
    for i in sorted(chosen):  # canonical order
        context, gold = _halves(pool[i].text)
        glen = second_len[i]
        # the MC_DISTRACTOR_POOL other verses whose second half is closest in word count (ties: by hash)
        near: list[int] = []
        diff = 0
        while len(near) < MC_DISTRACTOR_POOL + 1 and diff <= max(by_len):
            for n in sorted({glen - diff, glen + diff}):
                near += [j for j in by_len.get(n, []) if j != i and second[j] != gold]
            diff += 1
        near.sort(key=lambda j: (abs(second_len[j] - glen), stable_int(f"len:{refs[i]}|{refs[j]}"), refs[j]))
        picks = sorted(
            near[:MC_DISTRACTOR_POOL], key=lambda j: (stable_int(f"pick:{refs[i]}|{refs[j]}"), refs[j])
        )
        distractors: list[str] = []
        for j in picks:
            if second[j] not in distractors:
                distractors.append(second[j])
            if len(distractors) == MC_CHOICES - 1:
                break
        label = stable_int("label:" + refs[i]) % MC_CHOICES
        choices = distractors[:label] + [gold] + distractors[label:]
        rows.append({"id": refs[i], "context": context, "choices": choices, "label": label})
    return rows


def doc_lines(chapters: list[Chapter]) -> bytes:
    return "".join(c.text + "\n" for c in chapters).encode("utf-8")


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def word_count(chapters: list[Chapter]) -> int:
    return sum(len(c.text.split()) for c in chapters)


def render_source_md(
    *, version: str, report: ParseReport, n_verses: int, all_chapters: list[Chapter], calib: list[Chapter],
    calib_full: list[Chapter], evals: list[Chapter], subsample_rule: str, files: dict[Path, bytes],
) -> bytes:  # fmt: skip
    heads = ", ".join(f'"{h if len(h) < 30 else h[:27] + "..."}"' for h, _ in report.headings.most_common(3))
    empty_books = [b for b in BOOKS if b not in {c.book for c in all_chapters}]
    rows = "\n".join(
        f"| `{p.name}` | {docs} | {word_count(ch)} | {len(files[p])} | `{sha256_hex(files[p])}` |"
        for p, docs, ch in ((CALIBRATION_FILE, len(calib), calib), (EVAL_FILE, len(evals), evals))
    )
    task_rows = "\n".join(
        f"| `{p.as_posix()}` | {files[p].count(NL)} | `{sha256_hex(files[p])}` |" for p in (PPL_FILE, MC_FILE)
    )
    n_heading_lines = sum(report.headings.values())
    text = f"""# Shipped text corpus: World English Bible

Generated by `scripts/prepare_corpus.py` (deterministic; `python scripts/prepare_corpus.py --check`
verifies the shipped files byte for byte). Do not edit these files by hand.

## Source

- Text: the **World English Bible** (WEB, 2020 stable text, with Deuterocanon), which is in the
  **public domain** ("World English Bible" is a trademark of eBible.org; this cleaned derivative is
  therefore not called the WEB).
- Debian package **`{DEBIAN_PACKAGE}` version `{version}`** (SWORD module `{MODULE}`, NRSVA
  versification), read with `diatheke` (SWORD 1.9).
- Export command: `{EXPORT_CMD_TEXT}`
  (`-o f` keeps footnotes as `[c:v note]`; with diatheke's default the text around a removed footnote
  is glued together, e.g. "Godcreated").

## Cleaning rules

1. A verse starts at a `<Book> <c>:<v>: ` reference at the start of a line and runs (over poetry lines
   and stanza breaks) until the next reference; the reference is stripped, the lines are joined with
   spaces.
2. Section headings are dropped: diatheke prints the last psalm title / Psalm 119 letter heading again
   before *every* later verse, on the line before an indented reference ({n_heading_lines} heading
   lines, {len(report.headings)} distinct, most frequent {heads}).
3. Raw OSIS heading markup glued in front of the reference of an empty verse (`<title ...>A praise
   psalm by David.</title> <lg .../> <l .../>Sirach 34:27: `) is dropped ({report.glued_fragments}
   lines).
4. Footnotes `[c:v ...]` and empty `[]` markers are deleted ({report.footnotes}); brackets that belong
   to the text (Greek Esther additions, 2 Esdras) are kept.
5. Whitespace runs collapse to one space. Verses left empty are dropped ({report.empty_verses}).
6. The module's glossary after Revelation 22:21 ({report.trailer_chars} characters) and the trailing
   `({MODULE})` line are dropped.

Result: {n_verses} verses in {len(all_chapters)} chapters of {len(BOOKS) - len(empty_books)} books
(the module has no text in the slots of {", ".join(empty_books)}).

## Documents and split

- One document per line = one chapter: its cleaned verses joined with single spaces (UTF-8, `\\n` line
  ends, no blank lines, no references).
- Split by whole chapters: a chapter goes to `web_eval.txt` iff the first 8 bytes (big-endian) of
  SHA-256(`"<Book> <c>"`, e.g. `"Genesis 1"`) are 0 modulo {EVAL_MODULUS}; else to
  `web_calibration.txt`. The two files never share a chapter. {len(evals)} eval /
  {len(calib_full)} calibration chapters.
- Calibration size: {subsample_rule}.
- Both files list chapters in canonical (export) order.

| file | documents | words | bytes | sha256 |
|---|---|---|---|---|
{rows}

Words = whitespace-separated tokens.

## Offline lm-eval task data (`compress/tasks/`)

Built from eval chapters only (never calibration text):

- `secateurs_web_ppl.jsonl`: {PPL_DOCS} eval chapters evenly spaced over the canon (indices
  `round(i * (n - 1) / {PPL_DOCS - 1})` of the n eval chapters), fields `id`, `text`.
- `secateurs_web_mc.jsonl`: {MC_ITEMS} verse-completion items. Eligible verses: eval verses of
  {MC_MIN_WORDS}-{MC_MAX_WORDS} words whose text does not also occur verbatim in a calibration chapter
  (parallel passages); the {MC_ITEMS} with the smallest SHA-256(`"mc-item:<ref>"`) are used (in
  canonical order). Context = first `n // 2` words; the gold choice = the remaining words; 3 distractors
  = second halves of other eligible verses, taken from the {MC_DISTRACTOR_POOL} whose second half is
  closest in word count, ranked by SHA-256(`"pick:<ref>|<other ref>"`); the gold index is
  SHA-256(`"label:<ref>"`) mod {MC_CHOICES}. Fields `id`, `context`, `choices`, `label`.
- The task YAMLs (`secateurs_web_ppl.yaml`, `secateurs_web_mc.yaml`) load these files through
  `custom_dataset: !function secateurs_web.<loader>` (`secateurs_web.py` next to them), so they work
  offline from any working directory: `lm_eval --include_path <compress/tasks> --tasks
  secateurs_web_ppl,secateurs_web_mc` (`compress.corpus.task_dir()` gives the directory).

| file | rows | sha256 |
|---|---|---|
{task_rows}
"""
    return text.encode("utf-8")


def build(raw: str, version: str) -> tuple[dict[Path, bytes], str, list[Chapter]]:
    """Return {relative path: file bytes} of every generated file, a one-line summary and all chapters."""
    verses, report = parse_export(raw)
    chapters = group_chapters(verses)
    evals = [c for c in chapters if is_eval_chapter(c.key)]
    calib_full = [c for c in chapters if not is_eval_chapter(c.key)]
    calib, rule = subsample_calibration(calib_full)
    files: dict[Path, bytes] = {
        CALIBRATION_FILE: doc_lines(calib),
        EVAL_FILE: doc_lines(evals),
        PPL_FILE: jsonl(build_ppl_rows(evals)),
        MC_FILE: jsonl(build_mc_rows(evals, calib_full)),
    }
    files[SOURCE_FILE] = render_source_md(
        version=version, report=report, n_verses=len(verses), all_chapters=chapters, calib=calib,
        calib_full=calib_full, evals=evals, subsample_rule=rule, files=files,
    )  # fmt: skip
    summary = (
        f"{len(verses)} verses, {len(chapters)} chapters; calibration {len(calib)} docs "
        f"{len(files[CALIBRATION_FILE])} B; eval {len(evals)} docs {len(files[EVAL_FILE])} B; {rule}"
    )
    return files, summary, chapters


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", type=Path, help="use this saved diatheke export instead of running diatheke")
    ap.add_argument("--save-raw", type=Path, help="also write the raw diatheke export here")
    ap.add_argument(
        "--out", type=Path, default=REPO, help="repository root to write into (default: this repo)"
    )
    ap.add_argument("--package-version", help="override the recorded Debian package version")
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if any shipped file differs")
    args = ap.parse_args(argv)

    raw = args.raw.read_text(encoding="utf-8") if args.raw else export_raw()
    if args.save_raw:
        args.save_raw.write_text(raw, encoding="utf-8")
    files, summary, _ = build(raw, args.package_version or package_version())
    print(summary)
    if args.check:
        stale = [
            p
            for p, data in files.items()
            if not (args.out / p).is_file() or (args.out / p).read_bytes() != data
        ]
        for p in stale:
            print(f"differs: {p}", file=sys.stderr)
        return 1 if stale else 0
    for p, data in files.items():
        (args.out / p).parent.mkdir(parents=True, exist_ok=True)
        (args.out / p).write_bytes(data)
        print(f"wrote {p} ({len(data)} bytes, sha256 {sha256_hex(data)[:16]}...)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
