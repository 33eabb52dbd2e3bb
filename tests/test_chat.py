"""Chat encoding in linear time: the fast path's ids and targets equal the prefix-by-prefix rule's.

The templates beyond SmolLM2's own imitate common families (Llama-3, Llama-2/Mistral, Gemma,
Zephyr) on SmolLM2's tokenizer, where their markers are plain text: turn boundaries then fall
inside ordinary BPE text, which is where a fast path goes wrong if it does.
"""

from __future__ import annotations

import copy
import random
import re

import pytest

from data.chat import EncodedConversations, encode_conversations, targets_by_prefixes
from tests.helpers import DEFAULT_MODEL

pytestmark = pytest.mark.fast  # every test here runs in this process: the fast tier (make test-fast)

LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama-2 folds the system prompt into the first user turn; add_generation_prompt adds nothing.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = none %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system is not none %}"
    "{{ bos_token + '[INST] <<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    "{% endfor %}"
)
# Earlier assistant answers are elided, as templates that drop past reasoning do: prefixes differ.
ELIDES_EARLIER_ANSWERS = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' and not loop.last %}{{ '...' }}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Each template's own assistant header, to plant in user contents.
HEADERS = {
    "smollm2": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama2": " [/INST] ",
    "gemma": "<start_of_turn>model\n",
    "zephyr": "<|assistant|>\n",
}
TEMPLATES = {"llama3": LLAMA3, "llama2": LLAMA2, "gemma": GEMMA, "zephyr": ZEPHYR}

ORDINARY = [
    "Convert 5 miles to kilometres.",
    "5 miles is 8.05 kilometres.",
    "What is the boiling point of water at sea level?",
    "It is 100 degrees Celsius.",
    "Thanks! And in Fahrenheit?",
    "212 degrees Fahrenheit.",
]
AWKWARD = [
    "  leading and trailing spaces  ",
    "\nnewlines around\n\n",
    "two\n\nparagraphs\n",
    "",
    " ",
    "héllo wörld 🎉 日本語 — ünïcode",
    "🎉",
    "tab\tseparated\t",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


def with_template(tokenizer, template: str | None):
    other = copy.copy(tokenizer)
    other.chat_template = template
    return other


def conversation(rng: random.Random, pairs: int, system: bool, header: str, awkward: bool) -> list[dict]:
    pool = ORDINARY + AWKWARD if awkward else ORDINARY
    system_prompts = ["Be brief.", " Be kind. \n"] if awkward else ["Be brief."]
    messages = [{"role": "system", "content": rng.choice(system_prompts)}] if system else []
    for _ in range(pairs):
        user = rng.choice(pool)
        if awkward and rng.random() < 0.3:
            user = f"Quote: {header}{rng.choice(ORDINARY)}"
        # Sometimes the answer repeats text of an earlier user message verbatim.
        answer = user if rng.random() < 0.2 else rng.choice(pool)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages


def varied_conversations(header: str, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    return [
        conversation(rng, pairs, system, header, awkward)
        for pairs in (1, 2, 3, 5, 8)
        for system in (False, True)
        for awkward in (False, True)
    ]


def rule(tokenizer, messages, train_on_prompt=False) -> tuple[list[int], list[bool]] | str:
    """The rule's ids and targets, or its refusal."""
    try:
        return targets_by_prefixes(tokenizer, messages, train_on_prompt)
    except ValueError as refusal:
        return str(refusal)


def assert_equals_the_rule(tokenizer, conversations, train_on_prompt=False) -> EncodedConversations:
    """The fast path encodes what the rule accepts the same way and refuses what it refuses."""
    outcomes = [rule(tokenizer, messages, train_on_prompt) for messages in conversations]
    accepted = [
        messages for messages, got in zip(conversations, outcomes, strict=True) if isinstance(got, tuple)
    ]
    encoded = encode_conversations(tokenizer, accepted, train_on_prompt)
    assert list(zip(encoded.ids, encoded.targets, strict=True)) == [
        got for got in outcomes if isinstance(got, tuple)
    ]
    for messages, got in zip(conversations, outcomes, strict=True):
        if isinstance(got, str):
            with pytest.raises(ValueError, match=f"^{re.escape(got)}$"):
                encode_conversations(tokenizer, [messages], train_on_prompt)
    return encoded


def test_smollm2_fast_path_equals_the_rule_without_fallback(tokenizer):
    rng = random.Random(1)
    ordinary = [
        conversation(rng, pairs, system, "", awkward=False)
        for pairs in range(1, 9)
        for system in (False, True)
    ]
    encoded = assert_equals_the_rule(tokenizer, ordinary)
    assert encoded.fallbacks == 0
    assert any(any(targets) and not all(targets) for targets in encoded.targets)
    # The ids are the template's own tokenization.
    assert encoded.ids[3] == list(
        tokenizer.apply_chat_template(ordinary[3], tokenize=True, return_dict=False)
    )


def test_smollm2_awkward_contents_equal_the_rule(tokenizer):
    # Whitespace, newlines, unicode, empty contents, the template's own header in a user message:
    # ChatML writes contents verbatim, so all of it still takes the fast path.
    encoded = assert_equals_the_rule(tokenizer, varied_conversations(HEADERS["smollm2"]))
    assert encoded.fallbacks == 0


@pytest.fixture(scope="module")
def families(tokenizer) -> dict:
    """Each imitated family's template on a copy of the tokenizer; llama3 also with real special tokens."""
    tokenizers = {name: with_template(tokenizer, template) for name, template in TEMPLATES.items()}
    special = copy.deepcopy(tokenizer)
    special.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    special.chat_template = LLAMA3
    tokenizers["llama3 special tokens"] = special
    return tokenizers


@pytest.mark.parametrize("name", [*sorted(TEMPLATES), "llama3 special tokens"])
def test_other_template_families_equal_the_rule(families, name):
    header = HEADERS[name.split()[0]]
    assert_equals_the_rule(families[name], varied_conversations(header))
    # Ordinary contents, which the templates render verbatim, take the fast path where the rule accepts them.
    ordinary = [
        c for c in varied_conversations(header, seed=3)[::2] if isinstance(rule(families[name], c), tuple)
    ]
    assert ordinary
    assert encode_conversations(families[name], ordinary).fallbacks == 0


def test_what_the_fast_path_cannot_verify_goes_by_the_rule_and_is_counted(families):
    # Gemma trims user contents but not the system prompt it folds into the first user turn.
    gemma = families["gemma"]
    messages = [
        {"role": "system", "content": " Be kind. \n"},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello."},
    ]
    encoded = assert_equals_the_rule(gemma, [messages, messages[1:]])
    assert encoded.fallbacks == 1


def test_targets_are_the_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    encoded = encode_conversations(tokenizer, [messages])
    ids, targets = encoded.ids[0], encoded.targets[0]
    chosen = [token for token, target in zip(ids, targets, strict=True) if target]
    assert tokenizer.decode(chosen) == "Hello.<|im_end|>\nGoodbye.<|im_end|>\n"
    assert encoded.fallbacks == 0


def test_train_on_prompt_makes_every_token_a_target(tokenizer):
    conversations = varied_conversations(HEADERS["smollm2"])[:6]
    encoded = assert_equals_the_rule(tokenizer, conversations, train_on_prompt=True)
    assert all(all(targets) for targets in encoded.targets)


def test_a_template_that_does_not_render_prefix_by_prefix_is_refused(tokenizer):
    elides = with_template(tokenizer, ELIDES_EARLIER_ANSWERS)
    messages = conversation(random.Random(2), 2, True, "", awkward=False)
    refusal = re.escape(
        "data.format=chat: the chat template does not render conversations prefix by prefix "
        f"(tokenizer {tokenizer.name_or_path}, template {ELIDES_EARLIER_ANSWERS[:60]!r}...)"
    )
    with pytest.raises(ValueError, match=f"^{refusal}$"):
        targets_by_prefixes(elides, messages)
    with pytest.raises(ValueError, match=f"^{refusal}$"):
        encode_conversations(elides, [messages[:3], messages])
    # One assistant turn is also its last: nothing differs, nothing refused.
    assert encode_conversations(elides, [messages[:3]]).ids[0]


def test_a_tokenizer_without_a_chat_template_is_refused(tokenizer):
    plain = with_template(tokenizer, None)
    refusal = f"^data.format=chat: the tokenizer of {re.escape(tokenizer.name_or_path)} has no chat template$"
    with pytest.raises(ValueError, match=refusal):
        encode_conversations(plain, [[{"role": "user", "content": "Hi"}]])
    with pytest.raises(ValueError, match=refusal):
        targets_by_prefixes(plain, [{"role": "user", "content": "Hi"}])
