"""The cross-validation report: one static report.html with its PNGs beside it (relative links, so the
folder can be copied or served from S3 as is). No Ray; matplotlib through its object API (Figure +
Agg canvas), so writing a report never changes the process's pyplot backend.

Every number in it is out-of-fold: the kinds' OOF predictions, the ensembles' cross-validated (never
in-sample) predictions and the per-sex median baseline. Each section says so when its input is
missing (no trials table, no preprocessing summary, no images) instead of failing.

From the pipeline::

    worst = report.worst_cases(oof, ensemble_oof["tune"], n=12)
    images = ray_prepare.read_registered(registered_uri, options, ids=worst["id"].tolist())
    report.write_report(out_uri, oof, kinds, ensembles, ensemble_oof, trials=trials,
                        preprocess_summary=summary, worst_images=images, storage_options=options)
"""

from boneage.report.figures import THUMB_WIDTH
from boneage.report.page import write_report
from boneage.report.sections import worst_cases

__all__ = ["THUMB_WIDTH", "write_report", "worst_cases"]
