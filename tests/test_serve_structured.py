"""Structured output (response_format, guided_*) and logit_bias through the official openai client, on a
random-weight tiny Llama 3 with the real tokenizer: whatever the weights say, the answer must follow the
grammar, row by row inside the batched engine."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from typing import Annotated, Literal

import openai
import pydantic
import pytest
import torch

from llama3.inference.constraints import GrammarCompiler, apply_token_bitmask, constrain_logits
from llama3.inference.engine import Engine
from llama3.inference.generate import Generator
from llama3.inference.sampling import GREEDY
from llama3.tokenizer import ChatFormat
from tests.conftest import random_model, tiny_args
from tests.serve_server import RunningServer

pytestmark = pytest.mark.timeout(180)

MODEL = "tiny-structured"
ASK = [{"role": "user", "content": "Describe a character from Pride and Prejudice."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["Elizabeth", "Darcy", "Jane", "Bingley"]},
        "age": {"type": "integer", "minimum": 16, "maximum": 40},
        "married": {"type": "boolean"},
        "sisters": {"type": "array", "items": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
                    "maxItems": 3},
    },
    "required": ["name", "age", "married", "sisters"],
    "additionalProperties": False,
}


class Person(pydantic.BaseModel):
    name: Literal["Elizabeth", "Darcy", "Jane", "Bingley"]
    age: Annotated[int, pydantic.Field(ge=16, le=40)]
    married: bool
    sisters: Annotated[list[Annotated[str, pydantic.Field(pattern="^[A-Z][a-z]{1,8}$")]],
                       pydantic.Field(max_length=3)]


def check_person(text: str) -> dict:
    """The schema's rules, checked independently of the grammar engine."""
    value = json.loads(text)
    assert text == json.dumps(value)  # one line, ", " and ": " separators
    assert set(value) == {"name", "age", "married", "sisters"}
    assert value["name"] in PERSON["properties"]["name"]["enum"]
    assert isinstance(value["age"], int) and 16 <= value["age"] <= 40
    assert isinstance(value["married"], bool)
    assert isinstance(value["sisters"], list) and len(value["sisters"]) <= 3
    assert all(re.fullmatch(r"[A-Z][a-z]{1,8}", s) for s in value["sisters"])
    return value


@pytest.fixture(scope="module")
def setup(llama3_tokenizer):
    model = random_model(tiny_args("gqa", vocab_size=llama3_tokenizer.n_words, max_seq_len=1024), seed=3)
    reference = Generator(copy.deepcopy(model), llama3_tokenizer)
    server = RunningServer(Engine(model, llama3_tokenizer, num_slots=8), model_name=MODEL)
    yield server, reference, llama3_tokenizer
    server.stop()


@pytest.fixture(scope="module")
def client(setup):
    return openai.OpenAI(base_url=setup[0].url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def async_client(setup):
    return openai.AsyncOpenAI(base_url=setup[0].url + "/v1", api_key="unused", max_retries=0)


def person_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


def test_json_schema_holds_for_every_sampled_choice(client):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, response_format=person_format(), n=4,
                                           temperature=1.0, seed=5, max_tokens=200)
    values = [check_person(c.message.content) for c in reply.choices]
    assert all(c.finish_reason == "stop" for c in reply.choices)
    assert len({json.dumps(v) for v in values}) > 1  # the rows sampled on their own, each kept to the schema


def test_json_schema_streamed_with_the_parse_helper(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, response_format=person_format(False),
                                            temperature=0.8, seed=2, max_tokens=200, stream=True)
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    check_person(text)
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The client's own helper: a pydantic model as the schema (strict), the answer parsed back into it.
    parsed = client.beta.chat.completions.parse(model=MODEL, messages=ASK, response_format=Person,
                                                temperature=0, max_tokens=200)
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and person.model_dump() == check_person(parsed.choices[0].message.content)


def test_json_object_and_unconstrained_rows_share_the_batch(setup, async_client):
    """Constrained rows beside a plain one: each follows its own rule; the plain row is exactly what plain
    greedy generation says."""
    _, reference, tokenizer = setup
    plain_messages = [{"role": "user", "content": "Say anything."}]
    [expected] = reference.generate([ChatFormat(tokenizer).encode_dialog_prompt(plain_messages)],
                                    max_new_tokens=40, sampling=GREEDY)

    # Any JSON object may be endless (a random model's strings need not close within max_tokens): a bias
    # toward closing quotes and braces ends it sooner; the grammar alone decides what is valid.
    closing = {str(tokenizer.encode(t)[0]): 8 for t in ('"', '"}', "}", "null")}

    async def run():
        constrained = [async_client.chat.completions.create(
            model=MODEL, messages=ASK, response_format={"type": "json_object"}, temperature=1.0, seed=s,
            max_tokens=300, logit_bias=closing) for s in range(3)]
        plain = async_client.chat.completions.create(model=MODEL, messages=plain_messages, temperature=0,
                                                     max_tokens=40, logprobs=True)
        return await asyncio.gather(plain, *constrained)

    plain, *constrained = asyncio.run(run())
    assert plain.choices[0].message.content == tokenizer.decode([t for t in expected.token_ids
                                                                if not tokenizer.is_special(t)])
    for reply in constrained:
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
        assert reply.choices[0].finish_reason == "stop"


def test_guided_choice_regex_and_grammars(client):
    choice = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=1, n=3,
                                            extra_body={"guided_choice": ["Elizabeth", "Mr. Darcy", "Jane"]})
    assert {c.message.content for c in choice.choices} <= {"Elizabeth", "Mr. Darcy", "Jane"}
    regex = client.completions.create(model=MODEL, prompt="Longbourn's postcode:", temperature=1.0, seed=3,
                                      max_tokens=30, extra_body={"guided_regex": r"[A-Z]{2}[0-9] [0-9][A-Z]{2}"})
    assert re.fullmatch(r"[A-Z]{2}[0-9] [0-9][A-Z]{2}", regex.choices[0].text)
    gbnf = 'root ::= "The answer is " ("yes" | "no") "."'
    lark = 'start: "Mrs. " NAME\nNAME: /[A-Z][a-z]{2,7}/'
    for grammar, pattern in ((gbnf, r"The answer is (yes|no)\."), (lark, r"Mrs\. [A-Z][a-z]{2,7}")):
        reply = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=4, max_tokens=30,
                                               extra_body={"guided_grammar": grammar})
        assert re.fullmatch(pattern, reply.choices[0].message.content)


def test_what_cannot_compile_is_a_400_with_the_reason(client):
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}
    with pytest.raises(openai.BadRequestError, match="strin") as info:
        client.chat.completions.create(model=MODEL, messages=ASK, response_format=bad_schema)
    assert info.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError, match="unclosed group"):
        client.chat.completions.create(model=MODEL, messages=ASK, extra_body={"guided_regex": "a(b"})
    with pytest.raises(openai.BadRequestError, match="at most one"):
        client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                       extra_body={"guided_choice": ["a"]})
    with pytest.raises(openai.BadRequestError, match="json_schema.schema"):
        client.chat.completions.create(model=MODEL, messages=ASK,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(openai.BadRequestError, match="not a token id"):
        client.chat.completions.create(model=MODEL, messages=ASK, logit_bias={"hello": 5})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(model=MODEL, messages=ASK, logit_bias={"10": 101})
    with pytest.raises(openai.BadRequestError, match="not a token id"):
        client.chat.completions.create(model=MODEL, messages=ASK, logit_bias={str(10**7): 1})


def test_logit_bias_moves_the_choice(setup, client):
    tokenizer = setup[2]
    base = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=5, logprobs=True)
    first = tokenizer.encode(base.choices[0].logprobs.content[0].token)[0]
    banned = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=5,
                                            logprobs=True, logit_bias={str(first): -100})
    assert tokenizer.encode(banned.choices[0].logprobs.content[0].token)[0] != first
    forced_id = tokenizer.encode(" Netherfield")[0]
    forced = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0.7, seed=9, max_tokens=4,
                                            logit_bias={str(forced_id): 100})
    assert forced.choices[0].message.content == tokenizer.decode([forced_id] * 4)


# ----- the mask itself -----
def test_bitmask_unpack_matches_a_bit_by_bit_reading():
    generator = torch.Generator().manual_seed(0)
    vocab = 1000
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32, generator=generator)
    logits = torch.randn(3, vocab, generator=generator)
    masked = apply_token_bitmask(logits, bitmask)
    # the numpy path (CPU fp32) and the torch path (any other dtype or device) agree
    assert torch.equal(apply_token_bitmask(logits.double(), bitmask).float(), masked)
    words = bitmask.numpy().view("uint32")
    for row in range(3):
        for token in range(0, vocab, 7):
            allowed = (int(words[row, token // 32]) >> (token % 32)) & 1
            assert (masked[row, token] == float("-inf")) == (not allowed)
            if allowed:
                assert masked[row, token] == logits[row, token]


def test_constrain_logits_masks_only_constrained_rows(llama3_tokenizer):
    tok = llama3_tokenizer
    compiler = GrammarCompiler(tok, tok.n_words, tok.stop_tokens)
    digits = compiler.regex("[0-9]+")
    logits = torch.randn(3, tok.n_words)
    out = constrain_logits(logits, [None, digits, None], [None, None, {5: 2.5}])
    assert torch.equal(out[0], logits[0])
    allowed = torch.isfinite(out[1]).nonzero().squeeze(1).tolist()
    def is_digits(t: int) -> bool:
        return re.fullmatch(b"[0-9]+", tok.token_bytes(t)) is not None

    assert allowed and all(is_digits(t) for t in allowed)
    assert len(allowed) == sum(map(is_digits, range(128000)))  # every digit token, nothing else
    assert out[2, 5] == logits[2, 5] + 2.5 and torch.equal(out[2, :5], logits[2, :5])
