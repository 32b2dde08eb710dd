"""Stage 5, clinical outputs: bone age SDS against the Greulich-Pyle reference, the rejection gate, the
clinical columns of a scored table, and per-image cards."""
