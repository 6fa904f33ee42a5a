"""The leaf operators of the model, each a forward/backward pair `y, ctx = op_forward(...)`,
`dx, dparams = op_backward(ctx, dy)` with its equation and SPEC section in the docstring: linear, embedding, norms
(RMSNorm), rope, attention (+ the output gate), activations, mlp (SwiGLU), router, moe (dispatch / experts /
combine), losses (cross-entropy with z-loss, balance loss); and optimizer_kernels, the array kernels of the
optimizer (Newton–Schulz, the AdamW update, clipping's sum of squares and rescale).

Model code never calls these directly: model/ops.py collects them in the op table. Each takes its array namespace
from its inputs (array_module.array_namespace) and calls only functions of the Array API standard through it, so it
runs on NumPy, CuPy and array-api-strict arrays alike; scatter.py forms the counts and scatter-adds the standard
lacks. Imports: numpy (the fallback namespace) and each other only.
"""
