"""Every file and folder name of run, search and export directories: the one place that knows them.

A training run (`augsearch train`, or a trial's `fit/`):
    checkpoint.pt  policy.json  metrics.jsonl  config.json  tb/
A search (`augsearch search`):
    search.json  summary.csv  summary.json  <trial>/fit/ (a training run)  <trial>/checkpoint_NNNNNN/ (Ray's copies)
An export (`augsearch export`): checkpoint.pt and policy.json side by side (one folder per trial with --all), and
    estimator.json once `augsearch calibrate` has fitted the Dice estimators.
Predictions (`augsearch predict`): one NIfTI per case, ending as its input (.nii.gz or .nii); with --uncertainty,
    uncertainty/ holds <case>_entropy and <case>_variance maps and uncertainty.csv (apart, so the folder holds
    segmentations only); quality.csv (estimated Dice per case and class) when the model folder has an estimator.json.
"""

CHECKPOINT_NAME = "checkpoint.pt"
POLICY_NAME = "policy.json"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
TENSORBOARD_DIR = "tb"
MANIFEST_NAME = "search.json"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
FIT_DIR = "fit"
UNCERTAINTY_DIR = "uncertainty"
UNCERTAINTY_CSV = "uncertainty.csv"
ESTIMATOR_NAME = "estimator.json"
QUALITY_CSV = "quality.csv"
