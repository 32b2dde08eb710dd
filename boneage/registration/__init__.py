"""Stage 2, registration: hand mask and contrast, the three key points (geometric estimate; the CNN is in
boneage.model), the affine warp into the 2080x1600 frame, and its QA."""
