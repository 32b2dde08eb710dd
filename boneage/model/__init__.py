"""Stage 3, the networks: zone models, the key point and sex networks, augmentation, the torch training
loop (no Ray: the distributed layer calls it) and safetensors weights."""
