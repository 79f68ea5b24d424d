"""perf/gpu_acceptance.sh in its CPU dry run: every section runs, so the script a GPU session runs cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_the_dry_run_completes_every_section(tmp_path):
    output = tmp_path / "gpu_acceptance.json"
    done = subprocess.run(["bash", str(ROOT / "perf" / "gpu_acceptance.sh"), "--dry-run", "--output", str(output)],
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["dry_run"] is True
    loop, harness_path = result["attention"]["paths"]  # on the CPU the kernels cannot run: the harness's path is the loop
    assert loop["max_abs_diff_vs_loop"] == 0.0 and loop["ms_fwd_bwd"] > 0
    assert harness_path["path"] == "harness path on this device" and harness_path["max_abs_diff_vs_loop"] == 0.0
    assert result["placements"] == {"process_device": "cpu", "training load": "cpu torch.float32",
                                    "inference load": "cpu torch.float32"}
    assert result["bytes_per_parameter"]["precisions"]["bf16"]["estimated_state_bytes_per_parameter"] == 16.0
    assert result["decoder_mfu"]["tflops"] > 0 and result["decoder_mfu"]["mfu"] is None  # no peak for a CPU
    generation = result["generation"]
    assert generation["hf"]["tokens_per_s"] > 0 and generation["hf"]["new_tokens"] > 0 and generation["model"] == "tiny"
    assert generation["vllm"].startswith("not installed") or generation["vllm"]["tokens_per_s"] > 0
    assert result["end_to_end"]["timings"]["train:sft"] > 0
