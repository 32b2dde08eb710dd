"""Stage 5, clinical outputs: bone age SDS against the Greulich-Pyle reference, the rejection gate, the
clinical columns of a scored table, per-image cards, and a scored row as DICOM for the PACS (dicom_out:
a Structured Report and the card as a Secondary Capture)."""
