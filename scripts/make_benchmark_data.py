"""Build benchmarks/data/ from ../shared/data/benchmarks: the evaluation data the lm-eval task YAMLs read.

Each file is rewritten into the field layout of the Hugging Face dataset that lm-eval's own task reads
(so the task YAMLs in benchmarks/tasks/ can keep lm-eval's prompts), as gzip-compressed JSONL with a
fixed header (mtime 0), so rebuilding gives byte-identical files. Run: python scripts/make_benchmark_data.py
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "benchmarks"
NLTK_SOURCE = ROOT.parent / "shared" / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
TARGET = ROOT / "benchmarks" / "data"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl_gz(relative: str, rows: Iterable[dict[str, Any]]) -> int:
    path = TARGET / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as handle:
        handle.write(text.encode("utf-8"))
    path.write_bytes(buffer.getvalue())
    count = text.count("\n")
    print(f"{relative}: {count} rows, {path.stat().st_size / 1024:.0f} KiB")
    return count


def arc(name: str) -> None:
    """llm-foundry's {query: "Question: ...", choices, gold} is already lm-eval's "Question: {{question}}"."""
    write_jsonl_gz(f"mc/{name}.jsonl.gz", read_jsonl(SOURCE / "mc" / f"{name}.jsonl"))


def piqa() -> None:
    """{query: "Question: <goal>\\n", choices: [sol1, sol2], gold} -> lm-eval's {goal, sol1, sol2, label}."""
    rows = []
    for row in read_jsonl(SOURCE / "mc" / "piqa.jsonl"):
        query = row["query"]
        assert query.startswith("Question: ") and query.endswith("\n"), query
        rows.append({"goal": query[len("Question: ") : -1], "sol1": row["choices"][0], "sol2": row["choices"][1], "label": row["gold"]})
    write_jsonl_gz("mc/piqa.jsonl.gz", rows)


def boolq() -> None:
    """{query: "Passage: <p>\\nQuestion: <q>?", choices: [no, yes], gold} -> lm-eval's {passage, question, label}.

    lm-eval's prompt appends the "?" itself, so it is removed from the question here."""
    rows = []
    for row in read_jsonl(SOURCE / "mc" / "boolq.jsonl"):
        assert row["choices"] == ["no", "yes"] and row["query"].startswith("Passage: ")
        passage, question = row["query"][len("Passage: ") :].rsplit("\nQuestion: ", 1)
        rows.append({"passage": passage, "question": question.removesuffix("?"), "label": row["gold"]})
    write_jsonl_gz("mc/boolq.jsonl.gz", rows)


def winogrande() -> None:
    """Kept as llm-foundry's partial-scoring layout {context_options, continuation, gold}: the same
    contexts (sentence up to the blank + option) and continuation (the rest) that lm-eval builds."""
    write_jsonl_gz("mc/winogrande.jsonl.gz", read_jsonl(SOURCE / "mc" / "winogrande.jsonl"))


def lm_eval_hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag utils.preprocess (applied again: it also drops bracketed spans the text file kept)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_query(context: str) -> str:
    """lm-eval builds activity_label + ": " + ctx_a + " " + ctx_b.capitalize(); the text file has ctx_b
    uncapitalized. ActivityNet items (3,243 of 10,042) end in the unfinished ctx_b fragment, WikiHow items
    (empty ctx_b) end in ".", so capitalize the fragment after the last sentence break of the former."""
    label, _, ctx = context.partition(": ")
    if not ctx.endswith("."):
        head, sep, fragment = ctx.rpartition(". ")
        ctx = head + sep + fragment.capitalize()
    return lm_eval_hellaswag_preprocess(f"{label}: {ctx}")


def hellaswag() -> None:
    """llama.cpp's text layout (6 lines per item) -> lm-eval's processed docs {query, choices, label}."""
    with bz2.open(SOURCE / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    rows = []
    for start in range(0, len(lines) - 5, 6):
        context, label, *endings = lines[start : start + 6]
        rows.append(
            {
                "query": hellaswag_query(context),
                "choices": [lm_eval_hellaswag_preprocess(ending) for ending in endings],
                "label": int(label),
            }
        )
    write_jsonl_gz("hellaswag/hellaswag_validation.jsonl.gz", rows)


def truthfulqa() -> None:
    """mc_task.json ({answer: label} maps, correct answers first) -> the hub layout {choices, labels}."""
    items = json.loads((SOURCE / "truthfulqa" / "mc_task.json").read_text(encoding="utf-8"))
    rows = []
    for item in items:
        row: dict[str, Any] = {"question": item["question"]}
        for key in ("mc1_targets", "mc2_targets"):
            row[key] = {"choices": list(item[key]), "labels": [int(v) for v in item[key].values()]}
        assert row["mc1_targets"]["labels"][0] == 1 and sum(row["mc1_targets"]["labels"]) == 1
        rows.append(row)
    write_jsonl_gz("truthfulqa/truthfulqa_mc.jsonl.gz", rows)


def mmlu() -> None:
    """57 subjects x {dev, test} CSVs -> one file per split in cais/mmlu's layout {question, subject, choices, answer}."""
    for split in ("dev", "test"):
        rows = []
        for path in sorted((SOURCE / "mmlu" / split).glob(f"*_{split}.csv")):
            subject = path.name.removesuffix(f"_{split}.csv")
            with path.open(encoding="utf-8", newline="") as handle:
                for record in csv.DictReader(handle):
                    choices = [record[f"choice{i}"] for i in range(4)]
                    rows.append({"question": record["question"], "subject": subject, "choices": choices, "answer": int(record["answer"])})
        write_jsonl_gz(f"mmlu/mmlu_{split}.jsonl.gz", rows)


LM_EVAL_MMLU = "lm_eval/tasks/mmlu/default"
MMLU_GROUPS = {"stem": "stem", "other": "other", "social_sciences": "social sciences", "humanities": "humanities"}
# A few subjects, one per category, for the CPU-sized `small` suite (sizes: 144, 171, 198, 306 test items).
MMLU_SMALL = ["college_biology", "world_religions", "high_school_geography", "nutrition"]

TEMPLATE = """\
# Shared by the 57 MMLU subject tasks in mmlu/: lm-eval's mmlu default template (0-shot or n-shot from the
# subject's 5 dev questions, first_n), over the shipped cais/mmlu-layout data. Generated by
# scripts/make_benchmark_data.py.
custom_dataset: !function local_data.load_mmlu
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_text(relative: str, text: str) -> None:
    path = ROOT / "benchmarks" / "tasks" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def group_yaml(name: str, tasks: list[str], comment: str, alias: str | None = None) -> str:
    lines = [f"# {comment} Generated by scripts/make_benchmark_data.py.", f"group: {name}"]
    if alias:
        lines.append(f"group_alias: {alias}")
    lines.append("task:")
    lines += [f"  - {task}" for task in tasks]
    lines += ["aggregate_metric_list:", "  - metric: acc", "    weight_by_size: true", "metadata:", "  version: 2", ""]
    return "\n".join(lines)


def mmlu_tasks() -> None:
    """Task YAMLs mirroring lm-eval's mmlu/default: one task per subject (its category tag and description
    read from the installed lm-eval), four category groups and the `mmlu` group, accuracy weighted by size."""
    import lm_eval
    import yaml

    default = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    subjects = sorted(p.name.removesuffix("_test.csv") for p in (SOURCE / "mmlu" / "test").glob("*_test.csv"))
    write_text("_mmlu_template_yaml", TEMPLATE)
    for subject in subjects:
        config = yaml.safe_load((default / f"mmlu_{subject}.yaml").read_text(encoding="utf-8"))
        category = config["tag"].removeprefix("mmlu_").removesuffix("_tasks")
        body = (
            "include: ../_mmlu_template_yaml\n"
            f"task: local_mmlu_{subject}\n"
            f"task_alias: {subject}\n"
            f"tag: local_mmlu_{category}_tasks\n"
            f"description: {json.dumps(config['description'])}\n"
            f"dataset_kwargs:\n  subject: {subject}\n"
        )
        write_text(f"mmlu/local_mmlu_{subject}.yaml", body)
    for category, alias in MMLU_GROUPS.items():
        write_text(
            f"mmlu/_local_mmlu_{category}.yaml",
            group_yaml(f"local_mmlu_{category}", [f"local_mmlu_{category}_tasks"], f"MMLU {alias} subjects.", alias),
        )
    write_text(
        "mmlu/_local_mmlu.yaml",
        group_yaml("local_mmlu", [f"local_mmlu_{c}" for c in MMLU_GROUPS], "MMLU, 57 subjects, as lm-eval's mmlu group.", "mmlu"),
    )
    write_text(
        "mmlu/_local_mmlu_small.yaml",
        group_yaml(
            "local_mmlu_small", [f"local_mmlu_{s}" for s in MMLU_SMALL],
            "MMLU, four subjects (one per category) for the small suite.", "mmlu (4 subjects)",
        ),
    )
    online = ROOT / "benchmarks" / "tasks_online" / "harness_mmlu_small.yaml"
    online.parent.mkdir(parents=True, exist_ok=True)
    comment = "local_mmlu_small's online counterpart: the same subjects as lm-eval's hub-backed tasks."
    online.write_text(group_yaml("harness_mmlu_small", [f"mmlu_{s}" for s in MMLU_SMALL], comment, "mmlu (4 subjects)"), encoding="utf-8")


def ifeval() -> None:
    """google-research's input_data.jsonl is the hub's google/IFEval layout already."""
    write_jsonl_gz("ifeval/input_data.jsonl.gz", read_jsonl(SOURCE / "ifeval" / "input_data.jsonl"))


def licences() -> None:
    for relative in ("mc/LICENSE", "mmlu/LICENSE", "truthfulqa/LICENSE"):
        shutil.copyfile(SOURCE / relative, TARGET / relative)
    shutil.copyfile(SOURCE / "hellaswag" / "LICENSE", TARGET / "hellaswag" / "LICENSE-text-files")
    punkt = TARGET / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    punkt.mkdir(parents=True, exist_ok=True)
    for name in ("abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt"):
        shutil.copyfile(NLTK_SOURCE / name, punkt / name)


def main() -> None:
    arc("arc_easy")
    arc("arc_challenge")
    piqa()
    boolq()
    winogrande()
    hellaswag()
    truthfulqa()
    mmlu()
    ifeval()
    licences()
    mmlu_tasks()


if __name__ == "__main__":
    main()
