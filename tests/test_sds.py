"""Bone age SDS on the Greulich-Pyle scale: expected values worked out by hand from the Brush
Foundation rows in boneage/clinical/reference/greulich_pyle_brush_sd.csv."""

from __future__ import annotations

import numpy as np
import pytest

from boneage.clinical import sds


def test_reference_sd_interpolates_between_rows_and_stops_at_the_ends():
    ages = [72, 66, 45, 192, 204, 3, 2.9, 193, 204.1, np.nan, 100]
    sexes = ["M", "M", "F", "F", "M", "F", "M", "F", "M", "M", None]
    got = sds.reference_sd(ages, sexes)
    # M 72: a row (9.17); M 66: halfway between 60 (8.79) and 72 (9.17); F 45: halfway between 42 (7.48)
    # and 48 (8.98); the last rows F 192 (7.31), M 204 (13.05); the first, F 3 (0.72).
    assert got[:6] == pytest.approx([9.17, 8.98, 8.23, 7.31, 13.05, 0.72])
    assert np.isnan(got[6:]).all()  # below, above the table (girls end at 192, boys at 204); no age; no sex


def test_sds_interpretation_and_the_reason_when_there_is_none():
    ba = [90.0, 48.0, 62.0, 126.0, 126.01, 100.0, 100.0, 100.0, np.nan]
    ca = [72.0, 66.0, 45.0, 108.0, 108.0, 200.0, np.nan, 100.0, 100.0]
    sex = ["M", "M", "F", "M", "M", "F", "M", None, "F"]
    value, interpretation, sd, note = sds.bone_age_sds(ba, ca, sex)
    # (90-72)/9.17; (48-66)/8.98; (62-45)/8.23; M 108 has SD 9: exactly +2 SD is still normal.
    assert value[:5] == pytest.approx([18 / 9.17, -18 / 8.98, 17 / 8.23, 2.0, 18.01 / 9])
    assert interpretation[:5].tolist() == ["normal", "delayed", "advanced", "normal", "advanced"]
    assert sd[:5] == pytest.approx([9.17, 8.98, 8.23, 9.0, 9.0])
    assert note[:5].tolist() == [None] * 5
    assert np.isnan(value[5:]).all() and interpretation[5:].tolist() == [None] * 4
    assert note[5:].tolist() == ["age_outside_reference", "age_unknown", "sex_unknown", "no_boneage"]


def test_the_table_ships_inside_the_package():
    table = sds.reference_table()
    assert sorted(table) == ["F", "M"]
    assert (table["M"][0][0], table["M"][0][-1], table["F"][0][-1]) == (3, 204, 192)
    assert len(table["M"][0]) == 24 and len(table["F"][0]) == 23


def test_the_verdict_reads_the_whole_interval():
    # SDS intervals: wholly below -2, straddling -2, within, straddling +2, wholly above +2; then a
    # point SDS without an interval (an older bundle: the point decides) and no SDS at all.
    point = [-3.0, -2.5, 0.0, 2.5, 3.0, -2.5, np.nan]
    lower = [-4.0, -3.0, -1.0, 1.5, 2.1, np.nan, np.nan]
    upper = [-2.1, -1.5, 1.0, 3.0, 4.0, np.nan, np.nan]
    assert sds.interval_verdict(point, lower, upper).tolist() == [
        "delayed", "uncertain", "normal", "uncertain", "advanced", "delayed", None]
    # The bounds' SDS: (bound - CA) / SD; M at 72 months has SD 9.17.
    lo, hi = sds.sds_interval([50.0, np.nan], [70.0, np.nan], [72.0, 72.0], ["M", "M"])
    assert lo[0] == pytest.approx(-22 / 9.17) and hi[0] == pytest.approx(-2 / 9.17) and np.isnan(lo[1])
