"""Chat: a conversation -> the base model's prompt, and the text routing embeds.

Both doors (gRPC `GenerateRequest.messages`, HTTP `/v1/chat/completions`) hand the service a
tuple of `ChatMessage`; the service renders it here with the tokenizer's chat template (the
assistant's turn opened, as vLLM's chat endpoint does) and routes on the conversation's last
user turn: what the user asks now, not the template's boiler-plate or older turns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ttmm_vllm.serve.errors import InvalidArgument

ROLES = ("system", "user", "assistant")
# OpenAI's newer name for the system role
ROLE_ALIASES = {"developer": "system"}


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def check_messages(messages: Sequence[ChatMessage], max_chars: int,
                   field_name: str = "messages") -> None:
    """Refuse what no template should see; errors name the message (`messages[2].role`)."""
    if not messages:
        raise InvalidArgument(field_name, "is empty")
    total = 0
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidArgument(f"{field_name}[{i}].role",
                                  f"must be one of {', '.join(ROLES)}, got {m.role!r}")
        if "\x00" in m.content:
            raise InvalidArgument(f"{field_name}[{i}].content", "contains a NUL character")
        total += len(m.content)
    if total > max_chars:
        raise InvalidArgument(field_name, f"longer than {max_chars} characters")
    last = last_user_index(messages)
    if last is None:
        raise InvalidArgument(field_name, "has no user turn (routing embeds the last one)")
    if not messages[last].content.strip():
        raise InvalidArgument(f"{field_name}[{last}].content", "the last user turn is empty")


def last_user_index(messages: Sequence[ChatMessage]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "user":
            return i
    return None


def routing_text(messages: Sequence[ChatMessage]) -> str:
    """What routing embeds: the last user turn."""
    i = last_user_index(messages)
    return messages[i].content if i is not None else ""


def render(tokenizer, messages: Sequence[ChatMessage], field_name: str = "messages") -> str:
    """The prompt text: the tokenizer's chat template over the conversation, with the
    assistant's turn opened (tokenize it without adding special tokens: the template has
    them)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument(field_name, "the base model has no chat template; send a prompt")
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template's own refusal (e.g. roles must alternate)
        raise InvalidArgument(field_name, f"the chat template refused it: {e}") from e
