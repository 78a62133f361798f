"""Training-stack integrations: each module imports its framework only when imported itself.

* :mod:`salsa_fast.integrations.transformers`: ``SaLSATrainer``, a Hugging Face ``Trainer``.
* :mod:`salsa_fast.integrations.lightning`: ``SaLSAMixin`` for a ``LightningModule``.
"""


def log_values(optimizer) -> dict[str, float]:
    """What the integrations log after a step: the step size (and the length of the updates, a
    schedule's ``lr`` times it) and the search statistics.

    Args:
        optimizer: a :class:`~salsa_fast.SaLSA` (or SLS) that has stepped.

    Returns:
        ``step_size``, ``effective_step_size``, ``search_interval``, ``searched_fraction`` (searches
        per step), ``forwards_per_step`` (closure calls per step) and ``skipped_steps``.
    """
    stats = optimizer.stats
    steps = max(1, stats["steps"])
    return {
        "step_size": stats["step_size"],
        "effective_step_size": stats["effective_step_size"],
        "search_interval": stats["search_interval"],
        "searched_fraction": stats["searches"] / steps,
        "forwards_per_step": stats["forwards"] / max(1, stats["steps"] + stats["skipped_steps"]),
        "skipped_steps": stats["skipped_steps"],
    }
