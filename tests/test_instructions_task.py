"""The built-in instructions task (online_dpo/data/tasks/instructions.py) and its checker
(judges/instructions.py): a seeded split disjoint by topic, every instruction family drawn and
read back from the prompt text, each instruction's check on answers that follow and break it,
graded scores, a judge error for a prompt without instructions, and the noisy judge over it."""

from __future__ import annotations

import collections

import pytest

from judges import PairwiseItem, PointwiseItem, load_judge
from judges.instructions import FAMILIES, KINDS, Instruction, InstructionChecker, find_instructions
from online_dpo.config import DataConfig, load_config
from online_dpo.data import load_prompts
from online_dpo.data.tasks.instructions import TWO_INSTRUCTION_SHARE, instructions_split, requests


def split(**changes):
    return instructions_split(DataConfig(source="instructions", **changes))


def request_of(prompt) -> str:
    """The request a prompt opens with (the longest that matches: the rest are its instructions)."""
    return max((text for _, text in requests() if prompt.text.startswith(text + " ")), key=len)


def score(prompt: str, response: str):
    return InstructionChecker().score([PointwiseItem(prompt, response)])[0]


def test_the_split_is_seeded_and_deterministic():
    first, again, other = split(seed=3), split(seed=3), split(seed=4)
    assert [p.text for p in first.train] == [p.text for p in again.train]
    assert [p.id for p in first.eval] == [p.id for p in again.eval]
    assert [p.text for p in first.eval] != [p.text for p in other.eval]


def test_eval_requests_and_topics_are_never_trained_on():
    s = split()
    assert {p.group for p in s.train}.isdisjoint({p.group for p in s.eval})
    assert {request_of(p) for p in s.train}.isdisjoint({request_of(p) for p in s.eval})
    assert all(p.reference is None for p in s.train + s.eval)  # the instructions travel in the text


def test_there_are_enough_distinct_train_prompts_for_a_long_campaign():
    s = split()
    assert len({p.text for p in s.train}) == len(s.train) >= 20 * 64
    assert len(s.round_prompts(19, 64)) == 64  # 20 rounds of 64 prompts without running out
    assert len(s.eval) == 128 and len({request_of(p) for p in s.eval}) == 128  # one prompt per eval request


def test_every_family_and_kind_is_drawn_and_a_seeded_share_of_prompts_has_two_instructions():
    s = split()
    found = [find_instructions(p.text) for p in s.train]
    assert {i.kind for ins in found for i in ins} == set(KINDS) - {"uppercase"}  # see _VALUES: never followed
    assert {i.family for p in s.eval for i in find_instructions(p.text)} == set(FAMILIES)
    counts = collections.Counter(len(ins) for ins in found)
    assert set(counts) == {1, 2}
    assert abs(counts[2] / len(found) - TWO_INSTRUCTION_SHARE) < 0.05
    assert all(ins[0].family != ins[1].family for ins in found if len(ins) == 2)


def test_the_checker_reads_back_exactly_the_instructions_each_prompt_was_written_with():
    # A generated prompt is its request followed by its instructions' texts: what is read back,
    # written out again, must give that text (words come back case folded).
    s = split()
    for p in s.train[:600] + s.eval:
        written = " ".join(i.text for i in find_instructions(p.text))
        assert f"{request_of(p)} {written}".casefold() == p.text.casefold(), p.text


# One answer that follows and one that breaks each kind of instruction.
CASES = [
    (Instruction("lowercase"), "the rain falls softly on the roof.", "The rain falls softly on the roof."),
    (Instruction("uppercase"), "THE RAIN FALLS SOFTLY!", "THE RAIN falls softly!"),
    (Instruction("first_word", "Sure"), "Sure, here is a short note.", "Here is a short note, sure."),
    (Instruction("last_word", "done"), 'The garden is planted and now we are "done."', "Done: the garden is planted."),
    (Instruction("at_most_words", 5), "Rain taps the window.", "Rain taps the window all morning long."),
    (Instruction("at_least_words", 8), "The sky is blue because air scatters blue light most.", "Air scatters blue light."),
    (Instruction("exact_sentences", 2), "It rains. The street shines!", "It rains. The street shines. I stay in."),
    (Instruction("at_most_sentences", 1), "It rains all morning", "It rains. The street shines."),
    (Instruction("include_word", "river"), "A River runs past the mill.", "A stream runs past the mill; rivers too."),
    (Instruction("avoid_word", "the"), "Rain falls on a quiet town.", "Rain falls on The quiet town."),
    (Instruction("no_commas"), "Rain falls and the town sleeps.", "Rain falls, and the town sleeps."),
    (Instruction("end_exclamation"), "What a morning!", "What a morning! It rained."),
    (Instruction("end_question"), "Who does not love rain?", "Who does not love rain? I do."),
    (Instruction("bullet_list", 3), "Tips:\n- water daily\n- weed often\n* enjoy it", "- water daily\n- weed often"),
    (Instruction("json_object"), '```json\n{"weather": "rain", "mood": "calm"}\n```', '{"weather": "rain", "mood": }'),
    (Instruction("quoted"), '"Rain falls on the quiet town."', 'Rain falls on the "quiet" town.'),
    (Instruction("title"), "<<Rain>>\nRain falls on the town.", "<Rain>\nRain falls on the town."),
]


def test_the_cases_cover_every_kind():
    assert {ins.kind for ins, _, _ in CASES} == set(KINDS)


@pytest.mark.parametrize(("instruction", "follows", "breaks"), CASES, ids=[c[0].kind for c in CASES])
def test_each_instruction_scores_an_answer_that_follows_it_1_and_one_that_breaks_it_0(instruction, follows, breaks):
    prompt = f"Describe a rainy morning. {instruction.text}"
    assert [(i.kind, str(i.value).casefold()) for i in find_instructions(prompt)] == \
           [(instruction.kind, str(instruction.value).casefold())]
    assert score(prompt, follows).value == 1.0
    assert score(prompt, breaks).value == 0.0


def test_two_instructions_give_graded_scores():
    prompt = "Tell me about the ocean. Answer in at most 6 words. Do not use any commas."
    assert score(prompt, "The ocean is vast and blue.").value == 1.0
    assert score(prompt, "The ocean is vast, blue.").value == 0.5  # short, with a comma
    assert score(prompt, "The ocean is vast and deep and blue.").value == 0.5  # no comma, too long
    assert score(prompt, "The ocean is vast, deep, blue and full of life.").value == 0.0
    assert "at_most_words(6) yes" in score(prompt, "The ocean is vast, blue.").raw


def test_a_prompt_without_any_instruction_it_knows_is_a_judge_error_never_a_score():
    s = score("Describe a rainy morning. Please keep it brief.", "Rain.")
    assert s.value is None and "no instruction" in s.error and "Answer in at most" in s.error


def test_phrasings_match_in_any_case_quoting_and_number_spelling_and_only_at_a_sentence_start():
    assert find_instructions("describe it.  ANSWER IN AT MOST EIGHT WORDS") == [Instruction("at_most_words", 8)]
    assert find_instructions('Describe it.\nUse the word "River" in your answer.') == [Instruction("include_word", "river")]
    # "Do not use the word ..." is an avoid instruction, not an include one
    assert [i.kind for i in find_instructions("Describe it. Do not use the word 'river'.")] == ["avoid_word"]
    assert find_instructions("Describe it and answer in at most eight words.") == []  # not a sentence of its own


def test_an_answer_without_words_follows_no_instruction():
    assert score("Describe it. Do not use any commas.", "  ").value == 0.0
    assert score("Describe it. Answer in at most 5 words.", "...").value == 0.0


def test_the_registry_names_the_checker():
    assert isinstance(load_judge("instructions"), InstructionChecker)


def test_the_noisy_judge_over_the_checker_prefers_the_answer_that_follows_more_instructions():
    prompt = "Tell me about the ocean. Answer in at most 6 words. Do not use any commas."
    one = "The ocean is vast, blue."  # follows 1 of 2: short, with a comma
    both = ["The ocean is vast and blue.", "Waves roll in all day.", "Blue water everywhere.", "Salt and foam."]
    items = [PairwiseItem(prompt, one, b) for b in both] + [PairwiseItem(prompt, b, one) for b in both]
    exact = load_judge("noisy", truth="instructions", flip_rate=0.0, position_bias=0.5, both_orders=True)
    assert [v.winner for v in exact.compare(items)] == ["b"] * 4 + ["a"] * 4
    inverted = load_judge("noisy", truth="instructions", flip_rate=1.0, position_bias=0.5, both_orders=False)
    assert [v.winner for v in inverted.compare(items)] == ["a"] * 4 + ["b"] * 4
    # equal shares followed: a tie in truth, answered by position (always the first shown at bias 1)
    tie = load_judge("noisy", truth="instructions", flip_rate=0.0, position_bias=1.0, both_orders=False)
    verdicts = tie.compare([PairwiseItem(prompt, both[0], both[1])])
    assert verdicts[0].winner == "a" and "truth: tie" in verdicts[0].raw
    unknown = exact.compare([PairwiseItem("Describe the ocean.", one, both[0])])
    assert unknown[0].winner is None and "no instruction" in unknown[0].error  # the checker's error, not a coin


def test_the_config_loads_and_its_data_and_judges_build(embedded_model_path):
    from online_dpo.engines.models import load_tokenizer

    cfg = load_config("configs/instructions.yaml")
    assert cfg.data.source == "instructions" and cfg.judge.name == "instructions"
    s = load_prompts(cfg.data, load_tokenizer(embedded_model_path), cfg.policy.max_prompt_tokens)
    assert s.report.too_long_skipped == 0 and len(s.eval) == cfg.data.eval_prompts
    assert len(s.train) >= cfg.rounds * cfg.data.train_prompts_per_round
    noisy = load_config("configs/instructions.yaml", ["judge.name=noisy", "judge.options.truth=instructions"])
    assert "instructions" in load_judge(noisy.judge.name, **noisy.judge.options).name
