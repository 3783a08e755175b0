"""The built-in synthetic tasks: deterministic, balanced, answers readable from the pixels, splits disjoint."""
import collections

import pytest

from megatron_pgpo.data.synthetic import COLOURS, TASKS, SyntheticTask, answer_vocabulary, make_example


@pytest.mark.parametrize("task", list(TASKS))
def test_deterministic_and_answers_in_vocabulary(task):
    a, b = make_example(task, 7, seed=3), make_example(task, 7, seed=3)
    assert a.image.tobytes() == b.image.tobytes() and a.question == b.question and a.answer == b.answer
    vocab = set(answer_vocabulary(task))
    ds = SyntheticTask(task, 200, seed=1)
    assert all(ds[i].answer in vocab for i in range(len(ds)))
    assert make_example(task, 7, seed=4).image.tobytes() != a.image.tobytes() or task == "bars"


def test_colour_task_is_balanced_and_the_answer_is_in_the_pixels():
    ds = SyntheticTask("colour", 600, seed=0)
    counts = collections.Counter()
    for i in range(len(ds)):
        ex = ds[i]
        counts[ex.answer] += 1
        assert ex.image.size == (56, 56)  # 4 image tokens after the 2x2 merge of 14-px patches
        assert COLOURS[ex.answer] in {rgb for _, rgb in ex.image.getcolors()}
        assert "square" in ex.question and ex.answer not in ex.question
    assert set(counts) == set(COLOURS) and min(counts.values()) > 600 / 6 * 0.7


def test_count_task_counts_target_colour_pixels_blobs():
    ex = make_example("count", 11, seed=2)
    target = ex.question.split()[2]
    present = {rgb for _, rgb in ex.image.getcolors()}
    assert (COLOURS[target] in present) == (ex.answer != "0")


def test_train_and_val_splits_differ():
    train = [make_example("digits", i, split="train").answer for i in range(30)]
    val = [make_example("digits", i, split="val").answer for i in range(30)]
    assert train != val
    with pytest.raises(ValueError, match="split"):
        make_example("colour", 0, split="test")
    with pytest.raises(KeyError, match="valid: colour, count, digits, bars"):
        SyntheticTask("shapes")
