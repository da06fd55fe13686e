"""Which answer a KTO record's prompt is paired with for the reference point."""

from tunesmith.data.formats import KTOExample
from tunesmith.data.pairs import mismatched_index


def example(prompt: str, answer: str, desirable: bool = True) -> KTOExample:
    return KTOExample([{"role": "user", "content": prompt}], answer, desirable)


def test_pairs_made_unpaired_are_matched_with_another_prompts_answer():
    # a, a, b, b, c, c: each prompt's two answers sit side by side
    examples = [example(p, f"{p}{i}", i == 0) for p in "abc" for i in range(2)]
    for index in range(len(examples)):
        other = mismatched_index(examples, index)
        assert examples[other].prompt_messages != examples[index].prompt_messages


def test_with_a_single_prompt_the_next_record_is_used():
    examples = [example("a", "x"), example("a", "y"), example("a", "z")]
    assert [mismatched_index(examples, i) for i in range(3)] == [1, 2, 0]
