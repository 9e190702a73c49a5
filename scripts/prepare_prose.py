"""Build the shipped second-domain corpus (Jane Austen's novels) from the Debian package ``r-cran-janeaustenr``.

    python scripts/prepare_prose.py [--deb PATH] [--check]

Without ``--deb`` the package is fetched with ``apt-get download r-cran-janeaustenr`` into a temporary folder.
The package stores the novels as R character vectors (one element per printed line) in an R lazy-load database
(``data/Rdata.rdx`` index, ``data/Rdata.rdb`` zlib blobs in R's XDR serialisation); the small reader below
decodes exactly what that needs (no R installation). Rules and the split are in ``compress/data/SOURCE.md``;
``--check`` rebuilds in memory and compares byte for byte with the shipped files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[1] / "compress" / "data"
PACKAGE = "r-cran-janeaustenr"
EVAL_NOVELS = ("persuasion",)
CALIBRATION_NOVELS = ("prideprejudice", "sensesensibility", "northangerabbey")  # emma, mansfieldpark unused
OUTPUTS = {"prose_calibration.txt": CALIBRATION_NOVELS, "prose_eval.txt": EVAL_NOVELS}
_CHAPTER = re.compile(r"^(CHAPTER|Chapter) [IVXLC0-9]+\.?$")
_END = re.compile(r"^(THE END|FINIS|Finis|A NOTE ON THE TEXT)$")


class _XDR:
    """Minimal reader of R's XDR serialisation: character/logical/integer/double vectors, pairlists, symbols."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not an XDR-serialised R object")
        self.data, self.pos = data, 2
        version = self.int()
        self.int(), self.int()
        if version == 3:
            n = self.int()
            self.pos += n  # skip the native encoding name

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return int(value)

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NILVALUE
            return None
        if kind == 255:  # reference to an earlier symbol
            if flags >> 8 == 0:
                self.int()
            return ("ref",)
        if kind == 1:  # symbol
            return ("sym", self.item())
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            return raw.decode("utf-8" if flags & (1 << 15) else "latin-1")
        if kind in (16, 19):  # character vector, list
            values = [self.item() for _ in range(self.int())]
            return ("vec", values, self.item()) if has_attr else values
        if kind in (10, 13, 14):  # logical, integer, double
            n, size, code = self.int(), 8 if kind == 14 else 4, "d" if kind == 14 else "i"
            values = list(struct.unpack_from(f">{n}{code}", self.data, self.pos))
            self.pos += n * size
            if has_attr:
                self.item()
            return values
        if kind == 2:  # pairlist
            out = []
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                out.append((tag, self.item()))
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if kind == 254:
                    return out
        raise ValueError(f"unsupported R type {kind} at byte {self.pos}")


def read_novels(deb: Path) -> dict[str, list[str]]:
    """{novel name: its lines} from the package's lazy-load database."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        base = Path(tmp) / "usr/lib/R/site-library/janeaustenr/data/Rdata"
        index = _XDR(gzip.decompress(base.with_suffix(".rdx").read_bytes())).item()
        db = base.with_suffix(".rdb").read_bytes()
    _, offsets, attrs = index[1][0]
    names = attrs[0][1]
    novels = {}
    for name, (offset, length) in zip(names, offsets, strict=True):
        blob = db[offset : offset + length]
        lines = _XDR(zlib.decompress(blob[4:])).item()
        novels[name] = [line or "" for line in lines]
    return novels


def chapters(lines: list[str]) -> list[str]:
    """Chapters of one novel, each one line: front matter before the first chapter heading and everything from
    an end marker on are dropped; paragraphs (blank-line separated) are joined with single spaces; ``_italic_``
    underscores are removed; whitespace runs collapse to one space."""
    out: list[list[str]] = []
    for line in lines:
        text = line.strip()
        if _END.match(text):
            break
        if _CHAPTER.match(text):
            out.append([])
        elif out and text and not text.startswith("VOLUME"):
            out[-1].append(text)
    docs = [re.sub(r"\s+", " ", " ".join(c).replace("_", "")).strip() for c in out]
    return [d for d in docs if d]


def build(deb: Path) -> dict[str, bytes]:
    novels = read_novels(deb)
    return {
        name: "".join(doc + "\n" for novel in parts for doc in chapters(novels[novel])).encode("utf-8")
        for name, parts in OUTPUTS.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help=f"path to the {PACKAGE} .deb (default: apt-get download)")
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb
        if deb is None:
            subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True)
            deb = next(Path(tmp).glob("*.deb"))
        print(f"{deb.name}: sha256 {hashlib.sha256(deb.read_bytes()).hexdigest()}")
        files = build(deb)
    bad = 0
    for name, data in files.items():
        path = DATA / name
        digest = hashlib.sha256(data).hexdigest()
        docs = data.count(b"\n")
        print(f"{name}: {docs} documents, {len(data.split())} words, {len(data)} bytes, sha256 {digest}")
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                print(f"MISMATCH: {path}", file=sys.stderr)
                bad += 1
        else:
            path.write_bytes(data)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
