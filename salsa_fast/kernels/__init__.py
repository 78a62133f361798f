"""Triton kernels over SaLSA's flat buffers, one family per file, each launcher beside its kernel.

Invariants every kernel here keeps (and the tests check):

* **One launch per flat buffer**, never per tensor; a 1-D grid of ``cdiv(n, BLOCK)`` programs.
* **int64 offsets**: ``program_id`` is widened before it is multiplied, so buffers past 2**31
  elements index correctly.
* **fp32 math** for fp32/bf16/fp16 parameters (fp64 for fp64 ones): values are widened on load
  and rounded once on store, to nearest-even (bf16 by hand: the interpreter truncates).
  Divisions and square roots are IEEE-rounded (``div_rn``, ``sqrt_rn``) so results track the
  torch backend to the last bits. Host scalars arrive as
  (fp32 high, fp32 low) pairs, exact enough for fp64 buckets too.
* **No float atomics**: reductions write one partial sum per program; a deterministic second
  stage (a torch sum over the partials) finishes them, so results repeat bit for bit.
* **No host syncs**: launchers take host floats and device tensors and never read back; a
  non-finite step is skipped on the device through a flag tensor.
* **No autotuning**: the kernels update buffers in place, and an autotuner would run them
  several times on the same data (it would need ``restore_value`` for every mutated buffer).

The kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before
this package is imported), which is how CI tests them.
"""
