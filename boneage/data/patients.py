"""Patient groups: the images of one child (follow-ups, both hands, repeats) share a key, so that folds
and the locked test split keep a child on one side. A patient id is identifying: only its hash, by
:func:`patient_group`, ever leaves the reading of a label table or a DICOM header."""

from __future__ import annotations

import hashlib

# A fixed project prefix, not a secret: deterministic, so that reruns agree. The key is a pseudonym, not
# anonymisation (whoever holds a candidate id can hash it and compare): handle tables with it as such.
_GROUP_HASH_PREFIX = b"boneage patient group v1\x00"


def patient_group(value: object) -> str | None:
    """The hashed group key of a patient id (a label cell or DICOM PatientID); None for an empty one
    (that image is then its own group). 16 hex digits of SHA-256: never the id in clear."""
    text = "" if value is None else str(value).strip()
    if not text or text.lower() in ("nan", "na", "n/a", "none", "null"):
        return None
    return "g" + hashlib.sha256(_GROUP_HASH_PREFIX + text.encode()).hexdigest()[:16]
