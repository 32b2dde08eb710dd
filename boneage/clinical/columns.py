"""The clinical columns of the scoring table: bone age SDS on the Greulich-Pyle scale (boneage.clinical.sds)
and the rejection gate (boneage.clinical.gate), added to boneage.score's rows by one call, and their counts for
the run's summary. docs/scoring.md says how to read them."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import pandas as pd

from boneage.clinical import gate, sds

# The SDS verdicts (boneage.clinical.sds.interval_verdict), as the summary counts them.
VERDICTS = ("delayed", "normal", "advanced", "uncertain")
COLUMNS = ("boneage_sds", "boneage_sds_lower", "boneage_sds_upper", "boneage_interpretation", "reference_sd_months", "sds_note", "accepted", "reject_reason")


def add_columns(out: pd.DataFrame, kinds: Sequence[str], calibration: Mapping[str, Any]) -> pd.DataFrame:
    """`out` (boneage.score's table: sex, boneage_months, chronological_age_months, QA flags, the kinds'
    columns) with COLUMNS added; `calibration`: boneage.clinical.gate.calibration_of the bundle."""
    value, _, sd, note = sds.bone_age_sds(out["boneage_months"], out["chronological_age_months"], out["sex"])
    # The verdict reads the SDS's interval (from the bone age's; NaN bounds: an older bundle, the point SDS)
    nan = pd.Series(float("nan"), index=out.index)
    lower, upper = sds.sds_interval(out.get("boneage_lower_months", nan), out.get("boneage_upper_months", nan),
                                    out["chronological_age_months"], out["sex"])
    interpretation = sds.interval_verdict(value, lower, upper)
    accepted, reason = gate.gate(out, kinds, calibration)
    return out.assign(boneage_sds=value, boneage_sds_lower=lower, boneage_sds_upper=upper,
                      boneage_interpretation=interpretation, reference_sd_months=sd,
                      sds_note=note, accepted=accepted, reject_reason=reason)


def summary(table: pd.DataFrame) -> dict[str, Any]:
    """Counts for the end of a run: accepted, rejected by reason, SDS categories (of accepted images)."""
    scored = table[table["boneage_months"].notna()]
    reasons = scored["reject_reason"].dropna().str.split(";").explode().value_counts()
    kept = scored[scored["accepted"].astype(bool)]
    return {"accepted": int(len(kept)), "rejected": int((~scored["accepted"].astype(bool)).sum()),
            "rejected_by_reason": {str(k): int(v) for k, v in reasons.items()},
            "interpretation": {c: int((kept["boneage_interpretation"] == c).sum())
                               for c in VERDICTS},
            "no_sds": {str(k): int(v) for k, v in kept["sds_note"].value_counts().items()},
            # a flag, not a reason: the sex classifier is too weak to overrule a given sex (docs/scoring.md)
            "sex_mismatch": int(scored["sex_mismatch"].fillna(False).astype(bool).sum()) if "sex_mismatch" in scored
            else 0}


def describe(table: pd.DataFrame, calibration: Mapping[str, Any]) -> str:
    """The summary line `boneage score` prints."""
    s = summary(table)
    line = (f"[score] gate: {s['accepted']} accepted, {s['rejected']} rejected {s['rejected_by_reason'] or ''}; "
            f"accepted on the {sds.SCALE} scale: {s['interpretation']['delayed']} delayed, "
            f"{s['interpretation']['normal']} normal, {s['interpretation']['advanced']} advanced, "
            f"{s['interpretation']['uncertain']} uncertain (the bone age's interval straddles ±2 SD)"
            + (f", no SDS {s['no_sds']}" if s["no_sds"] else ""))
    if s["sex_mismatch"]:
        line += (f"\n[score] {s['sex_mismatch']} images whose given sex the sex classifier contradicts with confidence "
                 "(sex_mismatch; not rejected): check the sex in the record")
    if "card" in table:
        failed = table[table["card"].isna() & table["boneage_months"].notna()]
        line += f"\n[score] {int(table['card'].notna().sum())} cards written, {len(failed)} failed" + "".join(
            f"\n  {r.id}: {r.card_error}" for r in failed.head(5).itertuples())
    missing = gate.missing_checks(calibration)
    if missing:
        line += f"\n[score] warning: the bundle has no calibration for {', '.join(missing)}: not checked"
    return line


def parquet_metadata() -> dict[bytes, bytes]:
    """Key-value metadata for the output parquet: which scale and table the SDS uses."""
    return {b"boneage.sds": json.dumps({"scale": sds.SCALE, "reference": sds.REFERENCE, "citation": sds.CITATION,
                                         "limit_sds": sds.LIMIT_SDS}).encode(),
            b"boneage.gate": json.dumps(gate.REASONS).encode()}


def with_metadata(table):
    """A pyarrow Table with parquet_metadata() added to its schema's metadata."""
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **parquet_metadata()})
