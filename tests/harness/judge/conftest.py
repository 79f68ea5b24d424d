"""The tiny model as a local judge, shared by the judge stack's tests."""

from __future__ import annotations

import pytest

from harness.judge import JudgeOptions, LocalJudge


@pytest.fixture(scope="module")
def local_judge(tiny):
    model, tokenizer = tiny
    return LocalJudge("local:tiny", model, tokenizer, JudgeOptions(batch_size=2, max_answer_tokens=32))
