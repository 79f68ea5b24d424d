"""The judges' prompts as versioned data files: the rendered text is what the judges saw before the
prompts moved into files (their verdicts and cache keys depend on it), and a non-editable install ships them."""

from __future__ import annotations

from pathlib import Path

from harness.data import InstructionRecord
from harness.difficulty import DIFFICULTY_PROMPT_VERSION, difficulty_messages, difficulty_prompt
from harness.judge import PAIRWISE_PROMPTS, load_difficulty_prompt, load_pairwise_prompt
from harness.judge.prompts import PROMPT_DIR

ROOT = Path(__file__).resolve().parents[3]

# harness/difficulty.py's DIFFICULTY_PROMPT.format(...) for these records, copied from the code before the move
EXPECTED_WITH_INPUT = (
    "Rate how difficult the following instruction-following example is for an AI assistant.\n\n[Instruction]\nSort these numbers.\n\n"
    "[Input]\n3, 1, 2\n\n[Expected response]\n3 1 2\n\nJudge two things together: how hard the instruction itself is (the knowledge, "
    "reasoning and skill it asks for), and how hard it is to get from the instruction to the expected response. Use a scale from 1 to 5, "
    "where 1 is trivial and 5 is very hard; fractional scores such as 2.5 are allowed.\nReply with the score on the first line in the form "
    '"Score: <number>", then one sentence of justification.'
)
EXPECTED_WITHOUT_INPUT = (
    "Rate how difficult the following instruction-following example is for an AI assistant.\n\n[Instruction]\nName a fruit.\n\n"
    "[Input]\n(none)\n\n[Expected response]\nApple.\n\nJudge two things together: how hard the instruction itself is (the knowledge, "
    "reasoning and skill it asks for), and how hard it is to get from the instruction to the expected response. Use a scale from 1 to 5, "
    "where 1 is trivial and 5 is very hard; fractional scores such as 2.5 are allowed.\nReply with the score on the first line in the form "
    '"Score: <number>", then one sentence of justification.'
)


def test_rendered_difficulty_prompt_is_byte_identical_to_before():
    assert difficulty_prompt(InstructionRecord("Sort these numbers.", "3 1 2", input="  3, 1, 2 ")) == EXPECTED_WITH_INPUT
    assert difficulty_prompt(InstructionRecord("Name a fruit.", "Apple.")) == EXPECTED_WITHOUT_INPUT
    assert difficulty_messages(InstructionRecord("Name a fruit.", "Apple.")) == [
        {"role": "system", "content": "You are a careful annotator who rates instruction-tuning examples."},
        {"role": "user", "content": EXPECTED_WITHOUT_INPUT},
    ]


def test_difficulty_prompt_file_names_its_version_and_source():
    prompt = load_difficulty_prompt()
    assert prompt.version == DIFFICULTY_PROMPT_VERSION == "phased-difficulty-v1"  # the remote judge's cache key
    assert "ours" in prompt.source and "2406.04371" in prompt.source


def test_pairwise_prompts_load_from_the_package():
    for name in PAIRWISE_PROMPTS:
        prompt = load_pairwise_prompt(name)
        assert prompt.name == name and prompt.version == 1 and (PROMPT_DIR / f"pairwise_{name}.json").is_file()
    rendered = load_pairwise_prompt("cherry").render("Q?", "A1", "A2")
    assert rendered.startswith("[Question]\nQ?\n\n[The Start of Assistant 1's Answer]\nA1\n\n")
    assert rendered.endswith("does not affect your judgment.\n\n")


def test_prompt_files_are_package_data():
    assert '"harness.judge" = ["prompts/*.json"]' in (ROOT / "pyproject.toml").read_text()  # [tool.setuptools.package-data]
    shipped = {path.name for path in (ROOT / "harness" / "judge").glob("prompts/*.json")}
    assert shipped == {"pairwise_cherry.json", "pairwise_phasedsft.json", "phased_difficulty.json"}
