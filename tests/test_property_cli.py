"""Property-based bad input: generated malformed data files and configs given to `harness run` must each
end with exit code 2, exactly one line on stderr ("error: ..."), no traceback, and nothing left in the
output directory. Runs in-process (harness.cli.main) for speed, plus real subprocesses for a few cases.
Derandomized, so CI sees the same cases every time; the number of cases tried is printed.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.cli import main
from harness.spec import DataSpec, EvalSpec, RunSpec, TrainingSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_PER_KIND = 7  # every kind of defect gets the same share: ~140 cases in all, ~20 s


def explore(strategy: st.SearchStrategy[Case], tried: Counter[str]) -> None:
    """Run the one-line-error check on EXAMPLES_PER_KIND generated cases of the strategy."""

    @settings(
        max_examples=EXAMPLES_PER_KIND, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )  # fmt: skip
    @given(strategy)
    def check(case: Case) -> None:
        tried[case.kind] += 1
        run_in_process(case)

    check()


@dataclass
class Case:
    kind: str
    args: list[str]
    files: dict[str, bytes] = field(default_factory=dict)


def run_in_process(case: Case) -> None:
    """Write the case's files into a fresh folder, run the CLI, and check the one-line-error contract."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for name, content in case.files.items():
            (root / name).write_bytes(content)
        output = root / "runs"
        args = [arg.replace("{dir}", folder) for arg in case.args] + ["--output", str(output)]
        out, err = io.StringIO(), io.StringIO()
        code: object = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(args)
            except SystemExit as exited:
                code = exited.code
        stderr = err.getvalue()
        assert code == 2, f"{case.kind}: exit {code!r}\n{stderr[-2000:]}"
        assert stderr.startswith("error: ") and stderr.endswith("\n") and stderr.count("\n") == 1, f"{case.kind}: {stderr!r}"
        assert "Traceback" not in stderr
        if output.is_file():  # --output named an existing file: left as it was
            assert output.read_bytes() == case.files["runs"]
        else:
            assert not output.exists() or not any(output.iterdir()), f"{case.kind}: left {list(output.rglob('*'))}"


# ----------------------------------------------------------------------------- data files

words = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=24)
answers = words.filter(lambda text: text.strip() != "")
good_rows = st.lists(
    st.fixed_dictionaries({"instruction": words, "input": st.sampled_from(["", "context"]), "output": answers}),
    min_size=1, max_size=6,
)  # fmt: skip
non_strings = st.one_of(
    st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), max_size=2),
)  # fmt: skip
not_objects = st.one_of(st.integers(), st.none(), words, st.lists(st.integers(), max_size=3))
BAD_UTF8 = [b"\xff", b"\xfe\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x80abc", b"\xf8\x88\x80\x80\x80"]


def encode(rows: list[object], container: str) -> bytes:
    if container == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    if container == "json-object":
        return json.dumps({"data": rows}, ensure_ascii=False).encode()
    return json.dumps(rows, ensure_ascii=False).encode()


DATA_DEFECTS = ["truncated", "wrong-type", "empty-outputs", "non-utf8", "not-an-object", "unknown-fields", "too-deep",
                "empty-file", "bad-gzip", "sharegpt-turns", "phased-score", "not-a-file"]


@st.composite
def data_cases(draw: st.DrawFn, kind: str) -> Case:
    rows: list[object] = draw(good_rows)
    container = draw(st.sampled_from(["jsonl", "json", "json-object"]))
    if draw(st.booleans()):  # a huge (but valid) record the loader must get through before the defect
        rows.insert(0, {"instruction": "long", "input": "", "output": "x" * draw(st.integers(200_000, 2_000_000))})
    at = draw(st.integers(0, len(rows)))
    name = "data." + ("jsonl" if container == "jsonl" else "json")
    if kind == "truncated":
        content = encode(rows, container)
        if container == "jsonl":
            lines = content.split(b"\n")
            index = draw(st.integers(0, len(lines) - 2))
            lines[index] = lines[index][: draw(st.integers(1, len(lines[index]) - 1))]
            content = b"\n".join(lines)
        else:
            content = content[: draw(st.integers(1, len(content) - 1))]
    elif kind == "wrong-type":
        key = draw(st.sampled_from(["instruction", "input", "output"]))
        value = draw(non_strings if key == "input" else st.one_of(non_strings, st.none()))
        rows.insert(at, {"instruction": "a", "input": "", "output": "b", key: value})
        content = encode(rows, container)
    elif kind == "empty-outputs":
        rows = [{**row, "output": draw(st.sampled_from(["", " ", "\n\t"]))} for row in rows if isinstance(row, dict)]
        content = encode(rows, container)
    elif kind == "non-utf8":
        content = encode(rows, container)
        cut = draw(st.integers(0, len(content)))
        content = content[:cut] + draw(st.sampled_from(BAD_UTF8)) + content[cut:]
    elif kind == "not-an-object":
        rows.insert(at, draw(not_objects))
        content = encode(rows, container)
    elif kind == "unknown-fields":
        keys = draw(st.lists(st.sampled_from(["prompt", "response", "text", "question", "answer"]), min_size=1, unique=True))
        rows.insert(at, {key: "value" for key in keys})
        content = encode(rows, container)
    elif kind == "too-deep":
        depth = draw(st.integers(20_000, 200_000))
        nested = "[" * depth + "]" * depth
        content = (nested if container != "jsonl" or draw(st.booleans()) else '{"instruction": ' + nested + "}").encode()
    elif kind == "empty-file":
        content = draw(st.sampled_from([b"", b"\n", b"  \n\n \t\n"])) if container == "jsonl" else b"[]"
    elif kind == "bad-gzip":
        name += ".gz"
        content = encode(rows, container)  # not compressed
    elif kind == "sharegpt-turns":
        turns = draw(st.sampled_from([
            "not a list", [], [{"from": "human", "value": "hi"}], [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}],
            [{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}], [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}],  # noqa: E501
        ]))  # fmt: skip
        rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}] * at + [{"conversations": turns}]
        content = encode(rows, container)
    elif kind == "not-a-file":  # the data "file" is a directory, or a model directory without a config
        return Case(kind, draw(st.sampled_from([["run", "--data", "{dir}"], ["run", "--model", "{dir}"]])))
    else:  # phased-score
        score = draw(st.sampled_from(["abc", "", "four", None, [], {}, "1,5"]))
        rows = [{"id": "1", "score": "2.5", "data": ["q", "a"]}] * at + [{"id": "x", "score": score, "data": ["q", "a"]}]
        content = encode(rows, container)
    if name.endswith(".gz") and kind != "bad-gzip":
        content = gzip.compress(content)
    return Case(kind, ["run", "--data", "{dir}/" + name], {name: content})


def test_malformed_data_files_are_one_line_errors(capsys):
    tried: Counter[str] = Counter()
    for kind in DATA_DEFECTS:
        explore(data_cases(kind), tried)
    with capsys.disabled():  # shown even when pytest captures output
        print(f"\nmalformed data files tried: {sum(tried.values())} ({dict(tried)})")
    assert set(tried) == set(DATA_DEFECTS) and sum(tried.values()) >= 5 * len(DATA_DEFECTS)


# ----------------------------------------------------------------------------- configs

SECTIONS = {
    "": list(RunSpec.model_fields), "training": list(TrainingSpec.model_fields), "data": list(DataSpec.model_fields),
    "eval": list(EvalSpec.model_fields),
}  # fmt: skip
NUMBERS = ["training.learning_rate", "training.epochs", "training.max_steps", "training.batch_size",
           "training.gradient_accumulation_steps", "training.max_length", "training.warmup_ratio",
           "training.weight_decay", "training.save_steps", "data.limit", "eval.limit", "eval.batch_size", "seed"]
non_finite = st.sampled_from([math.inf, -math.inf, math.nan])
OUT_OF_RANGE = {
    "training.learning_rate": st.one_of(st.floats(max_value=0, allow_nan=False), non_finite),
    "training.epochs": st.one_of(st.floats(max_value=0, allow_nan=False), non_finite),
    "training.batch_size": st.integers(max_value=0),
    "training.gradient_accumulation_steps": st.integers(max_value=0),
    "training.max_length": st.integers(max_value=8),
    "training.max_steps": st.integers(max_value=-2),
    "training.warmup_ratio": st.one_of(st.floats(min_value=1, allow_infinity=False), st.floats(max_value=-1e-9, allow_infinity=False)),
    "training.weight_decay": st.floats(max_value=-1e-9, allow_infinity=False),
    "training.adam_beta1": st.one_of(st.floats(min_value=1, allow_infinity=False), st.floats(max_value=0, allow_infinity=False)),
    "training.save_steps": st.integers(max_value=-1),
    "training.lora.r": st.integers(max_value=0),
    "data.limit": st.integers(max_value=0),
    "eval.limit": st.integers(max_value=0),
    "eval.batch_size": st.integers(max_value=0),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32, max_value=2**70)),
}  # fmt: skip
PARAMS_OUT_OF_RANGE = {
    "ifd": {"rate": st.one_of(st.floats(max_value=0, allow_nan=False), st.floats(min_value=1.0001)), "experience_clusters": st.integers(max_value=0)},  # noqa: E501
    "phased": {"thresholds": st.sampled_from([[3.5, 1.5], [0, 2], [1, 6], [2, 2], [1], "low"]),
               "stage_order": st.sampled_from([[], [4], [1, 1], [0, 1], "shuffled"]), "scoring_max_length": st.integers(max_value=8)},
    "sftmix": {"mu": st.one_of(st.floats(max_value=-1e-9), non_finite), "alpha": st.floats(max_value=0),
               "lambda_per": words.filter(lambda w: w not in ("pair", "batch"))},
    "unifit": {"rate": st.sampled_from([0, -0.1, 1.5]), "topics": st.integers(max_value=0)},
}  # fmt: skip
BROKEN_YAML = ["training: [1, 2", "a: b: c", "key: 'unclosed", "{", "]", "training:\n  epochs: 1\n epochs: 2",
               "- a\nb: c", "x: !!python/object:os.system {}", "training: {epochs: 1", "@bad"]  # fmt: skip
identifiers = st.from_regex(r"[a-z][a-z_0-9]{0,14}", fullmatch=True)


def nest(dotted: str, value: object) -> dict[str, object]:
    nested: object = value
    for part in reversed(dotted.split(".")):
        nested = {part: nested}
    return nested  # type: ignore[return-value]


def unusable_names(existing: set[str]) -> st.SearchStrategy[str]:
    """Names that are no shipped entry and no path here: unknown, with a NUL byte, or over-long."""
    plain = words.filter(lambda n: "/" not in n and n.strip() not in existing and not os.path.lexists(n.strip() or "."))
    return st.one_of(plain, words.map(lambda n: n + "\x00x"), st.integers(256, 2000).map(lambda k: "n" * k), st.just("  "))


CONFIG_DEFECTS = ["unknown-key", "wrong-type", "out-of-range", "params", "broken-yaml", "not-a-mapping", "name"]


@st.composite
def config_cases(draw: st.DrawFn, kind: str) -> Case:
    from harness.evaluation import list_suites
    from harness.models import MODEL_SET
    from recipes import RECIPE_MODULES

    if kind == "unknown-key":
        section = draw(st.sampled_from(sorted(SECTIONS)))
        key = draw(identifiers.filter(lambda k: k not in SECTIONS[section]))
        config: object = nest(f"{section}.{key}" if section else key, draw(st.one_of(st.integers(), words)))
    elif kind == "wrong-type":
        key = draw(st.sampled_from([*NUMBERS, "training.packing", "data.dedupe", "model", "eval.suite", "training.lr_scheduler"]))
        if key in ("training.packing", "data.dedupe"):
            value = draw(st.one_of(st.lists(st.integers(), min_size=1, max_size=2), st.sampled_from(["maybe", "2", "yes please"])))
        elif key == "training.lr_scheduler":
            value = draw(words.filter(lambda w: w not in ("cosine", "linear", "constant", "constant_with_warmup")))
        else:
            value = draw(st.one_of(st.lists(st.integers(), min_size=1, max_size=2), st.dictionaries(identifiers, st.integers(), min_size=1, max_size=2),  # noqa: E501
                                   *(() if key in ("model", "eval.suite") else (st.sampled_from(["abc", "1e", "two", "0x"]),))))
        config = nest(key, value)
    elif kind == "out-of-range":
        key = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
        config = nest(key, draw(OUT_OF_RANGE[key]))
    elif kind == "params":
        recipe = draw(st.sampled_from(sorted(PARAMS_OUT_OF_RANGE)))
        key = draw(st.sampled_from(sorted(PARAMS_OUT_OF_RANGE[recipe])))
        config = {"recipe": recipe, "params": {key: draw(PARAMS_OUT_OF_RANGE[recipe][key])}}
    elif kind == "broken-yaml":
        return Case(kind, ["run", "--config", "{dir}/run.yaml"], {"run.yaml": draw(st.sampled_from(BROKEN_YAML)).encode()})
    elif kind == "not-a-mapping":
        config = draw(st.one_of(st.lists(st.integers(), min_size=1), st.integers(), words.filter(lambda w: ":" not in w and w.strip() not in ("", "~", "null"))))  # noqa: E501
    else:
        key, existing = draw(st.sampled_from([
            ("model", set(MODEL_SET)), ("eval.suite", set(list_suites())), ("recipe", set(RECIPE_MODULES) | {"all"}),
            ("data.name", {"alpaca-sample"}),
        ]))  # fmt: skip
        name = draw(unusable_names(existing))
        if draw(st.booleans()):  # as a flag instead of through the config file
            flag = {"model": "--model", "eval.suite": "--suite", "recipe": "--recipe", "data.name": "--data"}[key]
            return Case(kind, ["run", flag, name])
        config = nest(key, name)
    if draw(st.booleans()) and kind not in ("not-a-mapping",):  # the same mistake through --set
        flat = flatten(config)  # type: ignore[arg-type]
        if all(isinstance(value, (int, float, str)) and "\n" not in str(value) for _, value in flat):
            return Case(kind + " (--set)", ["run", *[arg for key, value in flat for arg in ("--set", f"{key}={dump(value)}")]])
    return Case(kind, ["run", "--config", "{dir}/run.yaml"], {"run.yaml": yaml.safe_dump(config, allow_unicode=True).encode()})


def flatten(config: dict[str, object], prefix: str = "") -> list[tuple[str, object]]:
    items: list[tuple[str, object]] = []
    for key, value in config.items():
        if isinstance(value, dict) and value:
            items += flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def dump(value: object) -> str:
    """The --set text for a value: YAML, as the option parses it."""
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).removesuffix("\n...\n").strip()


def test_malformed_configs_are_one_line_errors(capsys):
    tried: Counter[str] = Counter()
    for kind in CONFIG_DEFECTS:
        explore(config_cases(kind), tried)
    with capsys.disabled():
        print(f"\nmalformed configs tried: {sum(tried.values())} ({dict(tried)})")
    assert {kind.removesuffix(" (--set)") for kind in tried} == set(CONFIG_DEFECTS) and sum(tried.values()) >= 5 * len(CONFIG_DEFECTS)


# Inputs that crashed the CLI with a traceback (or ran on) before this module existed: kept as fixed cases.
KNOWN = [
    Case("data nested too deeply", ["run", "--data", "{dir}/d.json"], {"d.json": b"[" * 50_000 + b"]" * 50_000}),
    Case("data file is a directory", ["run", "--data", "{dir}"]),
    Case("model directory without config.json", ["run", "--model", "{dir}"]),
    Case("NUL byte in a name", ["run", "--suite", "smoke\x00"]),
    Case("NUL byte in a config value", ["run", "--config", "{dir}/c.yaml"], {"c.yaml": b'data: {name: "a\\0b"}'}),
    Case("over-long name", ["run", "--data", "d" * 300]),
    Case("unknown user's home", ["run", "--model", "~no_such_user_h4x"]),
    Case("control characters in a name", ["run", "--recipe", "one-off\x1b[2J"]),
    Case("line break in a name", ["run", "--suite", "smoke\nsmall"]),
    Case("infinite epochs", ["run", "--set", "training.epochs=.inf"]),
    Case("NaN learning rate", ["run", "--config", "{dir}/c.yaml"], {"c.yaml": b"training: {learning_rate: .nan}"}),
    Case("64-bit seed", ["run", "--seed", str(2**40)]),
    Case("infinite recipe parameter", ["run", "--recipe", "sftmix", "--set", "params.mu=.inf"]),
    Case("config nested too deeply", ["run", "--config", "{dir}/c.yaml"], {"c.yaml": b"[" * 5_000 + b"]" * 5_000}),
    Case("--set value nested too deeply", ["run", "--set", "params.x=" + "[" * 5_000]),
    Case("zero data limit", ["run", "--set", "data.limit=0"]),
    Case("output is a file", ["run"], {"runs": b"not a folder"}),
]


@pytest.mark.parametrize("case", KNOWN, ids=[case.kind for case in KNOWN])
def test_inputs_that_used_to_crash_are_one_line_errors(case: Case):
    run_in_process(case)


@pytest.mark.e2e
def test_real_processes_report_bad_input_on_one_line(tmp_path: Path):
    """The same contract through the real console entry point (a process of its own)."""
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"instruction": "caf\xe9", "output": "ok"}\n')
    config = tmp_path / "run.yaml"
    config.write_text("training:\n  learning_rate: -0.001\n  epochs: 1\n")
    cases = [  # (a data error is found after the heavy imports: ~10 s a process on 2 busy cores)
        (["--data", str(data)], f"data file {data}: not UTF-8 text (bad byte at offset 20)"),
        (["--config", str(config)], "config key 'training.learning_rate' = -0.001: input should be greater than 0"),
        (["--set", "training.epochs=.inf"], "config key 'training.epochs' = Infinity: input should be a finite number"),
    ]
    for args, message in cases:
        output = tmp_path / "runs"
        result = subprocess.run(
            [sys.executable, "-m", "harness.cli", "run", *args, "--output", str(output)],
            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )  # fmt: skip
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert not output.exists()
