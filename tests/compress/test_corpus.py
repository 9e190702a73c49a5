"""Shipped corpus, data API (compress.corpus) and the offline lm-eval tasks."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from compress.corpus import (
    DATA_DIR,
    MIXTURES,
    calibration_batches,
    corpus_fingerprint,
    eval_windows,
    load_documents,
    mixture_counts,
    mixture_parts,
    task_dir,
)
from quant.errors import InputError
from tests.tiny_tokenizer import TINY_VOCAB_SIZE, build_tiny_llama, build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _load_prepare_script():
    spec = importlib.util.spec_from_file_location("prepare_corpus", REPO / "scripts" / "prepare_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare_corpus"] = module
    spec.loader.exec_module(module)
    return module


prep = _load_prepare_script()


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="module")
def calib_docs() -> list[str]:
    return load_documents("web:calibration")


@pytest.fixture(scope="module")
def eval_docs() -> list[str]:
    return load_documents("web:eval")


# --------------------------------------------------------------------------------------------- shipped corpus


def test_shipped_documents_load(calib_docs: list[str], eval_docs: list[str]) -> None:
    assert len(calib_docs) > 1000 and len(eval_docs) > 100
    for path in (DATA_DIR / "web_calibration.txt", DATA_DIR / "web_eval.txt"):
        data = path.read_bytes()
        assert data.endswith(b"\n") and b"\n\n" not in data and b"\r" not in data
        data.decode("utf-8")
    total = sum((DATA_DIR / f).stat().st_size for f in ("web_calibration.txt", "web_eval.txt"))
    assert total < 5_500_000


def test_source_md_records_hashes_and_counts(calib_docs: list[str], eval_docs: list[str]) -> None:
    source = (DATA_DIR / "SOURCE.md").read_text(encoding="utf-8")
    for name, docs in (("web_calibration.txt", calib_docs), ("web_eval.txt", eval_docs)):
        digest = hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest()
        assert f"| `{name}` | {len(docs)} |" in source
        assert digest in source
    assert "sword-text-web" in source and "public domain" in source


def test_splits_never_share_a_document(calib_docs: list[str], eval_docs: list[str]) -> None:
    assert not set(calib_docs) & set(eval_docs)
    assert len(set(eval_docs)) == len(eval_docs)


def test_cleaning_removed_headings_references_and_footnote_glue(calib_docs: list[str], eval_docs: list[str]) -> None:
    text = "\n".join(calib_docs + eval_docs)
    # diatheke repeats the last heading before every later verse: none may survive
    for heading in (
        "A praise psalm by David.",
        "This Psalm is a genuine one of David",
        "A Psalm by David, when he fled from Absalom his son.",
        "For the Chief Musician",
        "ALEPH",
    ):
        assert heading not in text
    # Psalm 3 starts with its first verse, not with its (glued) title
    assert any(
        d.startswith("Yahweh, how my adversaries have increased! Many are those") for d in calib_docs + eval_docs
    )
    assert "<title" not in text and "<l " not in text and "/>" not in text
    assert "(engWEB2015eb)" not in text and "The following words used in the World English Bible" not in text
    assert not re.search(r"\b(?:Genesis|Psalms|Matthew|Revelation of John) \d+:\d+:", text)
    assert not re.search(r"\[\s*\d+:\d+", text)  # footnotes
    # removing footnotes must not glue words together (diatheke's default output has "Godcreated")
    assert "Godcreated" not in text and "YahwehGod" not in text and "Lord,you" not in text
    assert any(d.startswith("In the beginning, God created the heavens and the earth.") for d in calib_docs + eval_docs)
    assert "  " not in text


def test_parse_export_handles_diatheke_quirks() -> None:
    raw = (
        "Genesis 1:1: In the beginning, God [1:1 The Hebrew word rendered “God” is “Elohim”.] created it.\n"
        "Genesis 1:2: The earth was [1:2 a note with [nested] brackets] empty. \n"
        "A Psalm by David.\n"
        "  Genesis 1:3: Poetry line one,\n"
        "line two. \n"
        "\n"
        "line after a stanza break.\n"
        "A Psalm by David. []  extra\n"
        "  Genesis 2:1: Second chapter [with real brackets] here.\n"
        '<title canonical="true" type="psalm">A Psalm by David.</title> <lg sID="g1"/> <l level="1" sID="2"/>'
        "Genesis 2:2: \n"
        "Genesis 2:3: Last verse.\n"
        "\n\n   The following words used in the World English Bible (WEB) are not very common.\n"
        "(engWEB2015eb)\n"
    )
    verses, report = prep.parse_export(raw)
    assert [(v.chapter, v.verse, v.text) for v in verses] == [
        (1, 1, "In the beginning, God created it."),
        (1, 2, "The earth was empty."),
        (1, 3, "Poetry line one, line two. line after a stanza break."),
        (2, 1, "Second chapter [with real brackets] here."),
        (2, 3, "Last verse."),
    ]
    assert report.headings["A Psalm by David."] == 1 and report.headings["A Psalm by David. extra"] == 1
    assert report.glued_fragments == 1 and report.empty_verses == 1
    chapters = prep.group_chapters(verses)
    assert [c.key for c in chapters] == ["Genesis 1", "Genesis 2"]
    assert chapters[1].text == "Second chapter [with real brackets] here. Last verse."


def test_parse_export_rejects_unknown_books_and_missing_module_line() -> None:
    with pytest.raises(ValueError, match="module-name"):
        prep.parse_export("Genesis 1:1: text\n")
    with pytest.raises(ValueError, match="unknown book"):
        prep.parse_export("Genesis 1:1: text\nNotabook 1:2: more\n(engWEB2015eb)\n")


def test_task_data_comes_from_eval_chapters_only(calib_docs: list[str], eval_docs: list[str]) -> None:
    eval_set = set(eval_docs)
    calib_text = "\n".join(calib_docs)
    ppl = [json.loads(x) for x in (task_dir() / "secateurs_web_ppl.jsonl").read_text("utf-8").splitlines()]
    assert len(ppl) == 20
    for row in ppl:
        assert row["text"] in eval_set and prep.is_eval_chapter(row["id"])
    mc = [json.loads(x) for x in (task_dir() / "secateurs_web_mc.jsonl").read_text("utf-8").splitlines()]
    assert len(mc) == 200 and len({r["id"] for r in mc}) == 200
    eval_text = "\n".join(eval_docs)
    for row in mc:
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4 and 0 <= row["label"] < 4
        verse = row["context"] + " " + row["choices"][row["label"]]
        assert verse in eval_text and verse not in calib_text
        assert prep.is_eval_chapter(row["id"].rsplit(":", 1)[0])


def test_split_rule_and_byte_identical_rebuild() -> None:
    """Re-export with diatheke and rebuild: every shipped file is byte-identical (what ``--check`` verifies),
    and the split puts each chapter in exactly one part according to the hash rule."""
    if shutil.which("diatheke") is None or prep.package_version() == "unknown":
        pytest.skip("diatheke / sword-text-web not installed")
    files, _, chapters = prep.build(prep.export_raw(), prep.package_version())
    for rel, data in files.items():
        assert (REPO / rel).read_bytes() == data, f"{rel} differs from a fresh rebuild"
    keys = [c.key for c in chapters]
    assert len(keys) == len(set(keys))
    eval_keys = {c.key for c in chapters if prep.is_eval_chapter(c.key)}
    calib_keys = set(keys) - eval_keys
    assert eval_keys and calib_keys and not eval_keys & calib_keys
    by_text = {c.text: c.key for c in chapters}
    assert {by_text[d] for d in load_documents("web:eval")} == eval_keys
    assert {by_text[d] for d in load_documents("web:calibration")} <= calib_keys


# ------------------------------------------------------------------------------------------------- data API


def test_tiny_tokenizer(tok) -> None:
    assert len(tok) == TINY_VOCAB_SIZE
    assert tok.eos_token == "</s>" and tok.bos_token == "<s>" and tok.pad_token == "<pad>" and tok.unk_token
    text = "In the beginning, God created — “ñ” 123"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_calibration_batches_deterministic_and_seeded(tok) -> None:
    a = calibration_batches(tok, "web:calibration", n_samples=4, seq_len=32, seed=0)
    b = calibration_batches(tok, "web:calibration", n_samples=4, seq_len=32, seed=0)
    c = calibration_batches(tok, "web:calibration", n_samples=4, seq_len=32, seed=1)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < len(tok)


def test_calibration_windows_are_corpus_text(tok, calib_docs: list[str]) -> None:
    batch = calibration_batches(tok, "web:calibration", n_samples=3, seq_len=16, seed=5)
    corpus = "\n".join(calib_docs)
    for row in batch:
        words = tok.decode(row.tolist(), skip_special_tokens=True).split()
        assert " ".join(words[1:-1]) in corpus.replace("\n", " ") or tok.eos_token_id in row.tolist()


def test_eval_windows_deterministic_consecutive(tok, eval_docs: list[str]) -> None:
    w = eval_windows(tok, "web:eval", seq_len=64, max_windows=5)
    assert w.shape == (5, 64) and torch.equal(w, eval_windows(tok, "web:eval", seq_len=64, max_windows=5))
    first_doc = tok(eval_docs[0], add_special_tokens=False)["input_ids"]
    assert w.flatten()[: min(len(first_doc), 320)].tolist() == first_doc[:320]
    full = eval_windows(tok, "web:eval", seq_len=64)
    assert full.shape[0] > 5 and torch.equal(full[:5], w)
    assert eval_windows(tok, "web:eval", seq_len=64, max_windows=10**9).shape == full.shape


def test_user_txt_and_jsonl(tmp_path: Path, tok) -> None:
    txt = tmp_path / "c.txt"
    txt.write_text("first document here\n\n  second one  \n\n", encoding="utf-8")
    assert load_documents(str(txt)) == ["first document here", "second one"]
    jl = tmp_path / "c.jsonl"
    jl.write_text(
        json.dumps({"text": "first document here", "id": 1}) + "\n\n" + json.dumps({"text": "second one"}) + "\n",
        encoding="utf-8",
    )
    assert load_documents(str(jl)) == ["first document here", "second one"]
    assert corpus_fingerprint(str(txt)) == corpus_fingerprint(str(jl))
    assert corpus_fingerprint("web:eval") == hashlib.sha256((DATA_DIR / "web_eval.txt").read_bytes()).hexdigest()
    assert corpus_fingerprint("web:eval") != corpus_fingerprint("web:calibration")
    big = tmp_path / "big.txt"
    big.write_text("\n".join(calib for calib in load_documents("web:eval")[:3]), encoding="utf-8")
    assert calibration_batches(tok, str(big), 2, 16, seed=3).shape == (2, 16)
    assert eval_windows(tok, str(big), 16, 2).shape == (2, 16)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.txt", None, r"missing\.txt does not exist"),
        ("c.csv", "a,b\n", r"c\.csv: unsupported extension '\.csv'"),
        ("noext", "text\n", r"noext: unsupported extension"),
        ("blank.txt", "\n  \n", r"blank\.txt contains no documents"),
        ("blank.jsonl", "\n", r"blank\.jsonl contains no documents"),
        ("emptytext.jsonl", '{"text": " "}\n', r"emptytext\.jsonl contains no documents"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl, line 2: invalid JSON"),
        ("notext.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n', r'notext\.jsonl, line 3: missing field "text"'),
        ("num.jsonl", '{"text": 3}\n', r'num\.jsonl, line 1: field "text" must be a string'),
        ("list.jsonl", '["text"]\n', r"list\.jsonl, line 1: expected a JSON object"),
    ],
)
def test_load_documents_errors(tmp_path: Path, name: str, content: str | None, match: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=match):
        load_documents(str(path))


def test_load_documents_more_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown shipped corpus 'web:train'"):
        load_documents("web:train")
    with pytest.raises(InputError, match="corpus source"):
        load_documents("")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.txt is not valid UTF-8"):
        load_documents(str(latin1))
    folder = tmp_path / "dir.txt"
    folder.mkdir()
    with pytest.raises(InputError, match=r"dir\.txt is not a regular file"):
        load_documents(str(folder))


def test_window_errors(tmp_path: Path, tok) -> None:
    small = tmp_path / "small.txt"
    small.write_text("a few words\n", encoding="utf-8")
    n_tokens = len(tok("a few words", add_special_tokens=False)["input_ids"])
    with pytest.raises(InputError, match=rf"small\.txt.*{n_tokens} tokens, fewer than seq_len \+ 1"):
        calibration_batches(tok, str(small), 1, n_tokens, seed=0)
    assert calibration_batches(tok, str(small), 1, n_tokens - 1, seed=0).shape == (1, n_tokens - 1)
    with pytest.raises(InputError, match=r"small\.txt.*fewer than seq_len"):
        eval_windows(tok, str(small), n_tokens + 1)
    with pytest.raises(InputError, match="n_samples must be a positive integer"):
        calibration_batches(tok, "web:eval", 0, 8, seed=0)
    with pytest.raises(InputError, match="seq_len must be a positive integer"):
        eval_windows(tok, "web:eval", -1)
    with pytest.raises(InputError, match="max_windows must be a positive integer"):
        eval_windows(tok, "web:eval", 8, 0)
    with pytest.raises(InputError, match="seed must be an integer"):
        calibration_batches(tok, "web:eval", 1, 8, seed=None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- lm-eval tasks


def test_lm_eval_tasks_run_in_memory_from_any_cwd(tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)  # relative data paths would break here
    model = build_tiny_llama(tok, seed=0)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8, max_length=256)
    out = simple_evaluate(
        model=lm,
        tasks=["secateurs_web_ppl", "secateurs_web_mc"],
        task_manager=TaskManager(include_path=str(task_dir())),
        limit=3,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
        log_samples=False,
    )
    assert out is not None
    ppl, mc = out["results"]["secateurs_web_ppl"], out["results"]["secateurs_web_mc"]
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert math.isfinite(ppl[key]) and ppl[key] > 0
    # an untrained model over a 512-token vocabulary: ~log2(512) bits per token, > 1 bit per byte
    assert ppl["bits_per_byte,none"] > 1.0
    for key in ("acc,none", "acc_norm,none"):
        assert 0.0 <= mc[key] <= 1.0
    assert out["n-samples"]["secateurs_web_mc"]["effective"] == 3


# --------------------------------------------------------------------------- second domain (prose) and mixtures


def _load_prose_script():
    spec = importlib.util.spec_from_file_location("prepare_prose", REPO / "scripts" / "prepare_prose.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prose_splits_load_and_never_overlap() -> None:
    cal, ev = load_documents("prose:calibration"), load_documents("prose:eval")
    assert len(ev) == 24 and len(cal) == 142  # Persuasion's 24 chapters; P&P 61 + S&S 50 + Northanger 31
    assert ev[0].startswith("Sir Walter Elliot, of Kellynch Hall")
    assert not set(cal) & set(ev)
    # no eval sentence (long enough to be distinctive) occurs in the calibration text
    cal_text = "\n".join(cal)
    sentences = [s for d in ev for s in re.split(r"(?<=[.!?]) ", d) if len(s) > 80]
    assert sentences and not any(s in cal_text for s in sentences[::25])
    # nor in the Bible calibration text, nor does any Bible eval chapter occur in a mixture part
    assert not any(s in "\n".join(load_documents("web:calibration")) for s in sentences[::50])


def test_prose_source_md_records_hashes() -> None:
    md = (DATA_DIR / "SOURCE.md").read_text()
    for name in ("prose_calibration.txt", "prose_eval.txt"):
        assert hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest() in md
    assert "r-cran-janeaustenr" in md and "1.0.0-1" in md


def test_prose_chapter_rules() -> None:
    prose = _load_prose_script()
    lines = [
        "TITLE",
        "",
        "VOLUME I",
        "",
        "CHAPTER I",
        "",
        "It is _a_ truth",
        "universally",
        "",
        "Next  para.",
        "Chapter 2",
        "Second.",
        "",
        "THE END",
        "",
        "A trailing note.",
    ]
    assert prose.chapters(lines) == ["It is a truth universally Next para.", "Second."]


def test_mixture_parts_and_errors() -> None:
    assert mixture_parts("web:calibration") is None
    assert mixture_parts("notes.txt") is None
    assert mixture_parts("mix:calibration") == MIXTURES["mix:calibration"]
    assert mixture_parts("web:calibration*0.7+a.txt*0.3") == (("web:calibration", 0.7), ("a.txt", 0.3))
    with pytest.raises(InputError, match="weight of 'a.txt' must be a positive"):
        mixture_parts("web:calibration*1+a.txt*0")
    with pytest.raises(InputError, match="unknown shipped mixture"):
        mixture_parts("mix:nope")
    with pytest.raises(InputError, match="is a mixture"):
        load_documents("mix:calibration")
    assert all(not name.endswith(":eval") for parts in MIXTURES.values() for name, _ in parts)


@pytest.mark.parametrize(
    ("weights", "n", "expected"), [([1, 1], 5, [3, 2]), ([3, 1], 8, [6, 2]), ([1, 1, 1], 2, [1, 1, 0])]
)
def test_mixture_counts(weights: list[float], n: int, expected: list[int]) -> None:
    assert mixture_counts(weights, n) == expected


def test_mixture_batches_deterministic_and_mixed(tok, calib_docs: list[str]) -> None:
    a = calibration_batches(tok, "mix:calibration", 6, 32, seed=3)
    assert a.shape == (6, 32) and torch.equal(a, calibration_batches(tok, "mix:calibration", 6, 32, seed=3))
    assert not torch.equal(a, calibration_batches(tok, "mix:calibration", 6, 32, seed=4))
    web = calibration_batches(tok, "web:calibration", 3, 32, seed=3)  # part 0 is sampled with the same seed
    prose = calibration_batches(tok, "prose:calibration", 3, 32, seed=4)  # part 1 with seed + 1
    rows = {tuple(r.tolist()) for r in a}
    assert rows == {tuple(r.tolist()) for r in torch.cat([web, prose])}
    # web:calibration itself is unchanged by the mixture support (existing checkpoints stay reproducible)
    assert torch.equal(web, calibration_batches(tok, "web:calibration", 3, 32, seed=3))


def test_mixture_fingerprint() -> None:
    fp = corpus_fingerprint("mix:calibration")
    parts = "".join(f"{w!r} {corpus_fingerprint(n)}\n" for n, w in MIXTURES["mix:calibration"])
    assert fp == hashlib.sha256(parts.encode()).hexdigest()
    assert fp != corpus_fingerprint("web:calibration*1.0+prose:calibration*2.0")
