"""Turning rows into token ids with the loss restricted to response tokens.

A text row is ``tokenizer(prompt) + tokenizer(response) + EOS``. A chat row (the prompt is a list
of messages) is rendered as TRL's SFT renders a conversational prompt-completion: the chat template
of ``prompt + [assistant response]``, with the loss on what follows the template of the prompt with
its generation prompt (so the answer and the template's end-of-turn tokens are learned, and the
template's own BOS is the only one). Labels are ``-100`` off the response. Evaluation prompts are
tokenized by the same ``prompt_ids``. Over-long rows have their prompt cut from the left
(``truncation: left``, one summary warning) or are refused (``truncation: error``); an answer longer
than ``max_length`` by itself is refused either way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from prism_lightning.errors import DataFormatError
from prism_lightning.influence.objective import IGNORE


@dataclass
class Encoded:
    """Token ids of one prompt + response: the response (after ``prompt_len``) carries the loss, or, when given,
    exactly the ``turns`` (``[start, end)`` spans: every assistant turn of a chat, as TRL's ``assistant_only_loss``)."""

    input_ids: list[int]
    prompt_len: int
    turns: list[list[int]] = field(default_factory=list)

    def label_spans(self) -> list[tuple[int, int]]:
        """The ``[start, end)`` spans whose tokens carry the loss."""
        return [(a, b) for a, b in self.turns] or [(self.prompt_len, len(self.input_ids))]


def render_prompt(tokenizer, prompt) -> str:
    """Prompt text: a string as is, messages through the chat template (generation prompt on)."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m.get('role', 'user')}: {m['content']}\n" for m in prompt) + "assistant: "


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                              return_dict=False))


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt as training and evaluation see it (chat: the template with its generation prompt)."""
    if not isinstance(prompt, str) and getattr(tokenizer, "chat_template", None):
        return _chat_ids(tokenizer, prompt, True)
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=isinstance(prompt, str))["input_ids"]


def _response_ids(tokenizer, prompt, response: str, p_ids: list[int], append_eos: bool, where: str) -> list[int]:
    if not isinstance(prompt, str) and getattr(tokenizer, "chat_template", None):
        full = _chat_ids(tokenizer, [*prompt, {"role": "assistant", "content": response}], False)
        if full[: len(p_ids)] != p_ids:
            raise DataFormatError(f"{where}: the chat template renders the conversation so that the prompt is not "
                                  "its prefix; the response tokens cannot be separated (use another template)")
        return full[len(p_ids):]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if append_eos and eos is not None and (not r_ids or r_ids[-1] != eos):
        r_ids = r_ids + [eos]
    return r_ids


def assistant_turns(tokenizer, messages: list[dict], ids: list[int], where: str) -> list[list[int]]:
    """``[start, end)`` token spans of every assistant message of a chat rendered as ``ids``.

    A template that marks assistant content (``{% generation %}``) gives transformers' assistant mask, exactly
    what TRL SFT's ``assistant_only_loss`` learns; otherwise each assistant message is what the template adds for
    it (its content and end-of-turn tokens), found by rendering the conversation up to it with and without it.
    """
    try:
        marked = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
    except Exception:  # a template without generation markers (transformers refuses or warns)
        marked = None
    if marked is not None and list(marked["input_ids"]) == ids and any(marked["assistant_masks"]):
        mask, spans, start = list(marked["assistant_masks"]), [], None
        for i, m in enumerate([*mask, 0]):
            if m and start is None:
                start = i
            elif not m and start is not None:
                spans.append([start, i])
                start = None
        return spans
    spans = []
    for j, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _chat_ids(tokenizer, messages[:j], True) if j else []
        upto = _chat_ids(tokenizer, messages[: j + 1], False)
        if upto != ids[: len(upto)] or before != upto[: len(before)]:
            raise DataFormatError(f"{where}: the chat template renders turn {j + 1} differently inside the whole "
                                  "conversation; its tokens cannot be found (use data.chat_loss: last_turn)")
        spans.append([len(before), len(upto)])
    return spans


class Encoder:
    """Encodes (prompt, response) with response-only labels and the truncation policy; ``all_turns``: a chat
    prompt's earlier assistant turns carry the loss too."""

    def __init__(self, tokenizer, max_length: int = 512, truncation: str = "left", append_eos: bool = True,
                 all_turns: bool = False):
        if truncation not in ("left", "error"):
            raise ValueError(f"truncation={truncation!r} must be 'left' or 'error'")
        self.tok, self.max_length, self.truncation, self.append_eos = tokenizer, max_length, truncation, append_eos
        self.all_turns = all_turns
        self.truncated = 0

    def encode(self, prompt, response: str, where: str) -> Encoded:
        """Ids for one row; ``where`` names the row in errors (``file: row N``).

        A row over ``max_length`` has its prompt cut from the left (``truncation: left``) or is refused
        (``error``); an answer that alone exceeds ``max_length`` is always refused, never cut.
        """
        p_ids = prompt_ids(self.tok, prompt)
        r_ids = _response_ids(self.tok, prompt, response, p_ids, self.append_eos, where)
        if not r_ids:
            raise DataFormatError(f"{where}: the response encodes to no tokens")
        if len(r_ids) > self.max_length:
            raise DataFormatError(f"{where}: the answer alone is {len(r_ids)} tokens, more than max_length="
                                  f"{self.max_length}: cutting it would teach (and score) a wrong ending; raise "
                                  "data.max_length, or shorten or drop the row")
        total = len(p_ids) + len(r_ids)
        turns = []
        if self.all_turns and isinstance(prompt, list) and getattr(self.tok, "chat_template", None):
            turns = assistant_turns(self.tok, [*prompt, {"role": "assistant", "content": response}], p_ids + r_ids,
                                    where)
        if total > self.max_length:
            if self.truncation == "error":
                raise DataFormatError(f"{where}: {total} tokens exceed max_length={self.max_length}; raise "
                                      "data.max_length or set data.truncation: left")
            self.truncated += 1
            keep = self.max_length - len(r_ids)
            cut = len(p_ids) - keep
            p_ids = p_ids[cut:] if keep else []
            turns = [[max(a - cut, 0), b - cut] for a, b in turns if b - cut > 0]
        return Encoded(p_ids + r_ids, len(p_ids), turns)

    def warn_truncated(self, what: str) -> None:
        """One summary warning for all rows cut to ``max_length``."""
        if self.truncated:
            warnings.warn(truncation_warning(what, self.truncated, self.max_length), stacklevel=2)
        self.truncated = 0


def truncation_warning(where: str, rows: int, max_length: int) -> str:
    return (f"{where}: {rows} rows longer than max_length={max_length} had their prompt cut from the left to fit "
            "(answers are kept whole)")


def pad_batch(seqs: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: ``input_ids``, ``attention_mask`` and response-only ``labels``."""
    width = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[b, :n] = torch.tensor(s.input_ids)
        for start, end in s.label_spans():
            labels[b, start:end] = ids[b, start:end]
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_batch(seqs: list[Encoded]) -> dict[str, torch.Tensor]:
    """The rows of a batch as one sequence, without padding: ``input_ids``, ``labels`` and ``position_ids`` [1, N]
    for the ``N`` real tokens. Position ids restart at 0 with each row, which is how the model's attention knows
    where rows begin (``influence.varlen.packed_attention`` keeps attention inside each row). A row's first token
    carries no label, as in a padded batch (nothing before it in its row predicts it)."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for s in seqs:
        row = [IGNORE] * len(s.input_ids)
        for start, end in s.label_spans():
            row[start:end] = s.input_ids[start:end]
        row[0] = IGNORE
        ids += s.input_ids
        labels += row
        positions += range(len(s.input_ids))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions])}
