"""EDA (Wei & Zou, 2019): synonym replacement, random insertion, random swap, random deletion, English and Chinese.

Each candidate applies one operation (drawn from ``ops``; the next one when it finds nothing to
change) to every user turn, with EDA's rate: a
sentence of ``l`` words gets ``max(1, round(alpha * l))`` replacements, insertions or swaps, and each
word is deleted with probability ``p_rd``. Only words outside protected spans move or change.
English words are whitespace tokens (punctuation kept on the word it is attached to), synonyms from
WordNet; capitalised words inside a sentence are taken for names and never change or move; Chinese words come from jieba, synonyms from HIT Cilin, and only content words (nouns,
verbs, adjectives of two characters or more) are replaced or give insertions, by a synonym of the
same part of speech, and only content words are swapped: particles, pronouns, prepositions,
adverbs, numbers and names never change or move (deletion may drop any word).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from fewtune.augment.base import Candidate, augmentable_turns, with_turns
from fewtune.augment.options import EdaOptions
from fewtune.augment.spans import split_protected

@dataclass
class Word:
    text: str
    locked: bool  # a protected span (or part of one): never changed, moved or deleted
    pos: str = ""  # Chinese: jieba's tag
    space: bool = False  # English: a word (not the whitespace between)


_EN_WORD = re.compile(r"^([^\w]*)([A-Za-z][A-Za-z']*)([^\w]*)$")


def _words_en(text: str, protected: list[str]) -> list[Word]:
    """Whitespace tokens; a capitalised word that does not start a sentence is taken for a name (Isle of Man,
    Michel Strogoff) and locked like a protected span: "Man" must not become "Serviceman"."""
    words: list[Word] = []
    starts_sentence = True
    for piece, locked in split_protected(text, protected):
        if locked:
            words.append(Word(piece, True))
            starts_sentence = False
            continue
        for token in re.split(r"(\s+)", piece):
            if not token:
                continue
            if token.isspace():
                words.append(Word(token, False, space=True))
                continue
            letters = token.lstrip("\"'([¿¡")
            name = not starts_sentence and letters[:1].isupper()
            words.append(Word(token, name))
            starts_sentence = token.rstrip("\"')]").endswith((".", "?", "!", ":"))
    return words


def _words_zh(text: str, protected: list[str]) -> list[Word]:
    from fewtune.quality.textstats import _segmenter

    _segmenter()
    import jieba.posseg as pseg

    words: list[Word] = []
    for piece, locked in split_protected(text, protected):
        if locked:
            words.append(Word(piece, True))
        else:
            words += [Word(p.word, False, p.flag) for p in pseg.cut(piece)]
    return words


def _join(words: list[Word], zh: bool) -> str:
    text = "".join(w.text for w in words)
    return text if zh else re.sub(r"\s{2,}", " ", text).strip()


class _Lexicon:
    def __init__(self, zh: bool):
        self.zh = zh

    def synonyms(self, word: Word) -> list[str]:
        from fewtune.augment import lexicon

        if word.locked or word.space or not word.text.strip():
            return []
        if self.zh:
            return list(lexicon.chinese_synonyms(word.text, word.pos))
        m = _EN_WORD.match(word.text)
        if not m or m.group(2).lower() in lexicon.STOPWORDS_EN or len(m.group(2)) < 3:
            return []
        return list(lexicon.english_synonyms(m.group(2), 3))

    def replace(self, word: Word, synonym: str) -> str:
        if self.zh:
            return synonym
        pre, core, post = _EN_WORD.match(word.text).groups()
        if core[:1].isupper():
            synonym = synonym[:1].upper() + synonym[1:]
        return pre + synonym + post


def _movable(words: list[Word]) -> list[int]:
    return [i for i, w in enumerate(words) if not w.locked and not w.space and w.text.strip()
            and re.search(r"\w", w.text)]


def _count(alpha: float, n: int) -> int:
    return max(1, round(alpha * n))


def synonym_replacement(words: list[Word], lex: _Lexicon, n: int, rng: random.Random) -> list[list[str]]:
    candidates = [i for i in _movable(words) if lex.synonyms(words[i])]
    rng.shuffle(candidates)
    changed = []
    for i in candidates[:n]:
        new = rng.choice(lex.synonyms(words[i]))
        changed.append([words[i].text, lex.replace(words[i], new)])
        words[i] = Word(changed[-1][1], False, words[i].pos)
    return changed


def random_insertion(words: list[Word], lex: _Lexicon, n: int, rng: random.Random) -> list[list[str]]:
    sources = [lex.synonyms(words[i]) for i in _movable(words)]  # before any insertion shifts the indices
    sources = [s for s in sources if s]
    changed = []
    for _ in range(n if sources else 0):
        synonym = rng.choice(rng.choice(sources))
        # a word boundary: before a word (English: one after whitespace, not punctuation glued to a protected
        # span), or at the end; never inside a protected span (it is one Word)
        slots = [i for i, w in enumerate(words) if not w.space and (lex.zh or i == 0 or words[i - 1].space)]
        if lex.zh or not re.search(r"[.?!]\W*$", words[-1].text):  # not after a final full stop
            slots.append(len(words))
        at = rng.choice(slots)
        space = [] if lex.zh else [Word(" ", False, space=True)]
        if at == 0 and not lex.zh and (m := _EN_WORD.match(words[0].text)):  # a new first word takes the capital
            pre, core, post = m.groups()
            synonym, words[0] = _case_like(synonym, core), Word(pre + _case_like(core, "x") + post, words[0].locked)
        words[at:at] = space + [Word(synonym, False)] if at == len(words) else [Word(synonym, False)] + space
        changed.append(["", synonym])
    return changed


def _case_like(word: str, place: str) -> str:
    """``word`` capitalised as the word whose place it takes (only a capital first letter moves; "I" stays)."""
    if word == "I" or word[1:] != word[1:].lower():
        return word
    return word[:1].upper() + word[1:] if place[:1].isupper() else word[:1].lower() + word[1:]


def random_swap(words: list[Word], n: int, rng: random.Random, zh: bool = False) -> list[list[str]]:
    """Swap two words ``n`` times; English words swap their letters only, the punctuation around them stays.
    Chinese swaps content words only: swapped particles and conjunctions (如果 <-> 并且) turn a command into
    nonsense, or into another command; a noun swaps with a noun, a verb with a verb."""
    from fewtune.augment.lexicon import STOPWORDS_ZH, pos_class

    movable = _movable(words)
    if zh:  # content words, each swapped with one of the same class (noun with noun, verb with verb)
        movable = [i for i in movable if pos_class(words[i].pos) and words[i].text not in STOPWORDS_ZH]
    changed = []
    for _ in range(n if len(movable) >= 2 else 0):
        a = rng.choice(movable)
        partners = [i for i in movable if i != a and (not zh or pos_class(words[i].pos) == pos_class(words[a].pos))]
        if not partners:
            continue
        b = rng.choice(partners)
        ma, mb = _EN_WORD.match(words[a].text), _EN_WORD.match(words[b].text)
        if ma and mb and not words[a].pos and not words[b].pos:  # English words with letters
            (pa, ca, sa), (pb, cb, sb) = ma.groups(), mb.groups()
            # the sentence's first word keeps its capital, the word moved away loses it ("diva some Play": no)
            na, nb = _case_like(cb, ca), _case_like(ca, cb)
            words[a], words[b] = Word(pa + na + sa, False), Word(pb + nb + sb, False)
            old, new = ca, cb
        else:
            words[a], words[b] = words[b], words[a]
            old, new = words[b].text, words[a].text
        if old != new:
            changed.append([old, new])
    return changed


def random_deletion(words: list[Word], p: float, rng: random.Random) -> tuple[list[Word], list[list[str]]]:
    """Each word deleted with chance ``p``; at least one is (a candidate always differs), never all."""
    movable = sorted(_movable(words))
    if len(movable) < 2:
        return words, []
    dropped = {i for i in movable if rng.random() < p}
    if not dropped:
        dropped = {rng.choice(movable)}
    if len(dropped) == len(movable):
        dropped.discard(rng.choice(movable))
    return [w for i, w in enumerate(words) if i not in dropped], [[words[i].text, ""] for i in sorted(dropped)]


def eda_text(text: str, op: str, options: EdaOptions, rng: random.Random, protected: list[str],
             zh: bool) -> tuple[str, list[list[str]]]:
    """``text`` after one EDA operation, and what changed ([old, new] pairs)."""
    words = _words_zh(text, protected) if zh else _words_en(text, protected)
    lex = _Lexicon(zh)
    n = len(_movable(words))
    if op == "sr":
        changed = synonym_replacement(words, lex, _count(options.alpha_sr, n), rng)
    elif op == "ri":
        changed = random_insertion(words, lex, _count(options.alpha_ri, n), rng)
    elif op == "rs":
        changed = random_swap(words, _count(options.alpha_rs, n), rng, zh)
    else:
        words, changed = random_deletion(words, options.p_rd, rng)
    return _join(words, zh), changed


def _is_zh(text: str, language: str) -> bool:
    from fewtune.quality.textstats import language as detect

    return language == "zh" or (language == "auto" and detect(text) != "en")


def build_eda(options: EdaOptions, resources):
    if not options.ops:
        raise ValueError("eda: ops is empty; use some of sr, ri, rs, rd")
    language = resources.language or options.language

    def augment(example, n, rng, protected):
        out = []
        ops = options.ops
        for k in range(n):
            first = (rng.randrange(len(ops)) + k) % len(ops)
            # the drawn operation, else the next ones in turn when it finds nothing to change (no synonym
            # outside the protected spans, say), so a candidate is not an unchanged copy when one could differ
            for op in [ops[(first + j) % len(ops)] for j in range(len(ops))]:
                new, changed = {}, []
                for i in augmentable_turns(example):
                    text = example.messages[i].content
                    new[i], c = eda_text(text, op, options, rng, protected, _is_zh(text, language))
                    changed += c
                if changed:
                    break
            out.append(Candidate(with_turns(example, new), {"op": op, "changed": changed[:20]}))
        return out

    return augment
