"""The step program: every tensor of at least a few KiB a step allocates and frees.

step (the small autograd, the op programs, the training step loop, `program_peaks`),
templates (a deep model's program from a 6-layer cut), load (loading and preparing the
model), infer (generate and merge); the byte counts they are built from: weights,
trainable, optimizer, activations, logits.
"""
