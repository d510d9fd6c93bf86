import pytest

from xllm.engine.detokenizer import IncrementalDetokenizer
from xllm.engine.tokenizer import Tokenizer
from xllm.models.loader.gguf import open_gguf
from xllm.models.loader.gguf_tokenizer import build_gguf_tokenizer

TEXTS = [
    "héllo wörld — 日本語のテキスト 🤖🚀 naïve café",
    "emoji run: 👩‍👩‍👧‍👦🏳️‍🌈 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "plain ascii with numbers 12345 and symbols {}[]<>",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return Tokenizer(*build_gguf_tokenizer(open_gguf(smollm2_gguf)))


def stream(tokenizer, ids, **kwargs):
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    pieces, stop = [], None
    for n in range(1, len(ids) + 1):
        stop = detok.update(ids[:n], finished=n == len(ids))
        pieces.append(detok.take_delta(finished=n == len(ids) or stop is not None))
        if stop:
            break
    return pieces, detok, stop


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_never_split_characters_and_add_up(tokenizer, text):
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters really span several tokens
    pieces, detok, _ = stream(tokenizer, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == detok.text == text


def test_stop_string_spanning_tokens_is_cut_and_not_returned(tokenizer):
    text = "The answer is forty-two, said the computer."
    ids = tokenizer.encode(text)
    pieces, detok, stop = stream(tokenizer, ids, stop=["forty-two"])
    assert stop == "forty-two"
    assert "".join(pieces) == detok.text == "The answer is "
    pieces, detok, _ = stream(tokenizer, ids, stop=["forty-two"], include_stop=True)
    assert "".join(pieces) == "The answer is forty-two"


def test_held_back_text_is_released_when_no_stop_matches(tokenizer):
    text = "abc def ghi"
    ids = tokenizer.encode(text)
    pieces, detok, stop = stream(tokenizer, ids, stop=["xyz!"])
    assert stop is None and "".join(pieces) == text
    # Until the end, the last len(stop) - 1 characters were held back.
    assert len("".join(pieces[:-1])) <= len(text) - 3


def test_earliest_of_several_stops_wins(tokenizer):
    ids = tokenizer.encode("one two three four")
    _, detok, stop = stream(tokenizer, ids, stop=["four", "two"])
    assert stop == "two" and detok.text == "one "
