"""The one stop-string helper the generator and the server share (`llama3.inference.stops`)."""

from llama3.inference.stops import find_stop, shown_length


def test_find_stop_gives_the_earliest_stop_at_or_after_start():
    assert find_stop("a cat sat. The end", [".", "The"]) == 9
    assert find_stop("a cat sat. The end", ["The", "."], start=10) == 11
    assert find_stop("no stop here", ["END"]) == -1
    assert find_stop("anything", ["", "zz"]) == -1  # an empty stop string never matches


def test_shown_length_holds_back_the_longest_tail_that_may_become_a_stop():
    assert shown_length("Hello wor", ["world!"]) == len("Hello ")
    assert shown_length("Hello wor", ["or!", "world!"]) == len("Hello ")  # the longer tail ("wor") counts
    assert shown_length("abc", ["xyz"]) == 3
    assert shown_length("ab", ["abcdef"]) == 0
    assert shown_length("", ["stop"]) == 0

