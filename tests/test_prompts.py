"""Prompt templates: captioning, VQA and flattened chat, with every validation error."""

from __future__ import annotations

import pytest

from blipserve.errors import InvalidRequest
from blipserve.processing.prompts import (
    DEFAULT_VQA_TEMPLATE,
    caption_prompt,
    chat_prompt,
    fit_chat_prompt,
    normalize_whitespace,
    vqa_prompt,
)

LAVIS_TEMPLATE = "Question: {question} Short answer:"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# -- captioning ------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [None, "", "   ", "\n"])
def test_caption_without_prompt_is_empty(prompt):
    assert caption_prompt(prompt) == ""


def test_caption_prompt_passes_through():
    assert caption_prompt("a photo of") == "a photo of"


def test_caption_prompt_whitespace_is_normalised():
    assert caption_prompt("  a  photo\nof ") == "a photo of"


def test_caption_prompt_must_be_a_string():
    with pytest.raises(InvalidRequest, match="prompt must be a string"):
        caption_prompt(42)


# -- VQA -------------------------------------------------------------------------------------


def test_vqa_default_template():
    assert DEFAULT_VQA_TEMPLATE == "Question: {question} Answer:"
    assert vqa_prompt("which city is this?") == "Question: which city is this? Answer:"


def test_vqa_custom_template():
    assert vqa_prompt("what is it?", LAVIS_TEMPLATE) == "Question: what is it? Short answer:"


def test_vqa_whitespace_and_trailing_template_space():
    assert vqa_prompt("  what\n is\tit? ") == "Question: what is it? Answer:"
    assert vqa_prompt("why?", "Q: {question} A: ") == "Q: why? A:"


def test_vqa_braces_are_literal():
    assert vqa_prompt("is {x} a set?", "{question} {answer}") == "is {x} a set? {answer}"


@pytest.mark.parametrize("template", ["Question: Answer:", "Question: {q} Answer:", None, 3])
def test_vqa_template_without_question_field(template):
    with pytest.raises(InvalidRequest, match=r"\{question\}"):
        vqa_prompt("what?", template)


@pytest.mark.parametrize("question", ["", "  \n "])
def test_vqa_empty_question(question):
    with pytest.raises(InvalidRequest, match="question is empty"):
        vqa_prompt(question)


def test_vqa_question_must_be_a_string():
    with pytest.raises(InvalidRequest, match="question must be a string"):
        vqa_prompt(["what?"])


# -- chat ------------------------------------------------------------------------------------


def test_chat_single_question_is_vqa():
    assert chat_prompt([user("what is this?")]) == vqa_prompt("what is this?")


def test_chat_flattens_history():
    messages = [user("what is it?"), assistant("a dog"), user("what color?")]
    expected = "Question: what is it? Answer: a dog Question: what color? Answer:"
    assert chat_prompt(messages) == expected


def test_fit_chat_prompt_keeps_the_newest_turns_that_fit():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is it?"},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "what colour?"},
        {"role": "assistant", "content": "orange"},
        {"role": "user", "content": "where is it?"},
    ]
    whole = chat_prompt(messages)
    assert fit_chat_prompt(messages, lambda prompt: True) == (whole, 0)
    newer = chat_prompt(messages[3:])  # a question and its answer at a time
    assert fit_chat_prompt(messages, lambda prompt: len(prompt) <= len(newer)) == (newer, 2)
    last = "Question: where is it? Answer:"  # kept even when it does not fit either
    assert fit_chat_prompt(messages, lambda prompt: False) == (last, 4)


def test_chat_custom_template():
    messages = [user("u1"), assistant("a1"), user("u2")]
    assert chat_prompt(messages, LAVIS_TEMPLATE) == (
        "Question: u1 Short answer: a1 Question: u2 Short answer:"
    )


def test_chat_ignores_system_and_developer_messages():
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        user("u1"),
        {"role": "developer", "content": ["not", "checked"]},
        assistant("a1"),
        {"role": "system", "content": ""},
        user("u2"),
    ]
    assert chat_prompt(messages) == "Question: u1 Answer: a1 Question: u2 Answer:"


def test_chat_merges_consecutive_messages_of_one_role():
    messages = [
        user("look at this."),
        user("what is it?"),
        assistant("a cat"),
        assistant("sleeping"),
        user("where?"),
    ]
    assert chat_prompt(messages) == (
        "Question: look at this. what is it? Answer: a cat sleeping Question: where? Answer:"
    )


def test_chat_whitespace_is_normalised():
    messages = [user(" what\nis it? "), assistant("a\tdog\n"), user("ok?")]
    assert chat_prompt(messages) == "Question: what is it? Answer: a dog Question: ok? Answer:"


def test_chat_ignores_extra_keys():
    message = {"role": "user", "content": "hi?", "name": "bob"}
    assert chat_prompt([message]) == "Question: hi? Answer:"


@pytest.mark.parametrize("messages", [[], (), "what?", None, {"role": "user", "content": "x"}])
def test_chat_needs_a_non_empty_list(messages):
    with pytest.raises(InvalidRequest, match="non-empty list"):
        chat_prompt(messages)


def test_chat_only_system_messages():
    with pytest.raises(InvalidRequest, match="no user message"):
        chat_prompt([{"role": "system", "content": "be brief"}])


def test_chat_unknown_role_names_the_index():
    with pytest.raises(InvalidRequest, match=r"messages\[1\]: unknown role 'bot'"):
        chat_prompt([user("hi"), {"role": "bot", "content": "x"}, user("hi")])


def test_chat_missing_role():
    with pytest.raises(InvalidRequest, match=r"messages\[0\]: unknown role None"):
        chat_prompt([{"content": "hi"}])


@pytest.mark.parametrize("content", [None, 3, [{"type": "text", "text": "hi"}]])
def test_chat_content_must_be_a_string(content):
    with pytest.raises(InvalidRequest, match=r"messages\[2\]: content must be a string"):
        chat_prompt([user("u1"), assistant("a1"), {"role": "user", "content": content}])


@pytest.mark.parametrize("content", ["", "  \n\t "])
def test_chat_empty_content(content):
    with pytest.raises(InvalidRequest, match=r"messages\[1\]: content is empty"):
        chat_prompt([user("u1"), assistant(content), user("u2")])


def test_chat_message_must_be_an_object():
    with pytest.raises(InvalidRequest, match=r"messages\[0\]: expected an object"):
        chat_prompt(["hello"])


def test_chat_last_message_must_be_from_user():
    with pytest.raises(InvalidRequest, match=r"messages\[1\]: the last message must be from"):
        chat_prompt([user("u1"), assistant("a1"), {"role": "system", "content": "x"}])


def test_chat_must_start_with_user():
    with pytest.raises(InvalidRequest, match=r"messages\[1\]: the conversation must start"):
        chat_prompt([{"role": "system", "content": "x"}, assistant("hello"), user("u1")])


def test_chat_bad_template():
    with pytest.raises(InvalidRequest, match=r"\{question\}"):
        chat_prompt([user("u1")], "Q: A:")


def test_normalize_whitespace():
    assert normalize_whitespace(" a \t b\r\n\nc  ") == "a b c"
    assert normalize_whitespace("") == ""
