import numpy as np

from harness.concept_tree import ConceptTree, build_concept_tree, select_with_coverage


def test_tree_is_nested_and_deterministic():
    rng = np.random.default_rng(0)
    embeddings = np.concatenate([rng.normal(center, 0.1, size=(40, 8)) for center in (0, 3, 6)])
    tree = build_concept_tree(embeddings, topics=3, leaves_per_topic=4, seed=0)
    again = build_concept_tree(embeddings, topics=3, leaves_per_topic=4, seed=0)
    np.testing.assert_array_equal(tree.leaf, again.leaf)
    for leaf in tree.leaves:  # every leaf lies inside one topic
        assert len(set(tree.topic[tree.leaf == leaf].tolist())) == 1
    assert tree.as_record()["leaves"] == 12


def test_selection_covers_every_big_leaf_and_fills_by_score():
    leaf = np.array([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5)
    tree = ConceptTree(topic=np.zeros(100, int), leaf=leaf)
    scores = np.linspace(0.0, 1.0, 100)  # leaf 3 holds the best scores, leaf 0 the worst
    eligible = np.ones(100, bool)
    eligible[95:] = False  # the very best are ineligible (IFD > 1)
    chosen = select_with_coverage(scores, tree, budget=10, min_leaf_size=10, eligible=eligible)
    assert len(chosen) == 10 and all(eligible[chosen])
    assert {0, 1, 2} <= set(leaf[chosen].tolist())  # each leaf of >= 10 examples is represented
    assert 49 in chosen and 79 in chosen and 94 in chosen  # each leaf contributes its best eligible example
