"""Tests for prompt shaping of prompted variants: chat messages and completion prompts."""

from __future__ import annotations

from typing import Any

import pytest

from router.shaping import (
    PromptShapeError,
    injected_text,
    shape_chat_messages,
    shape_completion,
    shape_completion_prompt,
)

SYSTEM = "You classify support tickets."
EXAMPLES = [("I was charged twice", "billing"), ("App crashes", "bug")]
EXAMPLE_MESSAGES = [
    {"role": "user", "content": "I was charged twice"},
    {"role": "assistant", "content": "billing"},
    {"role": "user", "content": "App crashes"},
    {"role": "assistant", "content": "bug"},
]


def _same_objects(got: list[Any], want: list[Any]) -> bool:
    return len(got) == len(want) and all(a is b for a, b in zip(got, want, strict=True))


def test_chat_without_client_system() -> None:
    user = {"role": "user", "content": "Refund please"}
    messages = [user]
    shaped = shape_chat_messages(messages, SYSTEM, EXAMPLES)
    assert shaped == [{"role": "system", "content": SYSTEM}, *EXAMPLE_MESSAGES, user]
    assert shaped[-1] is user
    assert messages == [user]  # the client's list is not changed


def test_chat_merges_client_system_after_blank_line() -> None:
    client_system = {"role": "system", "content": "Answer in French.", "name": "ops"}
    rest = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Salut"}]
    messages = [client_system, *rest]
    shaped = shape_chat_messages(messages, SYSTEM, EXAMPLES)
    assert shaped[0] == {
        "role": "system",
        "content": SYSTEM + "\n\nAnswer in French.",
        "name": "ops",
    }
    assert shaped[1:5] == EXAMPLE_MESSAGES
    assert _same_objects(shaped[5:], rest)
    assert client_system["content"] == "Answer in French."  # not mutated
    assert len(messages) == 3


def test_chat_examples_in_order_then_client_messages_in_order() -> None:
    rest = [{"role": "user", "content": str(i)} for i in range(5)]
    shaped = shape_chat_messages(rest, SYSTEM, EXAMPLES)
    assert [m["content"] for m in shaped[1:5]] == [
        "I was charged twice",
        "billing",
        "App crashes",
        "bug",
    ]
    assert _same_objects(shaped[5:], rest)


def test_chat_later_system_messages_stay_in_place() -> None:
    first = {"role": "system", "content": "first"}
    later = {"role": "system", "content": "later"}
    user = {"role": "user", "content": "q"}
    shaped = shape_chat_messages([first, user, later], SYSTEM, [])
    assert shaped[0]["content"] == SYSTEM + "\n\nfirst"
    assert _same_objects(shaped[1:], [user, later])


def test_chat_system_not_first_is_not_merged() -> None:
    user = {"role": "user", "content": "q"}
    system = {"role": "system", "content": "late"}
    shaped = shape_chat_messages([user, system], SYSTEM, [])
    assert shaped[0] == {"role": "system", "content": SYSTEM}
    assert _same_objects(shaped[1:], [user, system])


def test_chat_developer_message_is_not_merged() -> None:
    developer = {"role": "developer", "content": "be brief"}
    shaped = shape_chat_messages([developer], SYSTEM, [])
    assert shaped[0] == {"role": "system", "content": SYSTEM}
    assert shaped[1] is developer


def test_chat_client_system_as_list_of_parts() -> None:
    client_system = {
        "role": "system",
        "content": [
            {"type": "text", "text": "Be "},
            {"type": "image_url", "image_url": {"url": "http://x"}},
            {"type": "text", "text": "brief."},
        ],
    }
    shaped = shape_chat_messages([client_system], SYSTEM, [])
    assert shaped == [{"role": "system", "content": SYSTEM + "\n\nBe brief."}]


@pytest.mark.parametrize("content", ["", None, []])
def test_chat_empty_client_system_adds_no_blank_line(content: Any) -> None:
    shaped = shape_chat_messages([{"role": "system", "content": content}], SYSTEM, [])
    assert shaped == [{"role": "system", "content": SYSTEM}]


def test_chat_bad_client_system_content_raises() -> None:
    with pytest.raises(PromptShapeError):
        shape_chat_messages([{"role": "system", "content": 42}], SYSTEM, [])


def test_chat_empty_variant_prompt_returns_messages_unchanged() -> None:
    messages = [{"role": "system", "content": "client"}, {"role": "user", "content": "q"}]
    shaped = shape_chat_messages(messages, "", [])
    assert shaped is not messages
    assert _same_objects(shaped, messages)


def test_chat_empty_system_with_examples_keeps_client_system_first() -> None:
    client_system = {"role": "system", "content": "client"}
    user = {"role": "user", "content": "q"}
    shaped = shape_chat_messages([client_system, user], "", EXAMPLES)
    assert shaped[0] is client_system
    assert shaped[1:5] == EXAMPLE_MESSAGES
    assert shaped[5] is user


def test_chat_empty_system_with_examples_and_no_client_system() -> None:
    user = {"role": "user", "content": "q"}
    assert shape_chat_messages([user], "", EXAMPLES) == [*EXAMPLE_MESSAGES, user]


def test_completion_template_one_example() -> None:
    got = shape_completion_prompt("My card failed", "Classify.", [("Charged twice", "billing")])
    assert got == (
        "Classify.\n\nUser: Charged twice\nAssistant: billing\n\nUser: My card failed\nAssistant:"
    )


def test_completion_template_two_examples() -> None:
    got = shape_completion_prompt("q", "S", [("u1", "a1"), ("u2", "a2")])
    assert got == "S\n\nUser: u1\nAssistant: a1\n\nUser: u2\nAssistant: a2\n\nUser: q\nAssistant:"


def test_completion_template_no_examples() -> None:
    assert shape_completion_prompt("q", "S", []) == "S\n\nUser: q\nAssistant:"


def test_completion_template_empty_system_has_no_leading_blank_lines() -> None:
    got = shape_completion_prompt("q", "", [("u1", "a1")])
    assert got == "User: u1\nAssistant: a1\n\nUser: q\nAssistant:"


def test_completion_with_nothing_to_inject_is_unchanged() -> None:
    assert shape_completion_prompt("raw prompt", "", []) == "raw prompt"


def test_shape_completion_string_and_list_of_strings() -> None:
    assert shape_completion("q", "S", []) == "S\n\nUser: q\nAssistant:"
    assert shape_completion(["a", "b"], "S", []) == [
        "S\n\nUser: a\nAssistant:",
        "S\n\nUser: b\nAssistant:",
    ]


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[1, 2], [3]], [[]]])
def test_shape_completion_token_array_raises(prompt: Any) -> None:
    with pytest.raises(PromptShapeError, match="token-array"):
        shape_completion(prompt, SYSTEM, EXAMPLES)


@pytest.mark.parametrize("prompt", [None, 7, {"text": "q"}, ["a", 1], [True]])
def test_shape_completion_other_shapes_raise(prompt: Any) -> None:
    with pytest.raises(PromptShapeError):
        shape_completion(prompt, SYSTEM, EXAMPLES)


def test_prompt_shape_error_is_a_value_error() -> None:
    assert issubclass(PromptShapeError, ValueError)


def test_injected_text() -> None:
    assert injected_text(SYSTEM, EXAMPLES) == [
        SYSTEM,
        "I was charged twice",
        "billing",
        "App crashes",
        "bug",
    ]
    assert injected_text("", []) == []
    assert injected_text("", [("u", "")]) == ["u"]
