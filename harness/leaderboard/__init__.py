"""The leaderboard: submissions are results.json files of full runs; validate them, then build the tables.

- ``release``: the release file, every question of the released split as hashes;
- ``checks``: a submission's sample lines checked one by one against the release, metrics recomputed from them,
  and ``--rerun K``, which re-scores K of them with the submitted model (the only check that catches predictions
  written by hand);
- ``submission``: a finished run folder made into a submission;
- ``from_lmms_eval``: an lmms-eval run made into the same run folder;
- ``render``: the tables (leaderboard.md, leaderboard.csv) from validated submissions.

The command (`vqa-constraints leaderboard prepare|validate|build|release`) is ``harness/cli/leaderboard.py``.
"""

from pathlib import Path

# The shipped release, found next to the package (not the working directory) so `validate` checks the same
# thing from any folder.
DEFAULT_RELEASE = Path(__file__).resolve().parents[2] / "leaderboard" / "release.json"
