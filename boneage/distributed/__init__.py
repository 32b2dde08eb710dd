"""The Ray layer, and the only one that imports Ray: Ray Data (preparation, scoring), Ray Train (the key
point model, CV trials), Ray Tune (CV, ensemble weights), and Ray's start-up and checkpoints. Each module
is thin wiring around the plain functions of the stages."""
