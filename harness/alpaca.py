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
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from harness.errors import HarnessError
from harness.generation import GenerationSettings, timed_generate
from harness.judges import Judge, alpaca_eval_modules, position_bias
from harness.records import atomic_write_json

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

    alpaca_eval_modules()
    from alpaca_eval.metrics import glm_winrate

    values = difficulty if difficulty is not None else [0.0] * n_rows
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "df_gamed.csv"
        pd.DataFrame({"model": "local", "index": range(len(values)), "instruction_difficulty": values}).to_csv(path, index=False)

        def download(*args: Any, filename: str = "", **kwargs: Any) -> str:
            if filename != "df_gamed.csv":
                raise HarnessError(f"AlpacaEval GLM asked for hub file {filename!r}, which has no local replacement")
            return str(path)

        with mock.patch.object(glm_winrate, "hf_hub_download", download):
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
    with _local_hub_files(difficulty, n_index), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
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

    alpaca_eval_modules()
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
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Model outputs for the chosen instructions; reused from output_dir when settings and subset match."""
    path = output_dir / "model_outputs.json"
    reference = load_reference(VERSIONS["2"].reference)  # the instructions are the same in both versions
    key = {"generator": generator, "indices": indices, "settings": settings.as_record()}
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return saved["outputs"], saved["generation"]
    instructions = [reference[i]["instruction"] for i in indices]
    journal = output_dir / "model_outputs.partial.jsonl"  # finished batches: a killed run resumes there
    generations, summary = timed_generate(model, tokenizer, instructions, settings, progress, journal)
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
    journal.unlink(missing_ok=True)
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
) -> dict[str, Any]:
    """Generate greedily on AlpacaEval (all 805 instructions, or a fixed seeded subset of `limit`), judge
    against the version's baseline, and return metrics with standard errors. Writes to output_dir:
    model_outputs.json, annotations.json (per example), metrics.json, judge/ (annotator config, cache)."""
    version_info(version)
    settings = settings or GenerationSettings()
    output_dir.mkdir(parents=True, exist_ok=True)
    indices = fixed_subset(limit, subset_seed)
    outputs, generation = generate_outputs(
        model, tokenizer, output_dir=output_dir, generator=generator, indices=indices, settings=settings, progress=progress
    )
    result = judge_outputs(outputs, judge=judge, output_dir=output_dir, version=version, lc_bootstrap=lc_bootstrap)
    result["generation"] = generation
    result["subset_seed"] = subset_seed if limit is not None else None
    atomic_write_json(output_dir / "metrics.json", result)
    return result
