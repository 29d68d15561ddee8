"""server/onpolicy.py's pure parts: where the prefix comes from, where the splice goes, when it
refuses, and the contiguity figure. The HTTP chain (render, generate, derender) runs against real
vLLM in tests/integration/test_onpolicy.py."""

import pytest

from server import onpolicy

EOS = 2


def test_prefix_from_the_extension_field_first_then_the_last_message_with_ids():
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "prompt_token_ids": [1, 5], "generation_token_ids": [7, EOS]},
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "b", "prompt_token_ids": [1, 5, 7, EOS, 9], "generation_token_ids": [8]},
        {"role": "user", "content": "next"},
    ]
    assert onpolicy.required_prefix({"messages": messages}) == [1, 5, 7, EOS, 9, 8]
    assert onpolicy.required_prefix({"messages": messages, onpolicy.PREFIX_FIELD: [4, 4]}) == [4, 4]
    assert onpolicy.required_prefix({"messages": messages[:1]}) is None


def test_ids_that_cannot_be_a_prompts_are_the_clients_error():
    for request, param in (({onpolicy.PREFIX_FIELD: 5}, onpolicy.PREFIX_FIELD),
                           ({onpolicy.PREFIX_FIELD: [1, -1]}, onpolicy.PREFIX_FIELD),
                           ({onpolicy.PREFIX_FIELD: [1, True]}, onpolicy.PREFIX_FIELD),
                           ({"messages": [{"role": "assistant", "prompt_token_ids": [1], "generation_token_ids": "2"}]},
                            "messages[0].generation_token_ids")):
        with pytest.raises(onpolicy.BadIds) as refused:
            onpolicy.required_prefix(request)
        assert refused.value.param == param
    assert onpolicy.required_prefix({onpolicy.PREFIX_FIELD: [0, 99]}, vocab_size=100) == [0, 99]
    with pytest.raises(onpolicy.BadIds, match="token id 100, beyond the model's vocabulary"):
        onpolicy.required_prefix({onpolicy.PREFIX_FIELD: [0, 100]}, vocab_size=100)


def test_plain_request_drops_the_id_fields_and_keeps_the_rest():
    request = {
        "model": "m", onpolicy.PREFIX_FIELD: [1], "tools": [{"type": "function"}],
        "messages": [{"role": "assistant", "content": "a", "tool_calls": [], "prompt_token_ids": [1],
                      "generation_token_ids": [2], "generation_log_probs": [-0.1]}],
    }
    plain = onpolicy.plain_request(request)
    assert plain == {"model": "m", "tools": [{"type": "function"}],
                     "messages": [{"role": "assistant", "content": "a", "tool_calls": []}]}
    assert request["messages"][0]["prompt_token_ids"] == [1]  # the caller's request is not changed


def test_splice_keeps_the_generated_ids_and_resumes_after_the_turn_end():
    # NeMo RL's own example (openai_server_utils.replace_prefix_tokens): the template re-tokenizes
    # the answer " 4" as 1001 where the model generated 220, 17.
    model_prefix = [11, 12, 13, 40, 41, 220, 17, EOS]
    template_prefix = [11, 12, 13, 40, 41, 1001, EOS]
    template = [11, 12, 13, 40, 41, 1001, EOS, 21, 22, 40, 41]
    spliced = onpolicy.splice(EOS, model_prefix, template_prefix, template)
    assert spliced == [11, 12, 13, 40, 41, 220, 17, EOS, 21, 22, 40, 41]
    # A generation cut by max_tokens has no EOS of its own: the template's closes the turn.
    assert onpolicy.splice(EOS, model_prefix[:-1], template_prefix, template) == spliced


def test_splice_counts_turn_ends_so_a_template_dropping_earlier_reasoning_still_lines_up():
    # Two earlier turns; the template renders the first answer shorter (reasoning dropped).
    model_prefix = [1, 50, 51, 52, EOS, 3, 60, EOS]
    template_prefix = [1, 52, EOS, 3, 61, EOS]
    template = [1, 52, EOS, 3, 61, EOS, 9, 9]
    assert onpolicy.splice(EOS, model_prefix, template_prefix, template) == [1, 50, 51, 52, EOS, 3, 60, EOS, 9, 9]


@pytest.mark.parametrize("model_prefix, template_prefix, template, says", [
    ([1, 7, EOS], [1, 3, EOS, 4, 7, EOS], [1, 3, EOS, 4, 7, EOS, 9], "hold 1 turn ends, the messages up to"),
    ([1, 7, EOS], [1, 7], [1, 7, 9], "no end-of-sequence token"),
    ([1, 7, EOS, 8, EOS], [1, 7, EOS, 8, EOS], [1, 7, EOS, 9], "fewer than the 2"),
])
def test_splice_refuses_ids_of_another_history_and_says_why(model_prefix, template_prefix, template, says):
    with pytest.raises(onpolicy.Mismatch, match=says):
        onpolicy.splice(EOS, model_prefix, template_prefix, template)


def test_has_prefix_looks_at_the_raw_body():
    assert onpolicy.has_prefix(b'{"messages": [{"generation_token_ids": [1]}]}')
    assert onpolicy.has_prefix(b'{"required_prefix_token_ids": [1]}')
    assert not onpolicy.has_prefix(b'{"messages": [{"role": "user", "content": "generation token ids"}]}')


def test_prefix_contiguity_counts_consecutive_calls():
    on = [([1, 2], [3, EOS]), ([1, 2, 3, EOS, 5], [6]), ([1, 2, 3, EOS, 5, 6, EOS, 7], [8])]
    off = [([1, 2], [3, EOS]), ([1, 2, 4, EOS, 5], [6])]  # re-tokenized: 3 came back as 4
    single = [([1], [2])]
    no_ids = [([1], None), ([1, 2], [3])]
    assert onpolicy.prefix_contiguity([on, off, single, no_ids]) == (2, 3)
    assert onpolicy.prefix_contiguity([]) == (0, 0)
