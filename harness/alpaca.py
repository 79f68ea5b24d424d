"""AlpacaEval: greedy generation on the 805 instructions (or a fixed, recorded subset), a judge, and the
official metrics computed offline with alpaca_eval.metrics.

- AlpacaEval 2: baseline gpt4_1106_preview, annotator weighted_alpaca_eval_gpt4_turbo.
- AlpacaEval 1: baseline text_davinci_003, annotator alpaca_eval_gpt4.

Win rate, its standard error and the discrete win rate come from `alpaca_eval.metrics.get_winrate`.
The length-controlled win rate runs the package's own GLM (`get_length_controlled_winrate`) with its
two hub downloads replaced by local inputs: the gamed-baseline annotations (df_gamed.csv) are not
available, so the GLM is fitted without that regularisation; the instruction-difficulty term uses a
local estimate from shipped AlpacaEval 2 annotations when it exists (see
benchmarks/alpaca_eval/README.md), and is left out (GLM `length_controlled_minimal`) otherwise. The
record says which. Its standard error is a bootstrap over instructions.

As a suite section (`alpaca_eval:` in a suite YAML; keys: AlpacaSection) run_suite_section does all of
this on the trained model, with generation and the judge's verdicts cached in the section's directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from harness.compat import import_alpaca_eval, local_glm_hub_file, quiet_glm_warnings
from harness.errors import HarnessError
from harness.evaluation import SectionContext, SectionSettings, metric_cell, parse_section
from harness.generation import GenerationSettings, resumable_generate
from harness.io import atomic_write_json
from harness.judge import (
    CachedJudge,
    Judge,
    JudgeOptions,
    check_judge,
    judge_options,
    make_judge,
    position_bias,
)

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
ALPACA_DIR = BENCHMARKS_DIR / "alpaca_eval"
N_INSTRUCTIONS = 805
DIFFICULTY_FILE = ALPACA_DIR / "instruction_difficulty_local.csv"
LC_BOOTSTRAP = 200
LC_MIN_EXAMPLES = 10


@dataclass(frozen=True)
class AlpacaVersion:
    name: str
    reference: str  # generator of the baseline outputs (file in benchmarks/alpaca_eval/references)
    annotator: str  # the official alpaca_eval annotator config
    difficulty: bool  # whether a local instruction-difficulty estimate exists for this baseline


VERSIONS = {
    "2": AlpacaVersion("AlpacaEval 2", "gpt4_1106_preview", "weighted_alpaca_eval_gpt4_turbo", True),
    "1": AlpacaVersion("AlpacaEval 1", "text_davinci_003", "alpaca_eval_gpt4", False),
}


def version_info(version: str) -> AlpacaVersion:
    if version not in VERSIONS:
        raise HarnessError(f"AlpacaEval version '{version}': must be one of {', '.join(sorted(VERSIONS))}")
    return VERSIONS[version]


def load_reference(generator: str) -> list[dict[str, Any]]:
    """The 805 baseline outputs (dataset, instruction, output, generator), in the official order."""
    path = ALPACA_DIR / "references" / f"{generator}.json.gz"
    if not path.is_file():
        choices = sorted(p.name.removesuffix(".json.gz") for p in path.parent.glob("*.json.gz"))
        raise HarnessError(f"AlpacaEval reference '{generator}' not found in {path.parent} (have: {', '.join(choices)})")
    with gzip.open(path, "rt", encoding="utf-8") as stream:
        rows = json.load(stream)
    if len(rows) != N_INSTRUCTIONS:
        raise HarnessError(f"{path}: {len(rows)} rows, expected {N_INSTRUCTIONS}")
    return rows


def fixed_subset(limit: int | None, seed: int = 0, total: int = N_INSTRUCTIONS) -> list[int]:
    """Positions of a fixed random subset (sorted), or all of them. The official order is grouped by
    source (helpful_base, koala, oasst, selfinstruct, vicuna), so the first N would not be representative."""
    import numpy as np

    if limit is None or limit >= total:
        return list(range(total))
    if limit < 1:
        raise HarnessError(f"AlpacaEval limit={limit}: must be >= 1")
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(total)[:limit])


# ----------------------------------------------------------------------------- metrics


def load_difficulty(reference: list[dict[str, Any]] | None = None) -> list[float]:
    """The local instruction-difficulty estimate, by official position; checked against the instructions."""
    import pandas as pd

    frame = pd.read_csv(DIFFICULTY_FILE)
    if reference is not None and list(frame["instruction"]) != [r["instruction"] for r in reference]:
        raise HarnessError(f"{DIFFICULTY_FILE}: instructions do not match the reference outputs' order")
    return [float(v) for v in frame["instruction_difficulty"]]


def estimate_difficulty(preferences: list[list[float]]) -> list[float]:
    """Instruction difficulty from other models' preferences on the same instructions (rows: models):
    minus the logit of the mean preference for the model (clipped to [0.02, 0.98]), standardised. A
    local stand-in for the official instruction_difficulty.csv, which is fitted on the whole leaderboard;
    the GLM fits its own coefficient per model, so only ranking and spread matter."""
    import numpy as np

    mean = np.clip(np.nanmean(np.array(preferences, dtype=float) - 1, axis=0), 0.02, 0.98)
    difficulty = -np.log(mean / (1 - mean))
    return [float(v) for v in (difficulty - difficulty.mean()) / difficulty.std()]


@contextlib.contextmanager
def _local_hub_files(difficulty: list[float] | None, n_rows: int) -> Iterator[None]:
    """Serve the GLM's df_gamed.csv from a local file: difficulty by position, no gamed-baseline rows."""
    import pandas as pd

    values = difficulty if difficulty is not None else [0.0] * n_rows
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "df_gamed.csv"
        pd.DataFrame({"model": "local", "index": range(len(values)), "instruction_difficulty": values}).to_csv(path, index=False)
        with local_glm_hub_file(path):
            yield


def length_controlled_winrate(
    frame: Any, difficulty: list[float] | None, *, bootstrap: int = LC_BOOTSTRAP, seed: int = 0
) -> dict[str, Any]:
    """alpaca_eval's GLM on local inputs; `frame` needs preference, output_1, output_2, generator_1/2 and
    index (official position). Standard error: bootstrap over instructions (the GLM's own is ~0 here)."""
    import numpy as np
    from alpaca_eval.metrics.glm_winrate import get_is_extreme_changes, get_length_controlled_winrate

    frame = frame[frame["preference"].notna()].reset_index(drop=True)
    if "index" not in frame:  # no official positions: the difficulty term cannot be aligned
        frame["index"], difficulty = range(len(frame)), None
    glm = "length_controlled_noreg" if difficulty is not None else "length_controlled_minimal"
    if frame["generator_1"].iloc[0] == frame["generator_2"].iloc[0]:
        return {"value": 50.0, "stderr": 0.0, "glm": glm, "note": "model is the baseline"}
    if len(frame) < LC_MIN_EXAMPLES:
        return {
            "value": None,
            "stderr": None,
            "glm": glm,
            "note": f"not computed: the GLM's 5-fold cross-validation needs at least {LC_MIN_EXAMPLES} examples",
        }
    preference = frame["preference"].astype(float)
    if (preference <= 1.0).all() or (preference >= 2.0).all():
        return {"value": None, "stderr": None, "glm": glm, "note": "not computed: every preference is on one side"}
    n_index = max(N_INSTRUCTIONS, int(frame["index"].max()) + 1)

    def fit(sample: Any) -> float:
        out = get_length_controlled_winrate(sample, glm_name=glm, save_weights_dir=None, is_warn_extreme_changes=False)
        return float(out["length_controlled_winrate"])

    # alpaca_eval passes scikit-learn options deprecated for 1.10 (pinned below it): not the user's concern
    with _local_hub_files(difficulty, n_index), quiet_glm_warnings():
        try:
            value = fit(frame.copy())
        except ValueError as error:  # e.g. every preference on one side: nothing to fit
            return {"value": None, "stderr": None, "glm": glm, "note": f"GLM could not be fitted ({str(error).splitlines()[0]})"}
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(bootstrap):
            sample = frame.iloc[rng.integers(0, len(frame), len(frame))].reset_index(drop=True)
            try:
                draws.append(fit(sample))
            except ValueError:  # a resample the GLM cannot fit (e.g. one class only); counted below
                continue
    raw = float(frame["preference"].astype(float).sub(1).mean() * 100)
    note = (
        "gamed-baseline regularisation unavailable offline (hub file df_gamed.csv); "
        + (
            "instruction difficulty: local estimate from shipped AlpacaEval 2 annotations"
            if difficulty is not None
            else "instruction-difficulty term unavailable for this baseline/subset: GLM without it"
        )
    )
    return {
        "value": value,
        "stderr": float(np.std(draws, ddof=1)) if len(draws) > 1 else None,
        "glm": glm,
        "bootstrap": len(draws),
        "bootstrap_failed": bootstrap - len(draws),
        "extreme_change_from_raw": bool(get_is_extreme_changes(raw, value)),
        "note": note,
    }


def compute_metrics(
    annotations: list[dict[str, Any]],
    *,
    difficulty: list[float] | None = None,
    lc: bool = True,
    lc_bootstrap: int = LC_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """Win rate (with standard error), discrete win rate and LC win rate from per-example annotations
    (preference: 1 baseline wins, 2 model wins, 1.5 draw, fractional for weighted judges, NaN failed)."""
    import pandas as pd

    import_alpaca_eval()
    from alpaca_eval.metrics import get_winrate
    from alpaca_eval.metrics.helpers import ZeroOneScoringRule

    if not annotations:
        raise HarnessError("AlpacaEval: no annotations to score")
    frame = pd.DataFrame(annotations)
    frame["preference"] = pd.to_numeric(frame["preference"], errors="coerce")
    failed = int(frame["preference"].isna().sum())
    scored = frame[frame["preference"].notna()].reset_index(drop=True)
    if scored.empty:
        raise HarnessError(f"AlpacaEval: the judge returned no usable preference for {len(frame)} examples")
    head = get_winrate(scored)
    discrete = ZeroOneScoringRule().describe_head2head(scored["preference"])
    metrics: dict[str, Any] = {
        "win_rate": {"value": float(head["win_rate"]), "stderr": _finite(head["standard_error"])},
        "discrete_win_rate": {"value": float(head["discrete_win_rate"]), "stderr": _finite(discrete["standard_error"])},
        "n_wins": int(head["n_wins"]),
        "n_wins_base": int(head["n_wins_base"]),
        "n_draws": int(head["n_draws"]),
        "n_total": int(head["n_total"]),
        "n_failed": failed,
    }
    if "output_2" in scored:
        lengths = scored["output_2"].str.len()
        metrics["avg_length"] = {"value": float(lengths.mean()), "stderr": _finite(lengths.sem())}
    if lc:
        metrics["length_controlled_win_rate"] = length_controlled_winrate(scored, difficulty, bootstrap=lc_bootstrap, seed=seed)
    return metrics


def _finite(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def cost_summary(annotations: list[dict[str, Any]]) -> dict[str, Any]:
    prices = [a.get("price_per_example") for a in annotations]
    known = [p for p in prices if isinstance(p, (int, float)) and math.isfinite(p)]
    return {
        "cost_usd": round(sum(known), 6) if known else None,
        "priced_examples": len(known),
        "note": None if known else "no per-example price (local judge, or a model alpaca_eval cannot price: set price_per_token)",
    }


# ----------------------------------------------------------------------------- the whole evaluation


def judge_outputs(
    model_outputs: list[dict[str, Any]],
    *,
    judge: Judge,
    output_dir: Path,
    version: str = "2",
    lc_bootstrap: int = LC_BOOTSTRAP,
) -> dict[str, Any]:
    """Judge model outputs (instruction, output, generator, index = official position) against the baseline,
    write annotations.json (per example) and metrics.json, and return the metrics."""
    info = version_info(version)
    reference = load_reference(info.reference)
    rows = []
    for item in model_outputs:
        index = int(item["index"])
        base = reference[index]
        if base["instruction"] != item["instruction"]:
            raise HarnessError(f"AlpacaEval output for index {index}: instruction does not match the reference")
        rows.append(
            {
                "index": index,
                "dataset": base.get("dataset"),
                "instruction": base["instruction"],
                "output_1": base["output"],
                "generator_1": base["generator"],
                "output_2": item["output"],
                "generator_2": item["generator"],
            }
        )
    work_dir = output_dir / "judge"
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    annotations = judge.annotate_alpaca(rows, work_dir)
    judge_seconds = time.perf_counter() - started
    subset = [r["index"] for r in rows]
    difficulty = load_difficulty(reference) if info.difficulty and DIFFICULTY_FILE.is_file() else None
    metrics = compute_metrics(annotations, difficulty=difficulty, lc_bootstrap=lc_bootstrap)
    bias = position_bias(annotations)
    result = {
        "benchmark": info.name,
        "version": version,
        "reference": info.reference,
        "official_annotator": info.annotator,  # the leaderboard's judge for this version, for comparison
        "judge": judge.describe(),
        "n": len(rows),
        "subset": None if len(subset) == N_INSTRUCTIONS else subset,
        **metrics,
        "cost": cost_summary(annotations),
        "judge_seconds": round(judge_seconds, 2),
    }
    if bias:
        result["position_bias"] = bias
    atomic_write_json(output_dir / "annotations.json", annotations)
    atomic_write_json(output_dir / "metrics.json", result)
    return result


def generate_outputs(
    model: Any,
    tokenizer: Any,
    *,
    output_dir: Path,
    generator: str,
    indices: list[int],
    settings: GenerationSettings,
    progress: Any = None,
    chunk_size: int = 64,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Model outputs for the chosen instructions; reused from output_dir when settings and subset match.
    Generation is saved chunk by chunk (model_outputs.partial.json), so a killed run resumes."""
    path = output_dir / "model_outputs.json"
    reference = load_reference(VERSIONS["2"].reference)  # the instructions are the same in both versions
    key = {"generator": generator, "indices": indices, "settings": settings.as_record()}
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return saved["outputs"], saved["generation"]
    instructions = [reference[i]["instruction"] for i in indices]
    partial = output_dir / "model_outputs.partial.json"
    generations, summary = resumable_generate(
        model, tokenizer, instructions, settings, progress_file=partial, chunk_size=chunk_size, progress=progress
    )
    outputs = [
        {
            "index": index,
            "dataset": reference[index]["dataset"],
            "instruction": reference[index]["instruction"],
            "output": g.text,
            "generator": generator,
            "new_tokens": g.new_tokens,
            "finished": g.finished,
        }
        for index, g in zip(indices, generations, strict=True)
    ]
    generation = settings.as_record() | summary
    atomic_write_json(path, {"key": key, "generation": generation, "outputs": outputs})
    partial.unlink(missing_ok=True)
    return outputs, generation


def run_alpaca_eval(
    model: Any,
    tokenizer: Any,
    *,
    judge: Judge,
    output_dir: Path,
    limit: int | None = None,
    settings: GenerationSettings | None = None,
    version: str = "2",
    generator: str = "model",
    subset_seed: int = 0,
    lc_bootstrap: int = LC_BOOTSTRAP,
    progress: Any = None,
    chunk_size: int = 64,
) -> dict[str, Any]:
    """Generate greedily on AlpacaEval (all 805 instructions, or a fixed seeded subset of `limit`), judge
    against the version's baseline, and return metrics with standard errors. Writes to output_dir:
    model_outputs.json, annotations.json (per example), metrics.json, judge/ (annotator config, cache)."""
    version_info(version)
    settings = settings or GenerationSettings()
    output_dir.mkdir(parents=True, exist_ok=True)
    indices = fixed_subset(limit, subset_seed)
    outputs, generation = generate_outputs(
        model,
        tokenizer,
        output_dir=output_dir,
        generator=generator,
        indices=indices,
        settings=settings,
        progress=progress,
        chunk_size=chunk_size,
    )
    result = judge_outputs(outputs, judge=judge, output_dir=output_dir, version=version, lc_bootstrap=lc_bootstrap)
    result["generation"] = generation
    result["subset_seed"] = subset_seed if limit is not None else None
    atomic_write_json(output_dir / "metrics.json", result)
    return result


# ----------------------------------------------------------------------------- as a suite section


PERCENT = (0.0, 100.0)


class AlpacaSection(SectionSettings):
    """The `alpaca_eval:` keys of a suite (benchmarks/suites/paper.yaml)."""

    version: str = Field("2", description="2: baseline gpt4_1106_preview; 1: text_davinci_003")
    reference: str | None = Field(None, description="the baseline; must be the version's (documentation)")
    annotator: str | None = Field(None, description="alpaca_eval annotator config of an openai judge; None: the version's")
    judge: str = Field("openai:", description="default: the annotator config's own model (the official judge)")
    subset_seed: int = Field(0, ge=0, description="seed of the fixed subset when limited; not the run's seed")
    lc_bootstrap: int = Field(LC_BOOTSTRAP, ge=0)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _section_settings(config: dict[str, Any]) -> tuple[AlpacaSection, AlpacaVersion, JudgeOptions]:
    settings = parse_section(AlpacaSection, config, "alpaca_eval")
    try:
        info = version_info(settings.version)
    except HarnessError as error:
        raise HarnessError(f"section alpaca_eval: {error}") from None
    if settings.reference is not None and settings.reference != info.reference:
        raise HarnessError(
            f"section alpaca_eval: reference '{settings.reference}' is not {info.name}'s baseline '{info.reference}'; "
            "drop the key or set version to the one that uses it"
        )
    options = judge_options(settings.judge_options, where="section alpaca_eval: judge_options")
    options = dataclasses.replace(options, annotator_config=settings.annotator or info.annotator)
    return settings, info, options


def check_suite_section(config: dict[str, Any]) -> None:
    """Called before training: the keys, the version and the judge (its key, its model) are usable."""
    settings, _, options = _section_settings(config)
    check_judge(settings.judge, options)


def run_suite_section(
    model: Any, tokenizer: Any, config: dict[str, Any], *, output_dir: Path, seed: int, context: SectionContext | None = None
) -> dict[str, Any]:
    """AlpacaEval as a suite section: generate on the instructions (all, or the fixed subset of `limit`),
    judge against the version's baseline, and return win rate, discrete win rate and LC win rate as
    metric cells, the judge's cost, and per-example win-rate rows for paired tests across runs.

    Generation and verdicts are cached in output_dir (model_outputs.json, judge_cache.jsonl), so a killed
    or repeated evaluation resumes without generating or judging again. The subset depends on
    subset_seed, not on the run's `seed`, so runs with different seeds are scored on the same items."""
    del seed  # greedy decoding; the subset has its own seed (see above)
    context = context or SectionContext()
    settings, info, options = _section_settings(config)
    generation = settings.generation_settings(context.template_for(tokenizer), context.backend)
    output_dir.mkdir(parents=True, exist_ok=True)
    judge = CachedJudge(make_judge(settings.judge, options), output_dir / "judge_cache.jsonl", chunk_size=settings.chunk_size)
    result = run_alpaca_eval(
        model,
        tokenizer,
        judge=judge,
        output_dir=output_dir,
        limit=settings.limit,
        settings=generation,
        version=settings.version,
        generator=context.generator,
        subset_seed=settings.subset_seed,
        lc_bootstrap=settings.lc_bootstrap,
        chunk_size=settings.chunk_size,
    )
    annotations = json.loads((output_dir / "annotations.json").read_text(encoding="utf-8"))
    lc = result["length_controlled_win_rate"]
    return {
        "win_rate": metric_cell(result["win_rate"]["value"], result["win_rate"]["stderr"], bounds=PERCENT),
        "discrete_win_rate": metric_cell(
            result["discrete_win_rate"]["value"], result["discrete_win_rate"]["stderr"], bounds=PERCENT
        ),
        "length_controlled_win_rate": metric_cell(
            lc["value"], lc["stderr"], bounds=PERCENT, glm=lc.get("glm"), note=lc.get("note")
        ),
        "n": result["n_total"],
        "n_failed": result["n_failed"],
        "benchmark": result["benchmark"],
        "reference": result["reference"],
        "judge": result["judge"]["judge"],
        "judge_cost_usd": result["cost"]["cost_usd"],
        "details": {
            "judge": result["judge"],
            "official_annotator": result["official_annotator"],
            "subset": result["subset"],
            "subset_seed": result["subset_seed"],
            "n_wins": result["n_wins"],
            "n_wins_base": result["n_wins_base"],
            "n_draws": result["n_draws"],
            "avg_length": result.get("avg_length"),
            "position_bias": result.get("position_bias"),
            "cost": result["cost"],
            "generation": result["generation"],
            "judge_seconds": result["judge_seconds"],
            "files": ["model_outputs.json", "annotations.json", "metrics.json", "judge_cache.jsonl"],
        },
        "samples": [
            {"doc_id": a["index"], "dataset": a.get("dataset"), "win_rate": _item_win_rate(a["preference"])}
            for a in annotations
            if _item_win_rate(a["preference"]) is not None
        ],
    }


def _item_win_rate(preference: Any) -> float | None:
    """One example's share of the win rate, as alpaca_eval counts it: 100 * (preference - 1), 0 encoding a
    draw; failed or out-of-range preferences are left out (alpaca_eval drops them too)."""
    if preference is None or not math.isfinite(float(preference)):
        return None
    value = 1.5 if float(preference) == 0 else float(preference)
    return (value - 1.0) * 100.0 if 1.0 <= value <= 2.0 else None
