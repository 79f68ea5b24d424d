"""The Alpaca template is Stanford Alpaca's, string for string, and is tokenized as its train.py does."""

from harness.data import InstructionRecord
from harness.generation import render_prompts
from harness.templates import render_prompt, response_tag, tokenize_example, tokenize_for_training

# Verbatim from tatsu-lab/stanford_alpaca train.py (commit 761dc5b, PROMPT_DICT); tianyi-lab/Cherry_LLM's
# cherry_seletion/data_analysis.py and data_by_IFD.py (commit 01fac8d) carry the same PROMPT_DICT.
STANFORD_PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}


def test_alpaca_prompts_are_stanford_alpacas_strings(tiny):
    _, tokenizer = tiny
    plain = InstructionRecord("Name a colour.", "Blue.")
    with_input = InstructionRecord("Translate to French.", "Bonjour.", input="Hello.")
    assert render_prompt(plain, "alpaca", tokenizer) == STANFORD_PROMPT_DICT["prompt_no_input"].format_map(
        {"instruction": "Name a colour."})
    assert render_prompt(with_input, "alpaca", tokenizer) == STANFORD_PROMPT_DICT["prompt_input"].format_map(
        {"instruction": "Translate to French.", "input": "Hello."})
    assert render_prompt(plain, "alpaca", tokenizer).endswith("### Response:")  # no newline: the response follows
    assert render_prompts(["Name a colour."], tokenizer, "alpaca") == [render_prompt(plain, "alpaca", tokenizer)]
    assert response_tag("alpaca", tokenizer) == "### Response:"
    assert render_prompt(plain, "chat", tokenizer).endswith(response_tag("chat", tokenizer))


def test_examples_are_tokenized_whole_with_the_prompt_length_as_boundary(tiny, sample_records):
    """Stanford's preprocess: tokenize(source + target), labels -100 on the first len(tokenize(source))."""
    _, tokenizer = tiny
    for record in [*sample_records[:20], InstructionRecord("Quote Hamlet.", '"To be, or not to be."')]:
        prompt = render_prompt(record, "alpaca", tokenizer)
        target = record.output + tokenizer.eos_token
        example = tokenize_example(prompt, target, tokenizer, "alpaca")
        whole = tokenizer(prompt + target).input_ids
        boundary = len(tokenizer(prompt).input_ids)
        assert example.input_ids == whole
        assert example.labels == [-100] * boundary + whole[boundary:]
        assert example.input_ids[-1] == tokenizer.eos_token_id
    examples, stats = tokenize_for_training(sample_records[:20], tokenizer, "alpaca", 1024)
    assert stats.examples == 20 and examples[0].input_ids == tokenize_example(
        render_prompt(sample_records[0], "alpaca", tokenizer), sample_records[0].output + tokenizer.eos_token,
        tokenizer, "alpaca").input_ids


def test_prompts_alone_get_the_templates_bos_and_are_labelled_after_their_first_token(tiny, sample_records):
    """tokenize_prompts (IFD's experience selection, UNIFIT's concept tree): BOS only for plain-text
    templates, every token but the first a label, cut at max_length when given."""
    from harness.templates import adds_bos, tokenize_prompts

    _, tokenizer = tiny
    records = sample_records[:5]
    for template in ("alpaca", "chat"):
        examples = tokenize_prompts(records, tokenizer, template)
        for record, example in zip(records, examples, strict=True):
            expected = tokenizer(render_prompt(record, template, tokenizer), add_special_tokens=adds_bos(template)).input_ids
            assert example.input_ids == expected and example.labels == [-100, *expected[1:]]
    cut = tokenize_prompts(records, tokenizer, "alpaca", max_length=8)
    assert all(len(example.input_ids) == len(example.labels) == 8 for example in cut)
