"""Stage 4, validation: k-fold CV (folds, trials, out-of-fold tables), the per-sex linear ensembles, and
accuracy metrics as the field reports them."""
