"""The stages of a run, in order, each reading and writing under `config.output`; Ray is started by the
caller (boneage.distributed.ray_env.init_ray). Workflows and the `boneage` command call them as
`run.<stage>`:

  checks       settings, input paths and earlier stages' outputs, checked before any work
  holdout      the locked test split: set aside first, scored once at the end
  preparation  manifest, key point model, registration on Ray Data, QA
  training     k-fold CV on Ray Tune + Train, ensemble weights
  bundling     the bundle that ships
  scoring      a bundle scoring radiographs (`boneage score`; the test split's evaluation)
  reporting    report.html, the stage timer and the closing summary
"""

from boneage.run.checks import check_config, check_folds, check_registered, resolve_data, save_config
from boneage.run.holdout import evaluate_test, read_test_ids, read_test_split, split_test, test_split_uri
from boneage.run.preparation import keypoint_model, preprocess, read_annotations, split_annotations
from boneage.run.training import cross_validate, fit_ensembles
from boneage.run.bundling import KEYPOINT_MODEL, write_bundle
from boneage.run.scoring import score, scoring_config, scoring_resources
from boneage.run.reporting import StageTimer, print_final_summary, report

__all__ = ["check_config", "check_folds", "check_registered", "resolve_data", "save_config", "evaluate_test",
           "read_test_ids", "read_test_split", "split_test", "test_split_uri", "keypoint_model", "preprocess",
           "read_annotations", "split_annotations", "cross_validate", "fit_ensembles", "KEYPOINT_MODEL",
           "write_bundle", "score", "scoring_config", "scoring_resources", "StageTimer", "print_final_summary",
           "report"]
