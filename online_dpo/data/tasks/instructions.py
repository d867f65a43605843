"""The built-in instructions task: seeded short open requests, each followed by one or two
checkable instructions, with no reference answers (its checker is
`judges.instructions.InstructionChecker`, which reads the instructions back from the text).

A request is a topic in one of several forms ("Describe a rainy morning.", "Write a short
poem about the ocean.") or a stand-alone request ("Explain why the sky is blue."). Topics
(and stand-alone requests) are split into eval and train first, so no eval topic is ever
trained on in any form or with any instruction; then each request is given several
instruction sets. The phrasings are `judges.instructions.KINDS`'s, written once there.
"""

from __future__ import annotations

import random

from judges.instructions import FAMILIES, KINDS, Instruction
from online_dpo.config import DataConfig
from online_dpo.data.prompts import Prompt, PromptSplit, stable_id

TWO_INSTRUCTION_SHARE = 0.3  # the seeded share of prompts with two instructions (graded 0, 0.5, 1)
VARIANTS_PER_REQUEST = 6  # instruction sets per request: ~2,700 train prompts at the default split

_FORMS = [
    "Describe {t}.",
    "Write a few sentences about {t}.",
    "Tell me about {t}.",
    "Write a short poem about {t}.",
    "Write a short story about {t}.",
    "Explain what makes {t} special.",
    "Share a memory of {t}.",
    "What do you like about {t}?",
]
_TOPICS = [
    "a rainy morning", "the ocean", "a busy market", "an old library", "a mountain hike", "the night sky",
    "a city park", "a summer festival", "fresh bread", "a winter evening", "a small village", "a train journey",
    "the desert", "a forest path", "a birthday party", "a lazy Sunday", "a school trip", "a thunderstorm",
    "a lighthouse", "a coffee shop", "a snowy day", "a garden in spring", "a quiet lake", "a long flight",
    "a first job", "learning to swim", "a favorite teacher", "a sleepy cat", "a loyal dog", "a bicycle ride",
    "the full moon", "a sunrise", "autumn leaves", "a picnic", "a museum visit", "a football match",
    "a piano lesson", "a camping trip", "a busy kitchen", "a tropical island", "a rainforest", "a bakery",
    "a bookshop", "a chess game", "a road trip", "a family dinner", "a new friend", "a broken umbrella",
    "a hot summer day", "a foggy harbor", "a fishing boat", "an old castle", "a visit to the zoo",
    "a space station", "a helpful robot", "a volcano", "a waterfall", "a snowman", "a campfire",
    "a street musician", "a busy airport", "a red kite", "a treehouse", "a honeybee", "an old photograph",
    "a letter from a friend", "a marathon", "a cooking class", "the first day of school", "a power cut",
    "a lost key", "a rainbow", "a windmill", "a village fair", "a sailing trip", "a vegetable garden",
    "a night train", "a desert sunset", "an apple orchard", "a quiet classroom",
]
_STANDALONE = [
    "Explain why the sky is blue.", "Give advice to a new gardener.", "Explain how a rainbow forms.",
    "Give tips for a good night's sleep.", "Explain why leaves change color in autumn.",
    "Suggest a healthy breakfast.", "Give advice to someone learning to cook.", "Explain how bees make honey.",
    "Suggest a fun weekend activity.", "Explain why we need to drink water.", "Give tips for a job interview.",
    "Explain how a bicycle works.", "Suggest a name for a pet goldfish.", "Give advice to a new student.",
    "Explain why the sea is salty.", "Suggest a gift for a friend who loves books.",
    "Explain how plants grow from seeds.", "Give tips for saving money.", "Explain why exercise is good for you.",
    "Suggest a way to spend a rainy day.",
]

# The kinds drawn and the values each is drawn with, kept within what a 48-token answer (30-35
# words) can follow and what the embedded model follows at least now and then: a prompt no
# candidate follows forms no pair and teaches nothing. Not drawn: "uppercase" (the embedded
# model does not write a whole answer in capitals at all; the checker still reads it in prompt
# files). "at most 2 sentences" is left out too: nearly every 48-token answer follows it.
_VALUES: dict[str, tuple] = {
    "lowercase": (None,),
    "first_word": ("Sure", "Yes", "Well", "Certainly", "Today", "Imagine", "Okay"),
    "last_word": ("done", "today", "always", "friend", "indeed", "now"),
    "at_most_words": (8, 10, 12, 15, 20),
    "at_least_words": (10, 15, 20, 25),
    "exact_sentences": (2, 3),
    "at_most_sentences": (1,),
    "include_word": ("river", "light", "gentle", "bright", "quiet", "simple", "golden", "warm", "journey"),
    "avoid_word": ("the", "and", "is", "very", "you", "beautiful"),
    "no_commas": (None,), "end_exclamation": (None,), "end_question": (None,),
    "bullet_list": (2, 3, 4),
    "json_object": (None,), "quoted": (None,), "title": (None,),
}
# Kinds of different families that no one answer can follow together, or whose checks interfere.
_CONFLICTS = {frozenset(pair) for pair in [
    *(("json_object", k) for k in ("first_word", "last_word", "exact_sentences", "at_most_sentences",
                                   "no_commas", "end_exclamation", "end_question")),
    ("bullet_list", "exact_sentences"), ("bullet_list", "at_most_sentences"),
]}


def requests() -> list[tuple[str, str]]:
    """Every request, as (group, text): a topic's forms share the topic as their group."""
    return ([(topic, form.format(t=topic)) for topic in _TOPICS for form in _FORMS]
            + [(text, text) for text in _STANDALONE])


def draw_instructions(rng: random.Random, two_share: float = TWO_INSTRUCTION_SHARE) -> list[Instruction]:
    """One or two instructions of different families that one answer can follow together."""
    first = _draw(rng, rng.choice(FAMILIES))
    if rng.random() >= two_share:
        return [first]
    while True:
        second = _draw(rng, rng.choice([f for f in FAMILIES if f != first.family]))
        if frozenset((first.kind, second.kind)) not in _CONFLICTS:
            return [first, second]


def _draw(rng: random.Random, family: str) -> Instruction:
    kind = rng.choice([k.name for k in KINDS.values() if k.family == family and k.name in _VALUES])
    return Instruction(kind, rng.choice(_VALUES[kind]))


def prompt_text(request: str, instructions: list[Instruction]) -> str:
    return " ".join([request] + [ins.text for ins in instructions])


def _variants(rng: random.Random, request: str, n: int) -> list[str]:
    """`n` distinct prompts of one request, each with its own instruction set."""
    texts: list[str] = []
    while len(texts) < n:
        text = prompt_text(request, draw_instructions(rng))
        if text not in texts:
            texts.append(text)
    return texts


def instructions_split(cfg: DataConfig) -> PromptSplit:
    """Seeded instruction prompts, split into eval and train by topic (a stand-alone request is its
    own topic). The eval list takes one prompt of every eval request before a second of any."""
    rng = random.Random(f"{cfg.seed}:instructions")
    groups = list(dict.fromkeys(group for group, _ in requests()))
    rng.shuffle(groups)
    n_eval = min(len(groups) - 1, max(1, round(len(groups) * cfg.eval_fraction)))
    eval_groups = set(groups[:n_eval])

    def render(group: str, text: str) -> list[Prompt]:
        return [Prompt(stable_id(cfg.seed, "instructions", t), [{"role": "user", "content": t}], None, group)
                for t in _variants(rng, text, VARIANTS_PER_REQUEST)]

    train: list[Prompt] = []
    eval_by_variant: list[list[Prompt]] = [[] for _ in range(VARIANTS_PER_REQUEST)]
    for group, text in requests():
        prompts = render(group, text)
        if group in eval_groups:
            for v, p in enumerate(prompts):
                eval_by_variant[v].append(p)
        else:
            train.extend(prompts)
    rng.shuffle(train)
    eval_prompts = []
    for variant in eval_by_variant:
        rng.shuffle(variant)
        eval_prompts.extend(variant)
    return PromptSplit(train=train, eval=eval_prompts[: cfg.eval_prompts])
