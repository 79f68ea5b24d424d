import pytest

from harness.compare import comparison_table, specs_for_all
from harness.errors import HarnessError
from harness.record import RunRecord
from harness.spec import build_spec
from tests.records import make_record


def test_all_mode_maps_params_per_recipe():
    spec = build_spec(config_file=None, overrides=["params.ifd.rate=0.05", "params.phased.stage_order=[3]"],
                      flags={"recipe": "all"})
    by_name = {sub.recipe: sub for sub in specs_for_all(spec)}
    assert {"one-off", "phased", "ifd"} <= set(by_name)
    assert by_name["ifd"].params == {"rate": 0.05}
    assert by_name["phased"].params == {"stage_order": [3]}
    assert by_name["one-off"].params == {}
    assert len({sub.run_id() for sub in by_name.values()}) == len(by_name)


def test_all_mode_rejects_unknown_recipe_params():
    spec = build_spec(config_file=None, overrides=["params.ifdd.rate=0.05"], flags={"recipe": "all"})
    with pytest.raises(HarnessError, match="did you mean 'ifd'"):
        specs_for_all(spec)


def test_comparison_table_marks_deltas_against_one_off():
    def record(name, acc):
        return RunRecord.from_dict(make_record(recipe={"name": name}, data={"source": "s"},
                                               metrics={"t": {"n": 10, "acc": {"value": acc, "stderr": 0.1}}},
                                               cost={"train_tokens": 5, "scoring_tokens": 0, "wall_seconds": 1.0}))

    table = comparison_table([record("one-off", 0.5), record("ifd", 0.6)])
    cells = [list(column.cells) for column in table.columns]
    assert cells[0] == ["one-off", "ifd"]
    assert "(+0.1000)" in cells[1][1] and "0.5000 ± 0.1000" in cells[1][0]


def test_comparison_table_best_of_lower_is_better_and_per_seed_baselines():
    def record(name, seed, acc, perplexity):
        return RunRecord.from_dict(make_record(recipe={"name": name}, seed=seed, data={"source": "s"},
                                               metrics={"t": {"n": 10, "acc": {"value": acc, "stderr": 0.1},
                                                              "perplexity": {"value": perplexity, "stderr": 0.5}}},
                                               cost={"train_tokens": 5, "scoring_tokens": 0, "wall_seconds": 1.0}))

    table = comparison_table([record("one-off", 0, 0.5, 9.0), record("one-off", 1, 0.4, 12.0),
                              record("ifd", 0, 0.6, 11.0), record("ifd", 1, 0.45, 10.0)])
    labels, acc, perplexity = (list(column.cells) for column in table.columns[:3])
    assert labels == ["one-off (seed 0)", "one-off (seed 1)", "ifd (seed 0)", "ifd (seed 1)"]
    assert perplexity[0].startswith("[bold]9.0000")  # the lowest perplexity is the best
    assert not perplexity[1].startswith("[bold]")
    assert "(+0.1000)" in acc[2] and "(+0.0500)" in acc[3]  # each seed against the one-off of its seed

def test_comparison_table_names_rows_by_the_recipe_variant():
    def record(name, variant=None):
        return RunRecord.from_dict(make_record(recipe={"name": name, **({"variant": variant} if variant else {})},
                                               data={"source": "s"},
                                               metrics={"t": {"n": 10, "acc": {"value": 0.5, "stderr": 0.1}}},
                                               cost={"train_tokens": 5, "scoring_tokens": 0, "wall_seconds": 1.0}))

    table = comparison_table([record("one-off"), record("phased", "phased[scorer=ifd-proxy, stage_order=1-2-3]")])
    assert list(table.columns[0].cells) == ["one-off", "phased[scorer=ifd-proxy, stage_order=1-2-3]"]
