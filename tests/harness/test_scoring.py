import numpy as np
import pytest
import torch

from harness import scoring
from harness.artifacts import ArtifactCache
from harness.data import InstructionRecord
from harness.scoring import compute_ifd, embeddings_and_perplexity, ifd_pairs
from harness.templates import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT, TokenizedExample
from tests.harness.test_templates import STANFORD_PROMPT_DICT


def reference_answer_loss(model, prefix_ids: list[int], answer_ids: list[int]) -> float:
    """Unbatched, per-token loop in the style of the Cherry LLM reference: one sequence, no padding."""
    ids = torch.tensor([prefix_ids + answer_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    losses = [-log_probs[len(prefix_ids) + k - 1, token].item() for k, token in enumerate(answer_ids)]
    return sum(losses) / len(losses)


def mixed_length_records(sample_records) -> list[InstructionRecord]:
    by_length = sorted(sample_records[:200], key=lambda r: len(r.output))
    return by_length[:6] + by_length[-6:] + [InstructionRecord("Say hi.", "Hi", input="to Bob")]


def test_ifd_matches_an_independent_per_example_computation(tiny, sample_records, tmp_path):
    model, tokenizer = tiny
    records = mixed_length_records(sample_records)
    result = compute_ifd(model, tokenizer, records, template="alpaca", max_length=512, model_key="tiny",
                         cache=ArtifactCache(tmp_path))
    for index, record in enumerate(records):
        if index in result.skipped:
            continue
        prompt = (ALPACA_PROMPT_WITH_INPUT if record.input else ALPACA_PROMPT_NO_INPUT).format(
            instruction=record.instruction, input=record.input)
        answer = tokenizer.encode(record.output, add_special_tokens=False)
        conditioned = reference_answer_loss(model, tokenizer.encode(prompt, add_special_tokens=True), answer)
        direct = reference_answer_loss(model, tokenizer.encode("### Response:", add_special_tokens=True), answer)
        assert abs(result.conditioned_loss[index] - conditioned) < 1e-4
        assert abs(result.direct_loss[index] - direct) < 1e-4
        assert abs(result.ifd[index] - conditioned / direct) < 1e-4
    lengths = [len(tokenizer.encode(r.output)) for r in records]
    assert max(lengths) > 10 * min(lengths)
    assert result.stats.shared_prefix_tokens > 0  # the template preamble was run once, not per example


# ---- Cherry LLM's scoring, reimplemented from tianyi-lab/Cherry_LLM (commit 01fac8d) cherry_seletion/data_analysis.py
# (--mod cherry --prompt alpaca: get_perplexity_and_embedding_part_text) and data_by_IFD.py (get_loss_part_text and
# the loop of main), batch 1, one record at a time, fp32, a per-token log_softmax/NLL loop as published.
CHERRY_PROMPT_DICT = STANFORD_PROMPT_DICT  # data_analysis.py carries Stanford Alpaca's PROMPT_DICT verbatim


def cherry_part_text(tokenizer, model, text: str, target_span: str, max_length: int) -> tuple[int, np.ndarray]:
    """(answer tokens, their losses): data_analysis.py's token losses cut as data_by_IFD.py's get_loss_part_text."""
    log_softmax, nll_loss = torch.nn.LogSoftmax(dim=-1), torch.nn.NLLLoss(reduction="none")
    input_ids = tokenizer.encode(text, return_tensors="pt", truncation=True, max_length=max_length)
    start_token = len(tokenizer.encode(text[: text.rfind(target_span)]))
    end_token = input_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids).logits
    losses = []
    for i in range(1, end_token):
        log_prob_dist = log_softmax(logits[0, i - 1])
        losses.append(nll_loss(log_prob_dist.unsqueeze(0), input_ids[0, i].unsqueeze(0)).item())
    return end_token - start_token, np.array(losses[start_token - 1 : end_token - 1])


def cherry_ifd(tokenizer, model, record: InstructionRecord, max_length: int) -> tuple[float, float] | None:
    """(s(A|Q), s(A)) as Cherry computes them, or None where data_by_IFD.py skips the record (`continue`).

    The published code truncates the direct text at max_length - instruct_len + 4: 4 is the length of
    "### Response:" with BOS under its LLaMA tokenizer, written here as that length under this tokenizer."""
    output = record.output
    direct_answer_text = "### Response:" + output
    key = "prompt_input" if record.input != "" else "prompt_no_input"
    prompt = CHERRY_PROMPT_DICT[key].format_map({"instruction": record.instruction, "input": record.input})
    whole_text = prompt + output
    tag_tokens = len(tokenizer.encode("### Response:"))  # 4 under LLaMA's tokenizer
    instruct_len = tokenizer.encode(prompt, return_tensors="pt", truncation=True, max_length=max_length).shape[1]
    if not max_length - instruct_len > 0:
        return None
    len_1, loss_1 = cherry_part_text(tokenizer, model, direct_answer_text, output, max_length - instruct_len + tag_tokens)
    len_2, loss_2 = cherry_part_text(tokenizer, model, whole_text, output, max_length)
    if len_1 <= 0 or len_2 <= 0 or instruct_len + len_1 > max_length:
        return None
    return float(loss_2.mean()), float(loss_1.mean())


def cherry_records(sample_records) -> list[InstructionRecord]:
    """A handful: short and long answers (some cut at max_length 160), an input, a quoted answer (where a
    tokenizer may merge ':"' across the prompt/answer boundary), a prompt that leaves no room, an empty answer."""
    by_length = sorted(sample_records[:200], key=lambda r: len(r.output))
    with_input = next(r for r in sample_records if r.input)
    return [*by_length[:2], *by_length[-2:], with_input, InstructionRecord("Quote Hamlet.", '"To be, or not to be."'),
            InstructionRecord(" ".join(["word"] * 200), "Fine."), InstructionRecord("Say nothing.", "")]


def assert_matches_cherry(model, tokenizer, records: list[InstructionRecord], max_length: int, tmp_path) -> None:
    result = compute_ifd(model, tokenizer, records, template="alpaca", max_length=max_length, model_key="cherry",
                         cache=ArtifactCache(tmp_path))
    expected = [cherry_ifd(tokenizer, model, record, max_length) for record in records]
    # skipped by both: the 1-token answer whose prompt (with a long input) fills max_length, the 200-word
    # instruction, the empty answer
    assert result.skipped == [i for i, value in enumerate(expected) if value is None] == [0, 6, 7]
    assert result.truncated and result.stats.shared_prefix_tokens > 0  # cut answers; the packed, shared-prefix engine
    for index, value in enumerate(expected):
        if value is None:
            continue
        conditioned, direct = value
        assert abs(result.conditioned_loss[index] - conditioned) < 1e-4
        assert abs(result.direct_loss[index] - direct) < 1e-4
        assert abs(result.ifd[index] - conditioned / direct) < 1e-4


def test_ifd_reproduces_cherry_llm_data_analysis_on_the_tiny_model(tiny, sample_records, tmp_path):
    model, tokenizer = tiny
    assert_matches_cherry(model, tokenizer, cherry_records(sample_records), 160, tmp_path)


@pytest.mark.slow
def test_ifd_reproduces_cherry_llm_data_analysis_on_smollm2(sample_records, tmp_path):
    from harness.models import load_model_and_tokenizer, resolve_model
    from tests.conftest import require_smollm2

    model, tokenizer = load_model_and_tokenizer(resolve_model("smollm2-135m-instruct", str(require_smollm2())))
    records = cherry_records(sample_records)
    ids = [tokenizer.encode(CHERRY_PROMPT_DICT["prompt_no_input"].format(instruction="Quote Hamlet.") + text)
           for text in ('"To be, or not to be."', "")]
    assert len(ids[0]) - len(ids[1]) < len(tokenizer.encode('"To be, or not to be."'))  # ':"' merges here
    assert_matches_cherry(model, tokenizer, records, 160, tmp_path)


def test_shared_prefix_plan_stops_before_the_first_labelled_token():
    examples = [
        TokenizedExample(list(range(20)) + [50, 51], [-100] * 20 + [50, 51]),
        TokenizedExample(list(range(12)) + [60, 61], [-100] * 12 + [60, 61]),
        TokenizedExample(list(range(30)), [-100] * 29 + [29]),
        TokenizedExample([7] * 20, [-100] * 19 + [7]),
    ]
    prefixes, assignment = scoring.shared_prefix_plan(examples, [0, 0, 0, 1])
    assert prefixes == [list(range(11))]  # common prefix 0..11, cut one before example 2's first label (12)
    assert assignment == [0, 0, 0, -1]  # a group of one shares nothing
    prefixes, _ = scoring.shared_prefix_plan(examples[:2], [0, 0])
    assert len(prefixes[0]) == 11


def test_shared_prefixes_give_the_same_losses(tiny, sample_records):
    model, tokenizer = tiny
    for template in ("alpaca", "chat"):
        _, conditioned, _, _, _ = ifd_pairs(sample_records[:24], tokenizer, template, 512)
        plain, _ = scoring.mean_response_losses(model, conditioned, pad_token_id=tokenizer.pad_token_id)
        shared, stats = scoring.mean_response_losses(model, conditioned, pad_token_id=tokenizer.pad_token_id,
                                                     prefix_groups=[0] * len(conditioned))
        if template == "alpaca":  # the tiny chat template has no system preamble: nothing long enough to share
            assert stats.shared_prefix_tokens > 10 * len(conditioned)
        np.testing.assert_allclose(shared, plain, atol=1e-5)


def test_both_passes_score_the_same_answer_tokens_after_the_same_tag(tiny, sample_records):
    """Cherry's conditioned and direct texts both end in the response tag: the tokens just before the answer
    and the answer's token ids are identical in the two passes (also for a truncated answer)."""
    _, tokenizer = tiny
    records = [*sample_records[:40], InstructionRecord("Quote it.", '"To be or not to be."'),
               InstructionRecord("Repeat.", " ".join(["word"] * 400))]
    for template, tag in (("alpaca", "### Response:"), ("chat", "<|im_start|>assistant\n"), ("user-assistant", "Assistant: ")):
        kept, conditioned, direct, skipped, truncated = ifd_pairs(records, tokenizer, template, 256)
        assert len(kept) == len(records) and not skipped and len(records) - 1 in truncated
        tag_length = len(tokenizer(tag).input_ids)
        for pair in zip(conditioned, direct, strict=True):
            starts = [example.labels.index(next(label for label in example.labels if label != -100)) for example in pair]
            assert starts[1] == tag_length
            assert pair[0].input_ids[starts[0] - tag_length : starts[0]] == pair[1].input_ids[:tag_length]
            assert pair[0].input_ids[starts[0] :] == pair[1].input_ids[starts[1] :]  # the same answer token ids
            assert tokenizer.decode(pair[1].input_ids[:tag_length]) == tag


def test_over_length_answers_are_truncated_like_cherry_or_skipped_on_request(tiny, sample_records):
    _, tokenizer = tiny
    long_answer = InstructionRecord("Repeat.", " ".join(["word"] * 400))
    long_prompt = InstructionRecord(" ".join(["word"] * 200), "Fine.")
    records = [sample_records[0], long_answer, long_prompt]
    kept, conditioned, direct, skipped, truncated = ifd_pairs(records, tokenizer, "alpaca", 128)
    assert kept == [0, 1] and skipped == [2] and truncated == [1]  # skipped only: no room left for the answer
    assert len(conditioned[1].input_ids) == 128
    assert conditioned[1].response_tokens == direct[1].response_tokens == 128 - len(tokenizer(
        ALPACA_PROMPT_NO_INPUT.format(instruction="Repeat.")).input_ids)
    kept, _, _, skipped, truncated = ifd_pairs(records, tokenizer, "alpaca", 128, overlength="skip")
    assert kept == [0] and skipped == [1, 2] and truncated == []


def test_cache_reuses_scores_and_resumes_partial_work(tiny, sample_records, tmp_path):
    model, tokenizer = tiny
    records = sample_records[:40]
    cache = ArtifactCache(tmp_path)
    first = compute_ifd(model, tokenizer, records, template="chat", model_key="tiny", cache=cache)
    assert first.stats.computed == 80 and first.stats.cached == 0
    second = compute_ifd(model, tokenizer, records, template="chat", model_key="tiny", cache=cache)
    assert second.stats.computed == 0 and second.stats.cached == 80
    np.testing.assert_array_equal(first.ifd, second.ifd)
    # Different parameters are a different artifact.
    other = compute_ifd(model, tokenizer, records, template="chat", max_length=256, model_key="tiny", cache=cache)
    assert other.stats.computed == 80


@pytest.mark.e2e
def test_killed_scoring_resumes_from_finished_chunks(tiny, sample_records, tmp_path):
    from harness import scoring

    model, tokenizer = tiny
    records = sample_records[:30]
    cache = ArtifactCache(tmp_path)
    _, conditioned, direct, _, _ = ifd_pairs(records, tokenizer, "chat", 512)
    examples = conditioned + direct
    full, _ = scoring.mean_response_losses(model, examples, pad_token_id=tokenizer.pad_token_id, chunk_size=16)

    calls = {"n": 0}
    original = scoring.per_example_mean_losses

    def dies_after_two_batches(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    scoring.per_example_mean_losses = dies_after_two_batches
    try:
        try:
            scoring.mean_response_losses(model, examples, pad_token_id=tokenizer.pad_token_id, chunk_size=16,
                                         rows_per_batch=1, cache=cache, cache_key="k")
        except KeyboardInterrupt:
            pass
    finally:
        scoring.per_example_mean_losses = original
    assert cache.completed_chunks("scores", "k") >= 1
    resumed, stats = scoring.mean_response_losses(model, examples, pad_token_id=tokenizer.pad_token_id,
                                                  chunk_size=16, cache=cache, cache_key="k")
    assert stats.cached >= 16 and stats.computed < len(examples)
    np.testing.assert_allclose(resumed, full, atol=1e-6)


def test_embeddings_are_mean_pooled_hidden_states(tiny):
    model, tokenizer = tiny
    texts = ["Give three tips for staying healthy.", "Name a colour."]
    examples = []
    for text in texts:
        ids = tokenizer(text).input_ids
        examples.append(TokenizedExample(ids, [-100] + ids[1:]))
    embeddings, perplexities = embeddings_and_perplexity(model, examples, pad_token_id=tokenizer.pad_token_id)
    for row, text in enumerate(texts):
        ids = torch.tensor([tokenizer(text).input_ids])
        with torch.no_grad():
            output = model(input_ids=ids, labels=ids, output_hidden_states=True)
        np.testing.assert_allclose(embeddings[row], output.hidden_states[-1][0].mean(0).numpy(), atol=1e-5)
        assert abs(perplexities[row] / torch.exp(output.loss).item() - 1) < 1e-5


def _score_in_a_process_group(rank: int, world: int, rendezvous: str, cache_dir: str, out_dir: str) -> None:
    """One process of a gloo job: score 40 examples in chunks of 8 and save what it got and did."""
    import json

    import torch.distributed as dist

    from harness.data import load_instruction_data
    from harness.difficulty import score_with_local_judge
    from harness.models import load_model_and_tokenizer, resolve_model
    from harness.scoring import mean_response_losses

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        model, tokenizer = load_model_and_tokenizer(resolve_model("tiny"))
        examples = _examples(tokenizer)
        seen = []
        real = scoring.per_example_mean_losses
        scoring.per_example_mean_losses = lambda model, batch, count, **kw: seen.append(count) or real(model, batch, count, **kw)
        losses, stats = mean_response_losses(model, examples, pad_token_id=tokenizer.pad_token_id, chunk_size=8,
                                             cache=ArtifactCache(cache_dir), cache_key="k")
        np.save(f"{out_dir}/scores_{rank}.npy", losses)
        with open(f"{out_dir}/work_{rank}.json", "w") as handle:
            json.dump({"scored_here": sum(seen), "computed": stats.computed, "cached": stats.cached}, handle)
        judged = score_with_local_judge(model, tokenizer, load_instruction_data("alpaca-sample").records[:10], rows_per_batch=2)
        np.save(f"{out_dir}/difficulty_{rank}.npy", judged.scores)
        embeddings, perplexities = embeddings_and_perplexity(model, examples, pad_token_id=tokenizer.pad_token_id, rows_per_batch=2)
        np.save(f"{out_dir}/embeddings_{rank}.npy", embeddings)
        np.save(f"{out_dir}/perplexities_{rank}.npy", perplexities)
        # a sharded model (SFTMix's confidence passes during FSDP training): each forward is a collective, so
        # both processes run all 5 chunks; dealt out, rank 0 would run a third chunk that rank 1 never joins
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        seen.clear()
        sharded, stats = mean_response_losses(model, examples, pad_token_id=tokenizer.pad_token_id, chunk_size=8,
                                              cache=ArtifactCache(cache_dir), cache_key="sharded")
        np.save(f"{out_dir}/sharded_{rank}.npy", sharded)
        with open(f"{out_dir}/sharded_work_{rank}.json", "w") as handle:
            json.dump({"scored_here": sum(seen), "computed": stats.computed, "cached": stats.cached}, handle)
    finally:
        dist.destroy_process_group()


def _examples(tokenizer) -> list[TokenizedExample]:
    from harness.data import load_instruction_data

    records = load_instruction_data("alpaca-sample").records[:20]
    _, conditioned, direct, _, _ = ifd_pairs(records, tokenizer, "alpaca", 512)
    return conditioned + direct


@pytest.mark.e2e
def test_processes_of_a_job_share_out_scoring_and_all_get_every_score(tiny, tmp_path):
    model, tokenizer = tiny
    alone, _ = scoring.mean_response_losses(model, _examples(tokenizer), pad_token_id=tokenizer.pad_token_id, chunk_size=8)
    cache = tmp_path / "cache"
    torch.multiprocessing.spawn(_score_in_a_process_group, args=(2, f"file://{tmp_path}/rendezvous", str(cache), str(tmp_path)),
                                nprocs=2, join=True)
    import json

    work = [json.loads((tmp_path / f"work_{rank}.json").read_text()) for rank in (0, 1)]
    assert [w["scored_here"] for w in work] == [24, 16]  # 5 chunks of 8: ranks 0 and 1 ran chunks 0, 2, 4 and 1, 3
    assert all(w["computed"] == 40 and w["cached"] == 0 for w in work)
    for rank in (0, 1):
        np.testing.assert_allclose(np.load(tmp_path / f"scores_{rank}.npy"), alone, rtol=0, atol=1e-6)
    # the local difficulty judge deals out its batches the same way
    from harness.data import load_instruction_data
    from harness.difficulty import score_with_local_judge

    judged = score_with_local_judge(model, tokenizer, load_instruction_data("alpaca-sample").records[:10], rows_per_batch=2).scores
    for rank in (0, 1):
        np.testing.assert_allclose(np.load(tmp_path / f"difficulty_{rank}.npy"), judged, rtol=0, atol=1e-9)
    # and so do the embedding and perplexity passes (IFD's brief experience, UNIFIT's concept tree)
    embeddings, perplexities = embeddings_and_perplexity(model, _examples(tokenizer), pad_token_id=tokenizer.pad_token_id, rows_per_batch=2)
    for rank in (0, 1):
        np.testing.assert_allclose(np.load(tmp_path / f"embeddings_{rank}.npy"), embeddings, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.load(tmp_path / f"perplexities_{rank}.npy"), perplexities, rtol=1e-6)
    for rank in (0, 1):  # sharded: every process ran every chunk and got every score
        work = json.loads((tmp_path / f"sharded_work_{rank}.json").read_text())
        assert (work["scored_here"], work["computed"], work["cached"]) == (40, 40, 0)
        np.testing.assert_allclose(np.load(tmp_path / f"sharded_{rank}.npy"), alone, rtol=0, atol=1e-5)
    shared, stats = scoring.mean_response_losses(model, _examples(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                 chunk_size=8, cache=ArtifactCache(cache), cache_key="sharded")
    assert (stats.cached, stats.computed) == (40, 0)  # the main process saved every chunk
    # every chunk went into the cache, whichever process ran it: one process now computes nothing
    again, stats = scoring.mean_response_losses(model, _examples(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                chunk_size=8, cache=ArtifactCache(cache), cache_key="k")
    assert (stats.cached, stats.computed) == (40, 0)
    np.testing.assert_allclose(again, alone, rtol=0, atol=1e-6)


def test_shared_prefixes_are_a_cpu_saving_and_off_on_a_gpu():
    """On a GPU the flash varlen kernel beats recomputation savings that need the eager loop."""
    assert scoring.shares_prefixes_on(torch.device("cpu"))
    assert not scoring.shares_prefixes_on(torch.device("cuda", 0))
