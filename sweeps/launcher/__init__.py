"""The Ray launcher: planned trials -> Ray Tune -> one row per finished trial in the results store.

This package is the only code that imports Ray, and `driver._ray_session` the only place that calls `ray.init`:
an embedded local Ray when no address is given, otherwise a connection to an existing cluster (the CLI reads
`--address` / RAY_ADDRESS and passes it in). One module per job, each with one reason to change:

- driver.py: `launch`, Ray's session and output, the Tune run, the summary (what changes with Ray or Tune);
- worker.py: the trainable that runs one trial in a Ray worker, and its resume protocol (checkpoint folders);
- search.py: the searcher that feeds Tune the grid trials and then the Optuna suggestions of `search` experiments,
  and `SearchTrials`, which plans the concrete trial of each suggestion;
- recorder.py: the Tune callback that writes each finished trial into the store;
- progress.py: the one-line progress view (counts and ETA) the recorder keeps.

How one sweep runs (docs/reliability.md, docs/cluster.md):
- One Tune run per launch: a searcher hands out the grid trials (allocation, memory) first, then each `search`
  experiment's suggestions from Tune's OptunaSearch (TPE seeded with the experiment's seed, rho ~ U[0, 1],
  warm-started with the search trials already stored); `SearchTrials` resolves each suggested rho into a concrete
  trial (`plan.plan_search_trial`) before Tune starts it, so trainables only ever run given configs.
- A trial is `engram.trial.run_trial` inside a Tune function trainable given `resources.cpus_per_trial` CPUs
  (torch threads follow) and `gpus_per_trial` GPUs (fractions share a device). Each run_trial checkpoint is
  reported to Tune (`Checkpoint.from_directory`), so a retry after a crash (`FailureConfig(max_failures=
  resources.max_retries)`) resumes from it via `tune.get_checkpoint()`. A diverged trial returns normally
  (status "diverged") and is never retried.
- The DRIVER writes each finished trial into the store the moment Tune hands it over (a Tune Callback):
  the final report carries the `TrialResult` as JSON; a trial out of retries becomes a "failed" row with its
  error. Rows are keyed by trial_id, so a re-run never duplicates a trial.
- Driver-kill resume: each checkpoint is also published atomically (temporary name, then rename) under
  `<store>/.tune/resume/<trial_id>.<n>`; a re-run of the sweep starts a partial trial from there when the
  trial's node can see that folder (always on one machine; on a cluster only with a shared filesystem).
- Ray's own output (its logging, Tune's tables, worker logs) goes to `log_path`; the terminal gets one live
  progress line: done / running / failed / ETA.
"""

from sweeps.launcher.driver import ClusterError, LaunchSummary, launch
from sweeps.launcher.worker import RESUME_DIR, STATE_DIR, TUNE_DIR

__all__ = ["ClusterError", "LaunchSummary", "RESUME_DIR", "STATE_DIR", "TUNE_DIR", "launch"]
