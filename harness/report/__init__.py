"""The verdict layer of the leaderboard: from run records to 'does recipe X beat the baseline, by how
much, with what confidence' (summary.py), accounting for training seeds and multiple comparisons."""
