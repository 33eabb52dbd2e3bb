"""Chat conversations -> token ids and which tokens are targets, in time linear in the turns.

The rule (`targets_by_prefixes`): an assistant turn is what rendering the conversation through
that turn adds to rendering it up to the turn's header (the generation prompt), in tokens; those
tokens, the content and the template's end-of-turn marker, are the targets. Applied literally it
renders and tokenizes two prefixes per assistant turn, a cost that grows with the square of the
turns. It stays here as the reference and as the fallback for a conversation the fast path cannot
vouch for.

`encode_conversations` gets the same answer with one render and one tokenization per conversation:

- The shape of a conversation is its messages with each content replaced by a placeholder. The rule
  is applied to the shape, in characters, once per distinct shape (roles and any other keys): that
  places every assistant turn's start and end among the template's own text and the placeholders.
  Folded system prompts, per-role headers, a BOS only at the start: all come out of the template.
- A conversation's own rendering must equal its shape's rendering with the contents put back, as
  given or all trimmed (`content | trim`); that puts the boundaries in its characters. A template
  that rewrites contents otherwise fails this.
- All renderings are tokenized in one batch. The rule counts the tokens of the rendering up to a
  turn's start, and requires the tokens up to its end to be the conversation's own. Tokenizers cut
  text at added tokens and encode the pieces between them independently, so the tokens up to a
  boundary are the conversation's up to the last added token before it, then the piece from that
  token to the boundary, tokenized alone: a few characters, nearly always the same few
  ("<|im_start|>assistant\\n"), tokenized once per call. (Without added tokens between turns the
  piece is the whole prefix: still right, but no longer linear.)

What the fast path assumes and does not check per conversation: that the template renders contents
in prefixes the way it does in the whole conversation. A conversation that fails any check is
encoded by the rule itself, and counted, so the masks always equal the rule's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Private-use characters: no template writes them, so the placeholders are found unambiguously.
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_SPLIT = re.compile("\ue000(\\d+)\ue001")


@dataclass
class EncodedConversations:
    """Per conversation, in input order: token ids and whether each token is a target (unshifted)."""

    ids: list[list[int]] = field(default_factory=list)
    targets: list[list[bool]] = field(default_factory=list)
    fallbacks: int = 0  # conversations the fast path could not verify, encoded prefix by prefix


@dataclass(frozen=True)
class _Shape:
    """A template's rendering of one conversation shape: its own text, with contents in between."""

    literals: tuple[str, ...]  # the template's text around the contents; one more than `slots`
    slots: tuple[int, ...]  # after literal g comes the content of message slots[g]
    # Per assistant message, where its turn starts and ends: (literal index, offset into that literal).
    turns: tuple[tuple[tuple[int, int], tuple[int, int]], ...]


def _require_template(tokenizer) -> None:
    if not tokenizer.chat_template:
        raise ValueError(f"data.format=chat: the tokenizer of {tokenizer.name_or_path} has no chat template")


def _not_prefix_by_prefix(tokenizer) -> ValueError:
    template = str(tokenizer.chat_template)[:60]
    return ValueError(
        "data.format=chat: the chat template does not render conversations prefix by prefix "
        f"(tokenizer {tokenizer.name_or_path}, template {template!r}...)"
    )


def _render(tokenizer, messages, generation_prompt: bool, tokenize: bool):
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=tokenize, return_dict=False
    )


def targets_by_prefixes(
    tokenizer, messages: list[dict], train_on_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """The rule itself: token ids of the rendered conversation and, per token, whether it is a target.

    Only the assistant turns are targets (every token with `train_on_prompt`). Renders and tokenizes
    two prefixes per assistant turn: the reference, and the fallback of `encode_conversations`.
    """
    _require_template(tokenizer)
    ids = list(_render(tokenizer, messages, False, True))
    is_target = [train_on_prompt] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The assistant turn is what rendering through it adds to rendering up to its header.
        through_turn = list(_render(tokenizer, messages[: i + 1], False, True))
        start, end = len(_render(tokenizer, messages[:i], True, True)), len(through_turn)
        if ids[:end] != through_turn:
            raise _not_prefix_by_prefix(tokenizer)
        is_target[start:end] = [True] * (end - start)
    return ids, is_target


def _shape_key(messages) -> tuple | None:
    """What the template may look at besides the contents; None where the fast path does not apply."""
    if not isinstance(messages, list) or not messages:
        return None
    key = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return None
        key.append(tuple((name, repr(value)) for name, value in message.items() if name != "content"))
    return tuple(key)


def _analyse_shape(tokenizer, messages: list[dict]) -> _Shape | None:
    """The rule applied to `messages` with placeholder contents, in characters; None if it does not fit."""
    placeholders = [{**message, "content": _PLACEHOLDER.format(k)} for k, message in enumerate(messages)]
    try:
        whole = _render(tokenizer, placeholders, False, False)
        boundaries = []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                head = _render(tokenizer, placeholders[:i], True, False)
                through = _render(tokenizer, placeholders[: i + 1], False, False)
                boundaries.append((head, through))
    except Exception:
        # Whatever the template raises (an empty prefix, roles out of order), the rule raises it
        # again for this conversation, where the caller sees it.
        return None
    pieces = _PLACEHOLDER_SPLIT.split(whole)
    literals, slots = tuple(pieces[0::2]), tuple(int(k) for k in pieces[1::2])
    if any(k >= len(messages) for k in slots):
        return None
    literal_starts, position = [], 0
    for g, literal in enumerate(literals):
        literal_starts.append(position)
        position += len(literal) + (len(_PLACEHOLDER.format(slots[g])) if g < len(slots) else 0)

    def locate(prefix: str) -> tuple[int, int] | None:
        if not whole.startswith(prefix):
            return None
        at = len(prefix)
        for g, start in enumerate(literal_starts):
            if start <= at <= start + len(literals[g]):
                return g, at - start
        return None  # inside a placeholder: the template cut a content

    turns = []
    for head, through in boundaries:
        start, end = locate(head), locate(through)
        if start is None or end is None:
            return None
        turns.append((start, end))
    return _Shape(literals, slots, tuple(turns))


def _render_all(tokenizer, conversations: list[list[dict]]) -> list[str | None]:
    """Each conversation rendered to text; None for one the template refuses (the rule reports it)."""
    if not conversations:
        return []
    try:
        return list(_render(tokenizer, conversations, False, False))
    except Exception:
        rendered: list[str | None] = []
        for messages in conversations:
            try:
                rendered.append(_render(tokenizer, messages, False, False))
            except Exception:
                rendered.append(None)
        return rendered


def _turn_spans(shape: _Shape, messages: list[dict], text: str) -> list[tuple[int, int]] | None:
    """The assistant turns' character spans in `text`, if it is the shape with these contents.

    The contents as given, or all trimmed: templates of several families write `content | trim`.
    """
    for trimmed in (False, True):
        contents = [messages[k]["content"] for k in shape.slots]
        if trimmed:
            contents = [content.strip() for content in contents]
        literal_starts, pieces, position = [], [], 0
        for g, literal in enumerate(shape.literals):
            literal_starts.append(position)
            pieces.append(literal)
            position += len(literal)
            if g < len(contents):
                pieces.append(contents[g])
                position += len(contents[g])
        if "".join(pieces) == text:
            return [
                (literal_starts[g_start] + at_start, literal_starts[g_end] + at_end)
                for (g_start, at_start), (g_end, at_end) in shape.turns
            ]
    return None


def _split_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the added tokens the tokenizer cuts text at before encoding the pieces."""
    cuts_at_special = not getattr(tokenizer, "split_special_tokens", False)
    return frozenset(
        token_id
        for token_id, token in tokenizer.added_tokens_decoder.items()
        if cuts_at_special or not token.special
    )


def _prefix_piece(
    encoding, ids: list[int], text: str, at: int, split_ids: frozenset[int]
) -> tuple[int, str] | None:
    """(first token of the piece, the piece): the text from the last added token before char `at` to it.

    The tokenizer encodes the text between added tokens independently of what follows, so
    tokenizing text[:at] gives ids[:first] and then the piece's own tokens. None if `at` is lost.
    """
    token = len(ids) if at == len(text) else encoding.char_to_token(at)
    if token is None:
        return None
    first = token - 1
    while first >= 0 and ids[first] not in split_ids:
        first -= 1
    if first < 0:
        return 0, text[:at]
    return first, text[encoding.token_to_chars(first)[0] : at]


def _encode(tokenizer, texts: list[str]) -> list | None:
    """The tokenizer's encodings (ids, offsets) of `texts`, as apply_chat_template's call makes them.

    None for a tokenizer without offsets (not a fast one): the fast path needs them.
    """
    if not getattr(tokenizer, "is_fast", False):
        return None
    # The tokenizer's own call sets the backend as apply_chat_template's does (no truncation or padding,
    # special tokens read per split_special_tokens); the batch then goes to the backend directly,
    # which skips converting every encoding to lists the fast path does not use.
    tokenizer("", add_special_tokens=False)
    backend = tokenizer._tokenizer
    if backend.truncation is not None or backend.padding is not None:
        return tokenizer(texts, add_special_tokens=False).encodings
    return backend.encode_batch(texts, add_special_tokens=False)


def _fast_targets(
    tokenizer, shapes: list[_Shape], conversations: list[list[dict]], texts: list[str], train_on_prompt: bool
) -> list[tuple[list[int], list[bool]] | None]:
    """Ids and targets for conversations already rendered to `texts`; None where a check fails."""
    encodings = _encode(tokenizer, texts) if texts else []
    if encodings is None:
        return [None] * len(texts)
    all_ids = [encoding.ids for encoding in encodings]
    split_ids = _split_token_ids(tokenizer)
    planned, pieces = [], {}
    for shape, messages, text, ids, encoding in zip(
        shapes, conversations, texts, all_ids, encodings, strict=True
    ):
        spans = _turn_spans(shape, messages, text)
        turns = []
        for span in spans or ():
            start, end = (_prefix_piece(encoding, ids, text, at, split_ids) for at in span)
            if start is None or end is None:
                break
            turns.append((start, end))
            pieces[start[1]] = pieces[end[1]] = None
        planned.append(turns if spans is not None and len(turns) == len(spans) else None)
    unique = [piece for piece in pieces if piece]
    encoded_pieces = _encode(tokenizer, unique) if unique else []
    tokens = {piece: encoding.ids for piece, encoding in zip(unique, encoded_pieces, strict=True)}
    results: list[tuple[list[int], list[bool]] | None] = []
    for turns, ids in zip(planned, all_ids, strict=True):
        is_target = [train_on_prompt] * len(ids)
        for (start_first, start_piece), (end_first, end_piece) in turns or ():
            # As the rule: the turn starts after as many tokens as its header's prefix has, and ends
            # where the tokens through it end, which must be the conversation's own tokens.
            start = start_first + len(tokens.get(start_piece, []))
            through = tokens.get(end_piece, [])
            end = end_first + len(through)
            if ids[end_first:end] != through:
                turns = None
                break
            is_target[start:end] = [True] * (end - start)
        results.append(None if turns is None else (ids, is_target))
    return results


def encode_conversations(
    tokenizer, conversations: list[list[dict]], train_on_prompt: bool = False
) -> EncodedConversations:
    """`targets_by_prefixes` for every conversation, at the cost of one render and one tokenization each.

    A conversation the fast path cannot verify is encoded by the rule itself and counted in
    `fallbacks`; the rule's refusals (a template that does not render prefix by prefix, a
    conversation the template rejects) come from there, for the first such conversation in order.
    """
    _require_template(tokenizer)
    shapes: dict[tuple, _Shape | None] = {}
    shape_of: dict[int, _Shape] = {}
    for n, messages in enumerate(conversations):
        key = _shape_key(messages)
        if key is None:
            continue
        if key not in shapes:
            shapes[key] = _analyse_shape(tokenizer, messages)
        if shapes[key] is not None:
            shape_of[n] = shapes[key]
    rendered = _render_all(tokenizer, [conversations[n] for n in shape_of])
    kept = [(n, text) for n, text in zip(shape_of, rendered, strict=True) if text is not None]
    fast = _fast_targets(
        tokenizer,
        [shape_of[n] for n, _ in kept],
        [conversations[n] for n, _ in kept],
        [text for _, text in kept],
        train_on_prompt,
    )
    by_index = {n: result for (n, _), result in zip(kept, fast, strict=True) if result is not None}
    out = EncodedConversations()
    for n, messages in enumerate(conversations):
        if n in by_index:
            ids, is_target = by_index[n]
        else:
            ids, is_target = targets_by_prefixes(tokenizer, messages, train_on_prompt)
            out.fallbacks += 1
        out.ids.append(ids)
        out.targets.append(is_target)
    return out
