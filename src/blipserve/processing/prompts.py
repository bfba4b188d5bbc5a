"""Prompt templates: what BLIP-2 OPT is given as text after its 32 image queries.

    captioning          ""                                   (the model writes freely)
    prompted caption    "a photo of"                         (COCO fine-tune style)
    VQA                 "Question: {question} Answer:"
    chat                "Question: {u1} Answer: {a1} Question: {u2} Answer:"

Whitespace: in user text (prompts, questions, message contents) every run of spaces,
tabs or newlines becomes one space and the ends are stripped. ``"\\n"`` is the model's
end-of-text token, so a newline inside a prompt would read as "the text ended here", and a
trailing space would become a lone ``Ġ`` token that the model never saw before a word.
A rendered template is stripped at its ends too; inside it, it is kept as written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from blipserve.errors import InvalidRequest

DEFAULT_VQA_TEMPLATE = "Question: {question} Answer:"
QUESTION_FIELD = "{question}"

USER, ASSISTANT = "user", "assistant"
IGNORED_ROLES = ("system", "developer")  # instructions BLIP-2 was never trained to follow


def normalize_whitespace(text: str) -> str:
    """Collapse each whitespace run to one space and strip the ends."""
    return " ".join(text.split())


def caption_prompt(prompt: str | None) -> str:
    """The text that primes a caption: ``""`` (plain captioning) or e.g. ``"a photo of"``."""
    if prompt is None:
        return ""
    if not isinstance(prompt, str):
        raise InvalidRequest(f"prompt must be a string, got {type(prompt).__name__}")
    return normalize_whitespace(prompt)


def vqa_prompt(question: str, template: str = DEFAULT_VQA_TEMPLATE) -> str:
    """``question`` placed in ``template`` at ``{question}``: ``"Question: ... Answer:"``.

    Only the literal ``{question}`` is replaced, so braces elsewhere (in the template or
    the question) are kept as they are.
    """
    _check_template(template)
    if not isinstance(question, str):
        raise InvalidRequest(f"question must be a string, got {type(question).__name__}")
    question = normalize_whitespace(question)
    if not question:
        raise InvalidRequest("question is empty")
    return template.replace(QUESTION_FIELD, question).strip()


def chat_prompt(messages: Sequence[Mapping[str, Any]], template: str = DEFAULT_VQA_TEMPLATE) -> str:
    """Flatten a conversation into one prompt that asks for the next assistant reply.

    ``messages`` are ``{"role": "user" | "assistant", "content": str}`` dicts, oldest first.
    Each user turn is rendered with ``template`` (as :func:`vqa_prompt`), each assistant
    turn follows as its answer, all joined by one space:
    ``"Question: {u1} Answer: {a1} Question: {u2} Answer:"``.

    - ``"system"`` (and ``"developer"``) messages are ignored wherever they appear: BLIP-2
      has no notion of instructions, and OpenAI clients often send one by default.
    - Consecutive messages from the same role are merged into one turn, joined by a space.
    - The conversation must start and end with a user message (after dropping ignored
      roles); every content must be a non-empty string. Errors name the message by its
      index in ``messages``.
    """
    _check_template(template)
    return _render(_turns(messages), template)


def fit_chat_prompt(
    messages: Sequence[Mapping[str, Any]],
    fits: Callable[[str], bool],
    template: str = DEFAULT_VQA_TEMPLATE,
) -> tuple[str, int]:
    """:func:`chat_prompt` of the newest turns whose prompt ``fits``, and how many older
    turns it leaves out (0: the whole conversation fits).

    Turns are left out from the oldest, a question and its answer at a time. The last user
    message is always kept, even when it alone does not fit (the caller then clamps the
    answer's length, or refuses the prompt).
    """
    _check_template(template)
    turns = _turns(messages)
    starts = [i for i, (role, _) in enumerate(turns) if role == USER]
    for start in starts[:-1]:
        prompt = _render(turns[start:], template)
        if fits(prompt):
            return prompt, start
    return _render(turns[starts[-1] :], template), starts[-1]


def _render(turns: Sequence[tuple[str, str]], template: str) -> str:
    """User turns through ``template``, answers as they are, joined by one space."""
    return " ".join(vqa_prompt(text, template) if role == USER else text for role, text in turns)


def _check_template(template: str) -> None:
    if not isinstance(template, str) or QUESTION_FIELD not in template:
        raise InvalidRequest(
            f"a prompt template must be a string containing {QUESTION_FIELD}, got {template!r}"
        )


def _turns(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(role, text) per turn, same-role neighbours merged, ignored roles dropped, validated."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects")
    turns: list[tuple[str, str]] = []
    last_index = -1
    for index, message in enumerate(messages):
        role, text = _message(index, message)
        if role is None:
            continue
        if not turns and role != USER:
            raise InvalidRequest(
                f"messages[{index}]: the conversation must start with a user message"
            )
        if turns and turns[-1][0] == role:
            turns[-1] = (role, f"{turns[-1][1]} {text}")
        else:
            turns.append((role, text))
        last_index = index
    if not turns:
        raise InvalidRequest("messages hold no user message")
    if turns[-1][0] != USER:
        raise InvalidRequest(
            f"messages[{last_index}]: the last message must be from the user, not the assistant"
        )
    return turns


def _message(index: int, message: Any) -> tuple[str | None, str]:
    """A message's role and normalised content; role None for an ignored message."""
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        kind = type(message).__name__
        raise InvalidRequest(f"{where}: expected an object with role and content, got {kind}")
    role = message.get("role")
    if role in IGNORED_ROLES:
        return None, ""
    if role not in (USER, ASSISTANT):
        known = ", ".join(repr(r) for r in (USER, ASSISTANT, *IGNORED_ROLES))
        raise InvalidRequest(f"{where}: unknown role {role!r}; expected one of {known}")
    content = message.get("content")
    if not isinstance(content, str):
        raise InvalidRequest(f"{where}: content must be a string, got {type(content).__name__}")
    text = normalize_whitespace(content)
    if not text:
        raise InvalidRequest(f"{where}: content is empty")
    return role, text
