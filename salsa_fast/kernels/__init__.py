"""Triton kernels over SaLSA's flat buffers, one family per file, each launcher beside its kernel.

* :mod:`.probe`: the non-finite probe of a step's gradients;
* :mod:`.salsa_plain_step`: SaLSA's non-search step;
* :mod:`.salsa_search`: SaLSA's search with a backup (``salsa_line.BackupLine``) and the commit
  that ends either search; :mod:`.salsa_moving_search`: the search without one
  (``keep_backup=False``, ``salsa_line.MovingLine``);
* :mod:`.labpal_passes`: LABPAL's passes;
* :mod:`.table` (the parameter table), :mod:`.reduce` (the reductions' second stage) and
  :mod:`._common` (launch constants, scalar passing, full and partial blocks, the math).

Invariants every kernel here keeps (and the tests check):

* **One launch per flat buffer**, never per tensor: ``cdiv(n, BLOCK)`` programs over a flat
  buffer, or one per block of the parameter table's rows (:mod:`.table`), launched under the
  buffers' device (``_common.on_device``), not the current one.
* **Full blocks unmasked**: each program runs its block through ``_common.run_chunk``,
  unmasked when the block is full, so that the compiler emits 128-bit accesses, and masked only
  in a tail. The kernels over a whole flat buffer do not specialise on its length, so a length
  that is not a multiple of 16 (``keep_backup=False`` packs the buffers without padding) leaves
  them as wide as any other.
* **int64 offsets**: ``program_id`` is widened before it is multiplied, so buffers past 2**31
  elements index correctly.
* **fp32 math** for fp32/bf16/fp16 parameters (fp64 for fp64 ones): values are widened on load
  and rounded once on store, to nearest-even (bf16 by hand: the interpreter truncates).
  Divisions and square roots are IEEE-rounded (``div_rn``, ``sqrt_rn``) so results track the
  torch backend to the last bits. Host scalars arrive as (fp32 high, fp32 low) pairs, one
  tuple argument each (Adam's five constants as one, ``_common.adam_constants``), exact
  enough for fp64 buckets too; what the host may not know (the step count
  behind the bias corrections, the non-finite flag) is read from the device
  (``salsa_fast.step_state``).
* **No atomics**: reductions write one partial sum per program; a deterministic second
  stage (a torch sum over the partials) finishes them, so results repeat bit for bit. The
  non-finite probe's programs store 1 into the flag only if they found something, all the
  same value, so their racing stores need no atomics either.
* **No host syncs**: launchers take host floats and device tensors and never read back; a
  non-finite step is skipped on the device through the flag, and counts itself there.
* **No autotuning**: the kernels update buffers in place, and an autotuner would run them
  several times on the same data (it would need ``restore_value`` for every mutated buffer).

The kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before
this package is imported), which is how CI tests them; ``tests/compile_kernels.py`` compiles
every variant the launchers make for sm_80, sm_86 and sm_90 without a GPU.
"""
