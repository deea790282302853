from gemma_serve.api.stop_strings import StopStringMatcher


def feed(matcher: StopStringMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        result = matcher.push(piece)
        out.append(result.text)
        if result.stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_stop_string_spanning_pieces_is_cut_and_not_returned():
    text, stopped = feed(StopStringMatcher(["STOP"]), ["Hello S", "TO", "P and more"])
    assert (text, stopped) == ("Hello ", True)


def test_partial_match_is_held_back_then_released():
    matcher = StopStringMatcher(["</end>"])
    assert matcher.push("abc</e").text == "abc"  # "</e" could start the stop string
    result = matcher.push("xtra")
    assert (result.text, result.stopped) == ("</extra", False)


def test_earliest_of_several_stop_strings_wins():
    text, stopped = feed(StopStringMatcher(["world", "lo"]), ["hello world"])
    assert (text, stopped) == ("hel", True)


def test_no_stop_strings_passes_everything_through():
    text, stopped = feed(StopStringMatcher([]), ["a", "b"])
    assert (text, stopped) == ("ab", False)


def test_held_text_flushed_at_end_of_stream():
    text, stopped = feed(StopStringMatcher(["xyz"]), ["abc x"])
    assert (text, stopped) == ("abc x", False)
