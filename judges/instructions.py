"""The instruction checker: a pointwise scorer for prompts that carry checkable instructions.

The instructions travel in the prompt text, not as a reference answer: the checker finds
every instruction sentence it knows in the prompt and scores a response by the share of
them it follows (1.0 = all; a prompt with two instructions scores 0.5 when one is
followed). A prompt in which it finds none is a judge error, never a silent 0 or 1. A
response with no word at all follows no instruction (an empty answer must not win
"Do not use any commas.").

Any prompt written with these phrasings is checkable, the built-in `instructions` task's
and a prompt file's alike. Matching ignores case, runs of spaces, the kind of quotation
mark around a word (or none) and the final period; N is a number in digits or a word
("eight"); an instruction starts a sentence (after the start of the text, `.`, `!`, `?`,
`:`, `;` or a new line), so "Do not use the word 'x'" is never read as "Use the word 'x'".

    family       phrasing                                              followed when
    case         Write your whole answer in lowercase letters.         no capital letter, some letter
                 Write your whole answer in capital letters.           no lowercase letter, some letter
    first_last   Begin your answer with the word 'W'.                  its first word is W (any case)
                 End your answer with the word 'W'.                    its last word is W (any case)
    length       Answer in at most N words.                            words <= N
                 Answer in at least N words.                           words >= N
                 Answer in exactly N sentence(s).                      sentences == N
                 Answer in at most N sentence(s).                      sentences <= N
    words        Use the word 'W' in your answer.                      W appears as a whole word
                 Do not use the word 'W'.                              W never appears as a whole word
    punctuation  Do not use any commas.                                no ','
                 End your answer with an exclamation mark.             its last character is '!'
                 End your answer with a question mark.                 its last character is '?'
    format       Answer with a bullet list of exactly N item(s), each  N lines start with '- ' (or '* ')
                 on its own line starting with '- '.
                 Give your whole answer as a valid JSON object.        it parses as a JSON object
                                                                        (a ``` fence around it is allowed)
                 Wrap your whole answer in double quotation marks.     it starts and ends with '"'
                 Give your answer a title in double angular brackets,  it holds <<some title>>
                 like <<title>>.

A word is a run of letters and digits (with inner ' or -). Sentences are the runs of text
ending in '.', '!' or '?' (a last run without one counts too). "Last" ignores trailing
spaces, closing quotes or brackets and emphasis marks, so '"Done!"' ends with the word
'done' and with '!'.

    judge:
      name: instructions        # a noisy judge over it: judge.name=noisy judge.options.truth=instructions
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from judges.base import PointwiseItem, Score

NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                "fifteen sixteen seventeen eighteen nineteen twenty").split()
_QUOTES = "\"'“”‘’`"
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_SENTENCE_END = re.compile(r"[.!?]+")
_TRAILING = " \t\n\"'”’)]*`"  # what may follow the last word or mark: spaces, closing quotes, brackets, emphasis
_BULLET = re.compile(r"^\s*[-*]\s+\S", re.MULTILINE)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.DOTALL)
_TITLE = re.compile(r"<<[^<>\n]*\w[^<>\n]*>>")


# --- what a response does -------------------------------------------------------------

def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentence_count(text: str) -> int:
    return sum(1 for part in _SENTENCE_END.split(text) if words(part))


def _has_word(text: str, word: str) -> bool:
    return any(w.casefold() == word.casefold() for w in words(text))


def _ends_with_word(text: str, word: str) -> bool:
    """The last word is `word` (any case), with nothing after it but end marks, spaces and closing quotes."""
    tail = text.rstrip(_TRAILING + ".!?")
    last = words(tail)
    return bool(last) and tail.endswith(last[-1]) and last[-1].casefold() == word.casefold()


def _ends_with_mark(text: str, mark: str) -> bool:
    return text.rstrip(_TRAILING).endswith(mark)


def _is_json_object(text: str) -> bool:
    body = text.strip()
    fenced = _FENCE.match(body)
    try:
        return isinstance(json.loads(fenced.group(1) if fenced else body), dict)
    except ValueError:
        return False


def _quoted(text: str) -> bool:
    body = text.strip()
    return len(body) >= 2 and body[0] in "\"“" and body[-1] in "\"”"


@dataclass(frozen=True)
class Kind:
    """One kind of instruction: its phrasing and the test of a response against it.
    `template` holds {n} (a number), {s} (the plural 's' of the noun before it) or {word}."""

    name: str
    family: str
    template: str
    followed: Callable[[str, object], bool]  # (response, the instruction's value) -> followed?


KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("lowercase", "case", "Write your whole answer in lowercase letters.",
         lambda r, _: r == r.lower() and r != r.upper()),
    Kind("uppercase", "case", "Write your whole answer in capital letters.",
         lambda r, _: r == r.upper() and r != r.lower()),
    Kind("first_word", "first_last", "Begin your answer with the word '{word}'.",
         lambda r, w: words(r)[0].casefold() == w.casefold()),
    Kind("last_word", "first_last", "End your answer with the word '{word}'.",
         lambda r, w: _ends_with_word(r, w)),
    Kind("at_most_words", "length", "Answer in at most {n} words.", lambda r, n: len(words(r)) <= n),
    Kind("at_least_words", "length", "Answer in at least {n} words.", lambda r, n: len(words(r)) >= n),
    Kind("exact_sentences", "length", "Answer in exactly {n} sentence{s}.", lambda r, n: sentence_count(r) == n),
    Kind("at_most_sentences", "length", "Answer in at most {n} sentence{s}.", lambda r, n: sentence_count(r) <= n),
    Kind("include_word", "words", "Use the word '{word}' in your answer.", lambda r, w: _has_word(r, w)),
    Kind("avoid_word", "words", "Do not use the word '{word}'.", lambda r, w: not _has_word(r, w)),
    Kind("no_commas", "punctuation", "Do not use any commas.", lambda r, _: "," not in r),
    Kind("end_exclamation", "punctuation", "End your answer with an exclamation mark.",
         lambda r, _: _ends_with_mark(r, "!")),
    Kind("end_question", "punctuation", "End your answer with a question mark.", lambda r, _: _ends_with_mark(r, "?")),
    Kind("bullet_list", "format", "Answer with a bullet list of exactly {n} item{s}, each on its own line "
                                  "starting with '- '.", lambda r, n: len(_BULLET.findall(r)) == n),
    Kind("json_object", "format", "Give your whole answer as a valid JSON object.", lambda r, _: _is_json_object(r)),
    Kind("quoted", "format", "Wrap your whole answer in double quotation marks.", lambda r, _: _quoted(r)),
    Kind("title", "format", "Give your answer a title in double angular brackets, like <<title>>.",
         lambda r, _: bool(_TITLE.search(r))),
]}
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(k.family for k in KINDS.values()))


@dataclass(frozen=True)
class Instruction:
    """One instruction of a prompt: its kind and its value (N, or the word; None for neither)."""

    kind: str
    value: int | str | None = None

    @property
    def family(self) -> str:
        return KINDS[self.kind].family

    @property
    def text(self) -> str:
        """The instruction as the prompt states it."""
        n = self.value if isinstance(self.value, int) else 0
        return KINDS[self.kind].template.format(n=n, s="" if n == 1 else "s", word=self.value)

    def followed_by(self, response: str) -> bool:
        if not words(response):
            return False
        return KINDS[self.kind].followed(response, self.value)


# --- reading the instructions back from a prompt --------------------------------------------

def _normalized(text: str) -> str:
    """Case folded, every quotation mark a plain ', runs of spaces and tabs one space."""
    text = text.casefold()
    for q in _QUOTES:
        text = text.replace(q, "'")
    return re.sub(r"[ \t]+", " ", text)


def _pattern(template: str) -> re.Pattern:
    """The regex of a phrasing over `_normalized` text: starts a sentence, final period optional,
    quotation marks optional, {n} a number in digits or words, {s} an optional plural."""
    body = re.escape(_normalized(template).rstrip(".")).replace("'", "'?").replace(r"\ ", r"\s+")
    body = body.replace(r"\{word\}", r"(?P<word>[^\W\d_]+)").replace(r"\{s\}", "s?")
    body = body.replace(r"\{n\}", rf"(?P<n>\d+|{'|'.join(NUMBER_WORDS)})")
    return re.compile(rf"(?:\A|(?<=[.!?:;\n]))\s*{body}(?![\w'])")


_PATTERNS = {name: _pattern(kind.template) for name, kind in KINDS.items()}


def _number(token: str) -> int:
    return int(token) if token.isdigit() else NUMBER_WORDS.index(token)


def find_instructions(prompt: str) -> list[Instruction]:
    """The instructions `prompt` states, in the order it states them (see the module docstring).
    A word given in an instruction comes back case folded."""
    text = _normalized(prompt)
    found = []
    for name, pattern in _PATTERNS.items():
        for m in pattern.finditer(text):
            groups = m.groupdict()
            value = _number(groups["n"]) if "n" in groups else groups.get("word")
            found.append((m.start(), Instruction(name, value)))
    return [ins for _, ins in sorted(found, key=lambda f: f[0])]


def check(prompt: str, response: str) -> list[tuple[Instruction, bool]]:
    """Each instruction of `prompt`, and whether `response` follows it."""
    return [(ins, ins.followed_by(response)) for ins in find_instructions(prompt)]


class InstructionChecker:
    """Pointwise scorer: the share of the prompt's instructions the response follows.
    A prompt without any instruction it knows is a judge error that names the phrasings."""

    name = "instructions"

    def score(self, items: Sequence[PointwiseItem]) -> list[Score]:
        out = []
        for it in items:
            results = check(it.prompt, it.response)
            if not results:
                out.append(Score(None, error=f"the instruction checker found no instruction it knows in the prompt "
                                             f"{it.prompt[:80]!r}; state one in a phrasing of judges/instructions.py, "
                                             f"e.g. {KINDS['at_most_words'].template!r}"))
                continue
            raw = "; ".join(f"{ins.kind}({'' if ins.value is None else ins.value}) {'yes' if ok else 'no'}"
                            for ins, ok in results)
            out.append(Score(sum(ok for _, ok in results) / len(results), raw=raw))
        return out
