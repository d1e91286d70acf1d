"""The official `openai` package against a running qwen-ocr server, unchanged.

    python tests/openai_client.py BASE_URL IMAGE EXPECTED_TEXT MAX_TOKENS

Sends the image as a data: URL, once plain and once streamed, and checks both replies
against EXPECTED_TEXT (what `qwen-ocr generate` printed for the same input). Then asks for
structured output through the client's own helper with pydantic models (plain and streamed;
one with a tagged union, an optional field, a nested list and an enum), for a non-strict
schema whose relaxation the client reads back, and for log-probabilities.
"""

import base64
import re
import sys
from enum import Enum
from typing import Literal, Optional, Union

from openai import OpenAI
from pydantic import BaseModel, Field

base_url, image_path, expected, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
prompt = "Please extract the Vehicle Sr No, Engine No, and Model from this image. Response only json format nothing else."

with open(image_path, "rb") as f:
    data_url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
client = OpenAI(base_url=base_url + "/v1", api_key="test-key")
messages = [
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": prompt},
        ],
    }
]

models = [m.id for m in client.models.list()]
assert "base" in models, models

reply = client.chat.completions.create(model="base", messages=messages, max_tokens=max_tokens, temperature=0)
assert reply.choices[0].message.content == expected, (reply.choices[0].message.content, expected)
assert reply.choices[0].finish_reason == "length", reply.choices[0].finish_reason
assert reply.usage.completion_tokens == max_tokens, reply.usage

stream = client.chat.completions.create(
    model="base",
    messages=messages,
    max_tokens=max_tokens,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
text, finish, usage = "", None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
assert text == expected, (text, expected)
assert finish == "length", finish
assert usage is not None and usage.completion_tokens == max_tokens, usage


class Plate(BaseModel):
    plate: str = Field(pattern=r"^[A-Z]{2}[0-9]{2}$")
    year: int = Field(ge=1990, le=2030)
    color: Literal["red", "blue", "white"]


# The tiny model's random weights never write JSON: a parsed Plate is the constraint's doing.
parsed = client.chat.completions.parse(model="base", messages=messages, response_format=Plate, max_tokens=64, temperature=0)
plate = parsed.choices[0].message.parsed
assert isinstance(plate, Plate), parsed
assert re.fullmatch(r"[A-Z]{2}[0-9]{2}", plate.plate) and 1990 <= plate.year <= 2030, plate

with client.chat.completions.stream(model="base", messages=messages, response_format=Plate, max_tokens=64, temperature=0) as events:
    final = events.get_final_completion()
assert final.choices[0].message.parsed == plate, (final.choices[0].message.parsed, plate)



# What pydantic writes for a tagged union (`oneOf` with a discriminator, through `$ref`s), an
# optional field (`anyOf` with null), a nested list of models and an enum; `parse()` sends it
# with `strict: true`, so each of these must be enforced exactly.
class Color(str, Enum):
    red = "red"
    blue = "blue"


class Cat(BaseModel):
    pet_type: Literal["cat"]
    lives: int = Field(ge=1, le=9)


class Dog(BaseModel):
    pet_type: Literal["dog"]
    good: bool


class Line(BaseModel):
    text: str = Field(max_length=8)
    score: int = Field(ge=0, le=100)


class Document(BaseModel):
    pet: Union[Cat, Dog] = Field(discriminator="pet_type")
    note: Optional[str] = Field(default=None, max_length=6)
    lines: list[Line] = Field(max_length=2)
    color: Color


for prompt_text in ["Describe the document.", "List the lines you can read."]:
    ask = [{"role": "user", "content": [messages[0]["content"][0], {"type": "text", "text": prompt_text}]}]
    parsed = client.chat.completions.parse(model="base", messages=ask, response_format=Document, max_tokens=256, temperature=0)
    document = parsed.choices[0].message.parsed
    assert isinstance(document, Document) and isinstance(document.pet, (Cat, Dog)), parsed
    assert isinstance(document.color, Color) and len(document.lines) <= 2, document
    assert parsed.schema_valid is True and parsed.schema_relaxed == [], parsed

# Not strict: what the grammar cannot enforce is reported where the client can read it.
unique = {"type": "array", "items": {"enum": ["a"]}, "minItems": 2, "maxItems": 2, "uniqueItems": True}
raw = client.chat.completions.with_raw_response.create(
    model="base",
    messages=messages,
    max_tokens=16,
    response_format={"type": "json_schema", "json_schema": {"name": "pair", "schema": unique}},
)
relaxed = raw.parse()
assert raw.headers["x-qwen-ocr-schema-relaxed"] == "uniqueItems", raw.headers
assert relaxed.choices[0].message.content == '["a","a"]', relaxed
assert relaxed.schema_relaxed[0]["path"] == "/uniqueItems" and relaxed.schema_valid is False, relaxed

reply = client.chat.completions.create(
    model="base", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
)
entries = reply.choices[0].logprobs.content
assert len(entries) == 4, entries
for entry in entries:
    assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob, entry
print("openai client: ok")
