"""Reply parsers shared by the tasks. Every parser is deterministic and returns None (`other`) when unsure.

Rules that avoid eval-reference 1.3 traps:
- an empty or off-format reply is `other`, never a yes and never dropped (trap 1, 3);
- a bare article "A" (or pronoun "I") in running text is not an option letter (trap 5);
- the whole reply is read, never only its first character (trap 5);
- candidate letters are tried in the item's own order, never by iterating a set (trap 5);
- letters go as far as the item has choices, not stopping at D (trap 5, 6).
"""

from __future__ import annotations

import re

OTHER = "other"


def letters_for(n: int) -> list[str]:
    if n > 26:
        raise ValueError(f"{n} choices: more than A..Z")
    return [chr(ord("A") + i) for i in range(n)]


# ---------------------------------------------------------------- yes / no

def parse_mme(reply: str | None) -> str:
    """Otter's MME rule (lowercase, drop '.', exact yes/no, else yes/no in the first 4 characters) plus lmms-eval's
    single 'y'/'n'. Anything else, including an empty reply, is `other`."""
    t = (reply or "").lower().strip().replace(".", "")
    if t in ("yes", "y"):
        return "yes"
    if t in ("no", "n"):
        return "no"
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return OTHER


_WORD = re.compile(r"[a-z']+")


def parse_pope(reply: str | None) -> str:
    """The official POPE rule on the first sentence (text before the first '.'): `no` or `not` as a word means no.
    Unlike the official script, a first sentence without `yes` is `other`, not yes, so an empty or off-topic reply
    is wrong and never a predicted yes (traps 1 and 3). "Yes." and "Yes, there is a dog." are yes (not exact-match)."""
    t = (reply or "").strip()
    first = t.split(".")[0] if t else ""
    if not first.strip() and t:
        # a reply starting with '.' ("...yes"): use the first non-empty sentence rather than calling it empty
        first = next((s for s in t.split(".") if s.strip()), "")
    words = _WORD.findall(first.replace(",", " ").lower())
    if "no" in words or "not" in words:
        return "no"
    if "yes" in words:
        return "yes"
    return OTHER


# ---------------------------------------------------------------- multiple choice

_LEAD_JUNK = "\"'*_`[( \t\r\n"
_PHRASE = re.compile(
    r"(?i:\b(?:the\s+)?(?:correct\s+|right\s+|best\s+|final\s+)?(?:answer|option|choice)"
    r"(?:\s+is|\s+would\s+be|\s+should\s+be)?\s*[:：]?\s*(?:option\s+|choice\s+)?)"
    r"[*_`\"'\(\[]*([A-Z])(?![A-Za-z0-9])")
_WRAPPED = re.compile(r"\(([A-Z])\)|\[([A-Z])\]|(?<![A-Za-z0-9])([A-Z])[.):](?=\s|$)")
_ARTICLE_AFTER = re.compile(r"[*_`\"']*\s+[a-z]")


def _is_word(letter: str, rest: str) -> bool:
    """'A' or 'I' followed by a lowercase word is an article/pronoun, not an option letter ("A dog is ...")."""
    return letter in ("A", "I") and bool(_ARTICLE_AFTER.match(rest))


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().strip(".").strip().lower()


def _unique_text_match(reply: str, choices: dict[str, str]) -> str | None:
    low = reply.lower()
    taken: list[tuple[int, int]] = []
    hits: list[str] = []
    # Longer texts first, so "dark red" claims its span before "red" can match inside it.
    for letter, text in sorted(choices.items(), key=lambda kv: (-len(_norm(kv[1])), kv[0])):
        t = _norm(text)
        if not t:
            continue
        pat = re.compile(r"(?<!\w)" + re.escape(t) + r"(?!\w)")
        free = [m.span() for m in pat.finditer(low) if not any(a <= m.start() and m.end() <= b for a, b in taken)]
        if free:
            hits.append(letter)
            taken.extend(free)
    return hits[0] if len(hits) == 1 else None


def extract_choice(reply: str | None, letters: list[str], choices: dict[str, str] | None = None) -> str | None:
    """The option letter a reply picks, or None (`other`). Priority:
    1. an explicit phrase: "The answer is X", "Answer: (X)", "the correct option is X";
    2. a leading letter: "X", "X.", "(X)", "X) text", "**X**" (not "A cat ...");
    3. exactly one distinct wrapped letter anywhere: "(X)", "[X]", "X." / "X)" / "X:" before a space or the end;
    4. the reply equal to one option text, else exactly one option text found in it (whole words);
    5. None.
    """
    text = (reply or "").strip()
    if not text:
        return None
    valid = list(letters)
    for m in _PHRASE.finditer(text):
        x = m.group(1)
        if x in valid and not _is_word(x, text[m.end():]):
            return x
    body = text.lstrip(_LEAD_JUNK)
    m = re.match(r"([A-Z])(?![A-Za-z0-9])", body)
    if m and m.group(1) in valid and not _is_word(m.group(1), body[1:]):
        return m.group(1)
    m = re.fullmatch(r"[\s\"'*_`\[(]*([a-z])[\s.):\]*_`\"']*", text)  # a lone lowercase letter: "b", "(c)"
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    found = []
    for m in _WRAPPED.finditer(text):
        x = next(g for g in m.groups() if g)
        if x in valid and x not in found:
            found.append(x)
    if len(found) == 1:
        return found[0]
    if choices:
        n = _norm(text)
        exact = [k for k in valid if k in choices and _norm(str(choices[k])) == n]
        if len(exact) == 1:
            return exact[0]
        return _unique_text_match(text, {k: str(v) for k, v in choices.items() if k in valid})
    return None
