"""The engine's input rows: one prompt (token ids) per image, checked once for every model."""

from __future__ import annotations

from blipserve.errors import InvalidRequest


def check_prompt_rows(prompt_ids: list[list[int]], num_images: int, form: str) -> None:
    """Raise :class:`InvalidRequest` unless there is one non-empty prompt per image; ``form``
    says what a prompt looks like to the model ("starting with BOS", "ending with </s>")."""
    if len(prompt_ids) != num_images or any(len(ids) == 0 for ids in prompt_ids):
        raise InvalidRequest(
            f"need one non-empty prompt ({form}) per image: got {len(prompt_ids)} prompts "
            f"for {num_images} images"
        )
