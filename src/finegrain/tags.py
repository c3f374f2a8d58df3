"""Entity tagging schemes (BIO, BIOES, IO, IOB1): parsing, checking, converting and reading entities.

Beside them, "plain": a tag per word as it is (parts of speech, chunks, error tags), with no
prefixes and no entities. Checking, converting and decoding constraints leave plain tags alone.

A tag is `O` or `P-TYPE` with prefix P in B (begin), I (inside), E (end), S (single); the
type may itself hold dashes (`B-geo-loc`). An entity is `(type, start, end)` over word
indices, `end` exclusive.

Two ways to read a tag sequence, the two modes of the `seqeval` package:
- "default": as conlleval.pl (and seqeval without `mode`) does. Any mix of prefixes is read
  leniently: `I-PER` after `O` starts an entity, a change of type ends one. It reads BIO,
  IOB1, BIOES and IO alike, which is why files in any of them are converted through it.
- "strict": as seqeval with `mode="strict"` and `scheme=IOB2` or `IOBES`: only well-formed
  entities count (`B-X I-X*` in BIO; `S-X` or `B-X I-X* E-X` in BIOES); broken pieces are
  dropped, and a prefix the scheme lacks is a ValueError.

A neutral module: the data readers (which check and repair tags), the NER task (which decodes
them) and the entity metrics all use it, and it imports nothing of finegrain's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "PLAIN",
    "SCHEMES",
    "Entity",
    "allowed_transitions",
    "check_tags",
    "convert_tags",
    "default_entities",
    "entities_to_tags",
    "normalize_scheme",
    "parse_tag",
    "repair_tags",
    "tag_set",
    "tags_to_entities",
]

Entity = tuple[str, int, int]  # (type, start word, end word exclusive)

# The prefixes each scheme writes. IOB1 (CoNLL-2003's original files) uses B only to split
# two adjacent entities of one type; it is read, never written.
SCHEMES: dict[str, str] = {"BIO": "BIO", "BIOES": "BIOES", "IO": "IO", "IOB1": "BIO"}
PLAIN = "plain"  # tags as they are, one per word: no entities
_ALIASES = {"IOB2": "BIO", "IOBES": "BIOES", "BILOU": None, "IOE2": None}


def normalize_scheme(name: str) -> str:
    """The canonical name of a scheme: "BIO" (also "IOB2"), "BIOES" (also "IOBES"), "IO", "IOB1" or "plain".

    Raises:
        ValueError: an unknown or unsupported scheme.
    """
    upper = str(name).upper()
    if upper in SCHEMES:
        return upper
    if upper == PLAIN.upper():
        return PLAIN
    if _ALIASES.get(upper):
        return _ALIASES[upper]
    raise ValueError(
        f"unknown tagging scheme {name!r}; use BIO (IOB2), BIOES (IOBES), IO or IOB1, or plain for tags without entities"
    )


def parse_tag(tag: str) -> tuple[str, str]:
    """(prefix, type) of a tag: `"B-geo-loc"` -> `("B", "geo-loc")`, `"O"` -> `("O", "")`.

    Raises:
        ValueError: anything but `O` or `P-TYPE` with P one of B, I, E, S and a non-empty type.
    """
    if tag == "O":
        return "O", ""
    if len(tag) > 2 and tag[0] in "BIES" and tag[1] == "-":
        return tag[0], tag[2:]
    raise ValueError(f"tag {tag!r} is neither 'O' nor B-/I-/E-/S- followed by a type")


def tag_set(types: Sequence[str], scheme: str = "BIO") -> list[str]:
    """Every tag of `types` in `scheme`, `O` first, then type by type: the head's label order.
    Plain tags are their own types, in the order given."""
    scheme = normalize_scheme(scheme)
    if scheme == PLAIN:
        return list(types)
    prefixes = SCHEMES[scheme]
    return ["O"] + [f"{p}-{t}" for t in types for p in prefixes if p != "O"]


# --- extraction -------------------------------------------------------------------------


def tags_to_entities(tags: Sequence[str], mode: str = "default", scheme: str | None = None) -> list[Entity]:
    """The entities in a tag sequence, in order.

    Args:
        tags: one tag per word.
        mode: "default" (conlleval, any scheme) or "strict" (well-formed entities of `scheme` only).
        scheme: for "strict", "BIO" or "BIOES" (IOB2/IOBES); ignored in "default" mode.

    Raises:
        ValueError: a malformed tag; in strict mode, a prefix `scheme` does not have.
    """
    if mode == "default":
        return default_entities(tags)
    if mode != "strict":
        raise ValueError(f"unknown mode {mode!r}; use 'default' or 'strict'")
    scheme = normalize_scheme(scheme or "BIO")
    if scheme not in ("BIO", "BIOES"):
        raise ValueError(f"strict mode reads BIO (IOB2) or BIOES (IOBES), not {scheme}")
    return _strict_entities(tags, scheme)


def default_entities(tags: Sequence[str]) -> list[Entity]:
    # seqeval's get_entities (conlleval's rules), on one sentence followed by an "O".
    entities: list[Entity] = []
    prev_prefix, prev_type, begin = "O", "", 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, type_ = parse_tag(tag)
        ends = (
            prev_prefix in "ES"
            or (prev_prefix in "BI" and prefix in "BSO")
            or (prev_prefix != "O" and prev_type != type_)
        )
        starts = prefix in "BS" or (prev_prefix in "ESO" and prefix in "IE") or (prefix != "O" and prev_type != type_)
        if ends:
            entities.append((prev_type, begin, i))
        if starts:
            begin = i
        prev_prefix, prev_type = prefix, type_
    return entities


def _strict_entities(tags: Sequence[str], scheme: str) -> list[Entity]:
    # seqeval's Tokens.entities with IOB2 / IOBES: only whole entities survive.
    parsed = [parse_tag(t) for t in tags]
    allowed = SCHEMES[scheme]
    for tag, (prefix, _) in zip(tags, parsed):
        if prefix != "O" and prefix not in allowed:
            raise ValueError(f"tag {tag!r} is not a {scheme} tag (strict mode)")
    entities: list[Entity] = []
    i, n = 0, len(parsed)
    while i < n:
        prefix, type_ = parsed[i]
        if prefix == "S":
            entities.append((type_, i, i + 1))
            i += 1
        elif prefix == "B":
            j = i + 1
            while j < n and parsed[j] == ("I", type_):
                j += 1
            if scheme == "BIO":
                entities.append((type_, i, j))
                i = j
            elif j < n and parsed[j] == ("E", type_):
                entities.append((type_, i, j + 1))
                i = j + 1
            else:
                i = j  # a B-X I-X... that never ends: not an entity
        else:
            i += 1
    return entities


# --- writing and converting -------------------------------------------------------------


def entities_to_tags(entities: Sequence[Entity], length: int, scheme: str = "BIO") -> list[str]:
    """Tags for `length` words with `entities` (non-overlapping) written in `scheme` (BIO, BIOES or IO).

    IO cannot tell two adjacent entities of one type from one entity: it writes them merged.

    Raises:
        ValueError: entities that overlap or fall outside `length`, or an unwritable scheme (IOB1).
    """
    scheme = normalize_scheme(scheme)
    if scheme in ("IOB1", PLAIN):
        raise ValueError(f"{scheme} tags are not written from entities; write BIO, BIOES or IO")
    tags = ["O"] * length
    for type_, start, end in entities:
        if not 0 <= start < end <= length:
            raise ValueError(f"entity {(type_, start, end)} is outside the {length} words")
        if any(t != "O" for t in tags[start:end]):
            raise ValueError(f"entity {(type_, start, end)} overlaps another")
        if scheme == "IO":
            tags[start:end] = [f"I-{type_}"] * (end - start)
        elif scheme == "BIOES" and end - start == 1:
            tags[start] = f"S-{type_}"
        else:
            tags[start:end] = [f"B-{type_}"] + [f"I-{type_}"] * (end - start - 1)
            if scheme == "BIOES":
                tags[end - 1] = f"E-{type_}"
    return tags


def convert_tags(tags: Sequence[str], scheme: str) -> list[str]:
    """`tags` (any scheme, read in default mode) rewritten in `scheme` (BIO, BIOES or IO); plain tags stay."""
    if normalize_scheme(scheme) == PLAIN:
        return list(tags)
    return entities_to_tags(default_entities(tags), len(tags), scheme)


def repair_tags(tags: Sequence[str], scheme: str = "BIO") -> list[str]:
    """`tags` made valid in `scheme` the way conlleval reads them: `O I-PER` becomes `O B-PER`.

    The entities are those of default mode, so scores in default mode do not change.
    """
    scheme = normalize_scheme(scheme)
    return convert_tags(tags, "BIO" if scheme == "IOB1" else scheme)


def check_tags(tags: Sequence[str], scheme: str = "BIO") -> list[tuple[int, str]]:
    """Where `tags` break `scheme`: (word index, what is wrong), empty when valid.

    Rules: BIO: I-X only after B-X or I-X; BIOES: also B-X and I-X go on with I-X or E-X, and
    E-X comes after B-X or I-X; IO: only I- and O; IOB1: I-, B- and O, with B-X only right after
    an X entity. A tag that is not `O` or `P-TYPE` is reported too. Plain: only an empty tag.
    """
    scheme = normalize_scheme(scheme)
    if scheme == PLAIN:
        return [(i, "an empty tag") for i, tag in enumerate(tags) if not tag]
    allowed = {"BIO": "BI", "BIOES": "BIES", "IO": "I", "IOB1": "BI"}[scheme]
    problems: list[tuple[int, str]] = []
    parsed: list[tuple[str, str]] = []
    for i, tag in enumerate(tags):
        try:
            parsed.append(parse_tag(tag))
        except ValueError as exc:
            problems.append((i, str(exc)))
            parsed.append(("O", ""))
    for i, (prefix, type_) in enumerate(parsed):
        prev = parsed[i - 1] if i else ("O", "")
        nxt = parsed[i + 1] if i + 1 < len(parsed) else ("O", "")
        if prefix == "O":
            continue
        if prefix not in allowed:
            problems.append((i, f"{tags[i]} has a prefix {scheme} does not use"))
        elif scheme == "BIO" and prefix == "I" and (prev[1] != type_ or prev[0] not in "BI"):
            problems.append((i, f"{tags[i]} after {_show(tags, i - 1)}; an entity starts with B-{type_}"))
        elif scheme == "IOB1" and prefix == "B" and (prev[1] != type_ or prev[0] not in "BI"):
            problems.append(
                (i, f"{tags[i]} after {_show(tags, i - 1)}; IOB1 uses B- only right after an entity of the same type")
            )
        elif scheme == "BIOES":
            if prefix in "IE" and (prev[1] != type_ or prev[0] not in "BI"):
                problems.append(
                    (i, f"{tags[i]} after {_show(tags, i - 1)}; an entity starts with B-{type_} or S-{type_}")
                )
            elif prefix in "BI" and (nxt[1] != type_ or nxt[0] not in "IE"):
                problems.append((i, f"{tags[i]} before {_show(tags, i + 1)}; an entity ends with E-{type_}"))
    return problems


def _show(tags: Sequence[str], i: int) -> str:
    return tags[i] if 0 <= i < len(tags) else ("the start" if i < 0 else "the end")


def allowed_transitions(tags: Sequence[str], scheme: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which tag sequences are valid in `scheme`, for constrained (Viterbi) decoding.

    Returns:
        (first (C,), pairs (C, C), last (C,)) booleans: tag c may open a sentence, follow tag
        c', close a sentence. In IO and plain every sequence is valid.
    """
    scheme = normalize_scheme(scheme)
    count = len(tags)
    pairs = np.ones((count, count), dtype=bool)
    first = np.ones(count, dtype=bool)
    last = np.ones(count, dtype=bool)
    if scheme in ("IO", PLAIN):
        return first, pairs, last
    parsed = [parse_tag(t) for t in tags]
    for j, (prefix, type_) in enumerate(parsed):
        continues = prefix == "I" or (scheme == "BIOES" and prefix == "E")
        first[j] = not continues
        for i, (prev_prefix, prev_type) in enumerate(parsed):
            open_ = prev_prefix in "BI" and scheme == "BIOES"
            if continues:
                pairs[i, j] = prev_prefix in "BI" and prev_type == type_
            elif open_:
                pairs[i, j] = False  # an open BIOES entity must go on with I or E
    if scheme == "BIOES":
        last[:] = [p in "OES" for p, _ in parsed]
    return first, pairs, last
